"""The loader reads the manifest (issue 14): schema, CT window, MR per volume, modality
filter, 3D volumes, and real CT DICOM whose HU survive loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.data.data_check import check_folder
from medgen.data.dicom_writer import write_physical_dicom
from medgen.data.intensity import PercentileMap, WindowMap
from medgen.data.manifest import DatasetManifest, IntensityPolicy, load_manifest
from medgen.data.patient_dataset import PatientDataset
from medgen.data.site_data import load_site
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import build_head_federation
from medgen.sim.head_tissues import HEAD_CLASSES

SIZE = 24   # the 3D build
SIZE2D = 32


@pytest.fixture(scope="module")
def head2d(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    config = HeadSimConfig(seed=3, sites="A,B,M", subjects_per_site=2, public_size=1,
                           heldout_fit=0, heldout_test=1, image_size=SIZE2D)
    return build_head_federation(config, tmp_path_factory.mktemp("head2d") / "data").root


@pytest.fixture(scope="module")
def head3d(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    config = HeadSimConfig(seed=1, sites="A,M", subjects_per_site=1, public_size=1,
                           heldout_fit=0, heldout_test=1, image_size=SIZE, dims=3)
    return build_head_federation(config, tmp_path_factory.mktemp("head3d") / "vol").root


def _hu(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, np.float64)


def test_ct_window_identical_at_every_site_and_hu_invert(head2d):
    windows = set()
    for site in ("A", "B"):
        data = load_site(head2d / "sites" / site, SIZE2D)  # root found: <root>/sites/<S>
        assert data.manifest.modality == "CT" and data.has_labels
        assert data.schema.names == tuple(HEAD_CLASSES)
        assert data.labels.max() < len(HEAD_CLASSES)
        maps = {data.intensity_of(row) for row in range(data.num_slices)}
        assert all(isinstance(m, WindowMap) for m in maps)
        windows |= {(m.lo, m.hi) for m in maps}
        hu = _hu(head2d / "sites" / site / "images" / f"{site}-0000.nii.gz")
        row = int((data.patient_index == 0).nonzero()[0])  # patient 0 = first record by name
        back = data.intensity_of(row).inverse(data.images[row, 0].numpy())
        lo, hi = next(iter(maps)).lo, next(iter(maps)).hi
        np.testing.assert_array_equal(np.rint(back), np.clip(hu, lo, hi))
    assert windows == {load_manifest(head2d / "sites" / "A", root=head2d).intensity.window}


def test_mr_site_normalised_per_volume(head2d, tmp_path):
    data = load_site(head2d / "sites" / "M", SIZE2D)
    assert data.manifest.modality == "MR"
    assert all(isinstance(m, PercentileMap) for m in data.intensity_maps)
    # a 3-slice MR volume: one map for the volume, slice k keeps its (k+1) brightness
    rng = np.random.default_rng(0)
    volume = np.stack([(k + 1) * (100 + rng.random((16, 16)) * 50) for k in range(3)], -1)
    site = tmp_path / "mr"
    (site / "images").mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), site / "images" / "v.nii.gz")
    DatasetManifest(modality="MR", intensity=IntensityPolicy(), labels=None).write(site)
    loaded = load_site(site, 16)
    assert not loaded.has_labels and loaded.schema is None and len(loaded.intensity_maps) == 1
    means = loaded.images[:, 0].mean(dim=(1, 2))
    assert means[0] < means[1] < means[2]
    low, high = np.percentile(volume, [0.5, 99.5])
    assert loaded.intensity_maps[0].lo == pytest.approx(low)
    assert loaded.intensity_maps[0].hi == pytest.approx(high)


def test_label_value_outside_schema_is_refused_by_name(head2d, tmp_path):
    site = tmp_path / "A"
    shutil.copytree(head2d / "sites" / "A", site)
    shutil.copy(head2d / "dataset.toml", tmp_path / "dataset.toml")
    bad = site / "labels" / "A-0001.nii.gz"
    image = nib.load(str(bad))
    labels = np.asarray(image.dataobj).copy()
    labels[0, 0] = 99
    nib.save(nib.Nifti1Image(labels, image.affine), bad)
    data = load_site(site, SIZE2D, root=tmp_path)
    assert data.num_patients == 1
    reasons = [s.reason for s in data.skipped]
    assert len(reasons) == 1 and "labels/A-0001.nii.gz" in reasons[0] and "99" in reasons[0]
    assert "outside the label schema" in reasons[0]
    report = check_folder(site, manifest=load_manifest(site, root=tmp_path))
    assert report.patients == 1
    assert any("99" in r.status and r.item == "images/A-0001.nii.gz" for r in report.skipped)


def test_records_of_another_modality_are_left_out(head2d, tmp_path):
    site = tmp_path / "ct"
    hu = _hu(head2d / "sites" / "A" / "images" / "A-0000.nii.gz")
    write_physical_dicom(site / "images" / "ct", hu, (7.5, 7.5, 5.0), modality="CT",
                         units="HU", seed=1)
    write_physical_dicom(site / "images" / "scout", hu + 1000, (7.5, 7.5, 5.0), modality="CR",
                         units="arbitrary", seed=2)
    load_manifest(head2d / "sites" / "A", root=head2d).with_labels(None).write(site)
    report = check_folder(site)
    assert report.usable == 1 and report.counts() == {"CT": {"usable": 1, "slices": 1}}
    # data/dicom_writer.py stores a CR as a secondary capture (it has no CR SOP class), and
    # a secondary capture is left out whatever its modality (tests/data/dicom/test_mixed_export.py
    # covers "modality CR contradicts the manifest's CT" with a CR image SOP class)
    assert [r.item for r in report.skipped] == ["images/scout"]
    assert "(CR): secondary capture" in report.skipped[0].status
    data = load_site(site, SIZE2D)
    assert data.num_patients == 1 and data.manifest.modality == "CT"
    assert any("images/scout" in s.reason and "secondary capture" in s.reason for s in data.skipped)


def test_3d_volumes_served_per_patient(head3d):
    data = load_site(head3d / "sites" / "A", SIZE)  # the manifest says dims = 3
    assert data.dims == 3 and data.images.shape == (1, 1, SIZE, SIZE, SIZE)
    assert data.labels.shape == (1, SIZE, SIZE, SIZE) and data.num_patients == 1
    dataset = PatientDataset(data, generator_seed=0)
    image, labels = dataset[0]
    assert len(dataset) == 1 and image.shape == (1, SIZE, SIZE, SIZE)
    assert labels.shape == (SIZE, SIZE, SIZE) and len(labels.unique()) >= 6
    slices = load_site(head3d / "sites" / "A", SIZE, dims=2)
    assert slices.dims == 2 and slices.num_patients == 1 and slices.images.shape[0] <= SIZE


def test_real_ct_dicom_keeps_hu_through_check_and_loading(head3d, tmp_path):
    """The head CT written as a CT DICOM series with honest Rescale Slope/Intercept."""
    site = tmp_path / "dicom-site"
    hu = _hu(head3d / "sites" / "A" / "images" / "A-0000.nii.gz")  # (H, W, S) int16 HU
    files = write_physical_dicom(site / "images" / "p0", hu, (10.0, 10.0, 10.0), modality="CT",
                                 units="HU", seed=7)
    assert len(files) == SIZE
    (site / "labels").mkdir()
    shutil.copy(head3d / "sites" / "A" / "labels" / "A-0000.nii.gz", site / "labels" / "p0.nii.gz")
    load_manifest(head3d / "sites" / "A", root=head3d).write(site)
    report = check_folder(site)
    assert report.trains and report.usable == 1 and report.skipped == []
    assert report.rows[0].modality == "CT" and report.rows[0].kind == "dicom"
    data = load_site(site, SIZE)
    window = data.intensity_of(0)
    assert isinstance(window, WindowMap) and data.images.shape == (1, 1, SIZE, SIZE, SIZE)
    back = window.inverse(data.images[0, 0].numpy())          # (S, H, W)
    expected = np.clip(np.moveaxis(hu, -1, 0), window.lo, window.hi)
    np.testing.assert_allclose(back, expected, atol=0.5)      # HU within quantisation
    np.testing.assert_array_equal(np.rint(back), expected)
    nifti = load_site(head3d / "sites" / "A", SIZE)
    torch.testing.assert_close(data.images, nifti.images, rtol=0, atol=1e-6)
    torch.testing.assert_close(data.labels, nifti.labels)
