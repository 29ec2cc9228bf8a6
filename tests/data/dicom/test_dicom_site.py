"""A site whose data is a DICOM folder loads like the same site in NIfTI; the cache covers every file."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.data.cache import fingerprint
from medgen.data.dicom import DicomReadOptions, DicomSeriesReader
from medgen.data.readers import NiftiReader, PngReader
from medgen.data.site_data import load_site
from medgen.sim.dicom_export import export_site_as_dicom, mni_t1_volume

from conftest import tree_digest


def readers():
    return [NiftiReader(), PngReader(), DicomSeriesReader()]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """A 4-subject NIfTI site from real MNI slices (12-bit ints) and its DICOM twin."""
    root = tmp_path_factory.mktemp("sites")
    mni, _ = mni_t1_volume(stride=4)
    for k in range(4):
        image = np.round(mni[:, :, 14 + 3 * k] * 16).astype(np.int16)  # 12-bit scanner values
        labels = np.digitize(mni[:, :, 14 + 3 * k], [30, 80, 140]).astype(np.uint8)  # 0..3
        for folder, data in (("images", image), ("labels", labels)):
            (root / "nifti" / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), root / "nifti" / folder / f"sub-{k:02d}.nii.gz")
    assert export_site_as_dicom(root / "nifti", root / "dicom", seed=3) == 4
    return root


def sort_rows(images, labels):
    order = torch.argsort(images.flatten(1).sum(1))
    return images[order], labels[order]


def test_dicom_site_loads_like_the_nifti_site(sites):
    nifti = load_site(sites / "nifti", image_size=32, readers=readers())
    dicom = load_site(sites / "dicom", image_size=32, readers=readers())
    assert dicom.skipped == [] and dicom.num_patients == nifti.num_patients == 4
    a_img, a_lab = sort_rows(nifti.images, nifti.labels)
    b_img, b_lab = sort_rows(dicom.images, dicom.labels)
    torch.testing.assert_close(b_img, a_img)
    assert torch.equal(b_lab, a_lab)


def test_each_subject_folder_is_one_series(sites):
    volumes = list(DicomSeriesReader().read(sites / "dicom" / "images" / "sub-02"))
    [volume] = volumes
    image = nib.load(sites / "nifti" / "images" / "sub-02.nii.gz").get_fdata()
    np.testing.assert_array_equal(volume.array[:, :, 0], image.astype(np.float32))


def test_cache_key_covers_every_file_of_a_series(sites, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(sites / "dicom", site)
    params = {"image_size": 32}
    key = fingerprint(site, ("images", "labels"), params)
    cached_dir = tmp_path / "cache"
    first = load_site(site, 32, cache_dir=cached_dir, readers=readers())
    again = load_site(site, 32, cache_dir=cached_dir, readers=readers())
    assert torch.equal(first.images, again.images) and first.fingerprint == again.fingerprint
    # change one byte of pixel data in the LAST slice file of one series: the key must move
    victim = sorted((site / "images" / "sub-01").iterdir())[-1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    assert fingerprint(site, ("images", "labels"), params) != key
    changed = load_site(site, 32, cache_dir=cached_dir, readers=readers())
    assert changed.fingerprint != first.fingerprint


def test_loading_modifies_nothing(sites):
    before = tree_digest(sites)
    load_site(sites / "dicom", image_size=32, readers=readers())
    assert tree_digest(sites) == before


@pytest.mark.slow
def test_simulated_site_exported_as_dicom_loads_like_its_nifti(tmp_path):
    """A site of the simulated federation, written as a DICOM folder, gives the same tensors."""
    from medgen.sim.config import SimConfig
    from medgen.sim.federation import build_federation

    config = SimConfig(seed=0, sites="A,B", subjects_per_site=3, public_size=0, heldout_fit=0,
                       heldout_test=0, image_size=32)
    build_federation(config, tmp_path / "fed")
    nifti_site = tmp_path / "fed" / "sites" / "B"
    export_site_as_dicom(nifti_site, tmp_path / "B-dicom", seed=1)
    nifti = load_site(nifti_site, 32, readers=readers())
    dicom = load_site(tmp_path / "B-dicom", 32, readers=readers())
    assert dicom.skipped == [] and dicom.num_patients == nifti.num_patients == 3
    a_img, a_lab = sort_rows(nifti.images, nifti.labels)
    b_img, b_lab = sort_rows(dicom.images, dicom.labels)
    torch.testing.assert_close(b_img, a_img)
    assert torch.equal(b_lab, a_lab)


def test_reader_plugs_into_the_registry_protocol(sites, tmp_path):
    from medgen.data.readers import Reader, find_reader

    reader = DicomSeriesReader()
    assert isinstance(reader, Reader) and reader.name == "dicom"
    subject = sites / "dicom" / "images" / "sub-00"
    assert reader.claims(subject) and reader.claims(next(subject.iterdir()))
    assert not reader.claims(sites / "nifti" / "images" / "sub-00.nii.gz")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x" * 200)
    assert not reader.claims(tmp_path / "empty") and not reader.claims(tmp_path / "notes.txt")
    assert isinstance(find_reader(subject, readers()), DicomSeriesReader)
    windowed = DicomSeriesReader(DicomReadOptions(window=(40.0, 80.0)))
    assert windowed.cache_token != reader.cache_token
