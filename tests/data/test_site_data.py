"""load_site, PatientDataset, the public bank and held-out loading on tiny real files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader

from medgen.data.readers import SkippedFile, Volume, default_readers
from medgen.data.site_data import (PatientDataset, SiteDataError, load_heldout,
                                     load_public_bank, load_site)
from medgen.models.recipe import PublicData

torch.set_num_threads(1)


def reference_normalise(slice_: np.ndarray) -> np.ndarray:
    low, high = np.percentile(slice_, [0.5, 99.5])
    return np.clip(2 * (slice_ - low) / (high - low) - 1, -1, 1)


def test_good_site_shapes_patients_and_labels(good_site):
    site = load_site(good_site, 16)
    # p0, p1 (2D), png0 (2D), vol (3 slices) -> 6 slices of 4 patients
    assert site.images.shape == (6, 1, 16, 16) and site.images.dtype == torch.float32
    assert site.labels.shape == (6, 16, 16) and site.labels.dtype == torch.int64
    assert site.has_labels and site.num_patients == 4 and site.skipped == []
    assert site.patient_index.dtype == torch.int64
    assert sorted(torch.bincount(site.patient_index).tolist()) == [1, 1, 1, 3]
    assert site.images.min() >= -1 and site.images.max() <= 1
    assert set(site.labels.unique().tolist()) <= {0, 1, 2, 3}
    assert len(site.fingerprint) == 64


def test_normalisation_matches_percentile_reference_at_native_size(tmp_path, files):
    image, labels = files.phantom(20, seed=3)
    files.write_nifti(tmp_path / "s" / "images" / "a.nii.gz", image)
    files.write_nifti(tmp_path / "s" / "labels" / "a.nii.gz", labels)
    site = load_site(tmp_path / "s", 20)  # no resize: isolates the normalisation
    got = site.images[0, 0].numpy()
    np.testing.assert_allclose(got, reference_normalise(image.astype(np.float64)), atol=1e-5)
    assert got.min() == -1.0 and got.max() == 1.0
    np.testing.assert_array_equal(site.labels[0].numpy(), labels)


def test_3d_volume_is_one_patient_with_its_slices_in_order(tmp_path, files):
    slices = [files.phantom(16, seed=s) for s in range(4)]
    volume = np.stack([s[0] * (s_i + 1) for s_i, s in enumerate(slices)], -1)
    files.write_nifti(tmp_path / "s" / "images" / "v.nii.gz", volume.astype(np.float32))
    files.write_nifti(tmp_path / "s" / "labels" / "v.nii.gz", np.stack([s[1] for s in slices], -1))
    site = load_site(tmp_path / "s", 16)
    assert site.num_patients == 1 and site.patient_index.tolist() == [0, 0, 0, 0]
    low, high = np.percentile(volume.astype(np.float64), [0.5, 99.5])
    for index, (image, labels) in enumerate(slices):
        # per-VOLUME scaling (MR, brain default): slice k keeps its k+1 brightness
        expected = np.clip(2 * (volume[..., index].astype(np.float64) - low) / (high - low) - 1, -1, 1)
        np.testing.assert_allclose(site.images[index, 0].numpy(), expected, atol=1e-5)
        np.testing.assert_array_equal(site.labels[index].numpy(), labels)
    assert site.intensity_of(3).to_dict()["lo"] == low


def test_constant_end_slice_of_volume_dropped_with_its_label(tmp_path, files):
    image, labels = files.phantom(16)
    volume = np.stack([np.zeros_like(image), image], -1).astype(np.float32)
    files.write_nifti(tmp_path / "s" / "images" / "v.nii.gz", volume)
    files.write_nifti(tmp_path / "s" / "labels" / "v.nii.gz", np.stack([np.zeros_like(labels), labels], -1))
    site = load_site(tmp_path / "s", 16)
    assert site.images.shape[0] == 1
    np.testing.assert_array_equal(site.labels[0].numpy(), labels)


def test_rectangular_image_padded_to_physical_square(tmp_path, files):
    image = np.full((10, 20), 500.0, np.float32)
    image[:, ::2] = 0.0  # not constant
    files.write_nifti(tmp_path / "iso" / "images" / "a.nii.gz", image, spacing=(1.0, 1.0))
    files.write_nifti(tmp_path / "aniso" / "images" / "a.nii.gz", image, spacing=(2.0, 1.0))
    iso = load_site(tmp_path / "iso", 20).images[0, 0]
    aniso = load_site(tmp_path / "aniso", 20).images[0, 0]
    # 10x20 pixels of 1 mm: 5 rows of padding (-1) above and below the anatomy
    assert torch.all(iso[:5] == -1) and torch.all(iso[-5:] == -1)
    assert not torch.all(iso[5] == -1)
    # 10x20 pixels of 2x1 mm is already 20 mm square: no padding rows
    assert not torch.all(aniso[0] == -1)


def build_bad_site(root: Path, files) -> Path:
    site = root / "site"
    for index in range(2):
        image, labels = files.phantom(16, seed=index)
        files.write_nifti(site / "images" / f"good{index}.nii.gz", image)
        files.write_nifti(site / "labels" / f"good{index}.nii.gz", labels)
    (site / "images" / "corrupt.nii.gz").write_bytes(np.random.default_rng(0).bytes(300))
    (site / "images" / "empty.nii.gz").write_bytes(b"")
    nan = files.phantom(16)[0].astype(np.float32)
    nan[3, 3] = np.nan
    files.write_nifti(site / "images" / "nan.nii.gz", nan)
    files.write_nifti(site / "images" / "constant.nii.gz", np.full((16, 16), 7, np.int16))
    image, labels = files.phantom(16, seed=5)
    files.write_nifti(site / "images" / "shape.nii.gz", image)
    files.write_nifti(site / "labels" / "shape.nii.gz", labels[:12])
    files.write_nifti(site / "images" / "range.nii.gz", image)
    files.write_png(site / "labels" / "range.png", (labels * 3).astype(np.uint8))  # values up to 9
    (site / "images" / "notes.txt").write_text("not an image")
    files.write_nifti(site / "labels" / "orphan.nii.gz", labels)
    return site


def test_bad_files_reported_by_name_skipped_and_nothing_modified(tmp_path, caplog, files):
    site_dir = build_bad_site(tmp_path, files)
    before = files.snapshot(site_dir)
    with caplog.at_level(logging.WARNING):
        site = load_site(site_dir, 16)
    assert files.snapshot(site_dir) == before
    assert site.num_patients == 2 and site.images.shape[0] == 2 and site.has_labels
    reasons = {s.path.name: s.reason for s in site.skipped}
    expected = {
        "corrupt.nii.gz": "not a readable NIfTI", "empty.nii.gz": "not a readable NIfTI",
        "nan.nii.gz": "non-finite", "constant.nii.gz": "constant",
        "shape.nii.gz": "labels/shape.nii.gz has shape (12, 16, 1)",
        "range.nii.gz": "labels/range.png holds label value(s) 6, 9 outside the label schema",
        "notes.txt": "no reader", "orphan.nii.gz": "no image of the same name",
    }
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert name.split(".")[0] in reasons[name] and fragment in reasons[name], reasons[name]
        assert any(name.split(".")[0] in record.getMessage() for record in caplog.records)
    assert all(isinstance(s, SkippedFile) and s.path.exists() for s in site.skipped)


def test_nothing_usable_raises_naming_directory_and_reasons(tmp_path):
    site = tmp_path / "empty_site"
    (site / "images").mkdir(parents=True)
    (site / "images" / "bad.nii.gz").write_bytes(b"xx")
    with pytest.raises(SiteDataError) as err:
        load_site(site, 16)
    assert str(site) in str(err.value) and "images/bad.nii.gz" in str(err.value)
    with pytest.raises(SiteDataError, match="no images/ folder"):
        load_site(tmp_path / "nowhere", 16)


def test_an_image_without_label_map_is_skipped_alone_and_the_site_keeps_its_labels(good_site):
    """Issue 13 failure 2: one image without labels used to drop the whole site's labels."""
    (good_site / "labels" / "p1.nii.gz").unlink()
    site = load_site(good_site, 16)
    assert site.has_labels and site.labels.shape[0] == site.images.shape[0] == 5
    assert site.num_patients == 3
    [skipped] = site.skipped
    assert skipped.reason.startswith("images/p1.nii.gz: no label map: expected labels/p1.nii.gz")
    # a recipe that needs no labels may keep the record (and then no labels are used)
    kept = load_site(good_site, 16, need_labels=False)
    assert kept.num_patients == 4 and not kept.has_labels and kept.skipped == []


def test_site_without_labels_folder_loads_unlabelled_with_a_warning(good_site, caplog):
    shutil.rmtree(good_site / "labels")
    with caplog.at_level(logging.WARNING):
        site = load_site(good_site, 16)
    assert site.labels is None and not site.has_labels and site.num_patients == 4
    assert site.skipped == []
    assert any("no label maps are used at this site" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dataset = PatientDataset(site, generator_seed=0)
    assert not dataset.has_labels
    assert any("all-zero placeholder label map" in r.getMessage() for r in caplog.records)


class SeriesFolderReader:
    """A stand-in for a DICOM reader: claims folders, returns several volumes, some grouped.

    ``series:patient[:flat]`` per line; ``flat`` series report the folder itself as their
    source (several series mixed in one folder); every volume carries an embedded label
    map in ``meta["labels"]`` (as a DICOM SEG would).
    """

    name = "fake-series"

    def __init__(self, files):
        self.files = files

    def claims(self, path: Path) -> bool:
        return path.is_dir() and (path / "series.txt").exists()

    def read(self, path: Path):
        out = []
        for line in (path / "series.txt").read_text().split():
            series, patient, *flat = line.split(":")
            if series == "broken":
                out.append(SkippedFile(path / series, "missing slice"))
                continue
            image, labels = self.files.phantom(16, seed=len(out))
            source = path if flat else path / series
            out.append(Volume(image.astype(np.float32)[..., None], None, source,
                              {"patient_key": patient, "labels": labels[..., None]}))
        return out


def test_plugged_in_reader_groups_series_of_one_patient(tmp_path, files):
    folder = tmp_path / "site" / "images" / "export" / "study1"
    folder.mkdir(parents=True)
    (folder / "series.txt").write_text("t1:h1 t2:h1 other:h2 broken:h3 m1:h4:flat m2:h4:flat")
    site = load_site(tmp_path / "site", 16, readers=[SeriesFolderReader(files), *default_readers()])
    # t1+t2 are one patient, other one, m1+m2 (same source folder, both kept) one
    assert site.images.shape[0] == 5 and site.num_patients == 3
    assert sorted(torch.bincount(site.patient_index).tolist()) == [1, 2, 2]
    # the reader says why; the loader names the entry relative to the site folder
    assert [s.reason for s in site.skipped] == ["images/export/study1/broken: missing slice"]
    assert site.has_labels  # from the volumes' embedded segmentations
    disc = torch.from_numpy(files.phantom(16)[1].astype(np.int64))
    assert all(torch.equal(row, disc) for row in site.labels)


def test_dicom_export_of_a_site_loads_like_the_nifti_site(tmp_path, files):
    """Issue 7 acceptance, at the loader: the same site as DICOM series gives the same tensors."""
    from medgen.sim.dicom_export import export_site_as_dicom

    nifti = tmp_path / "nifti"
    for index in range(2):
        image, labels = files.phantom(20, seed=index)
        files.write_nifti(nifti / "images" / f"s{index}.nii.gz", image)
        files.write_nifti(nifti / "labels" / f"s{index}.nii.gz", labels)
    stack = [files.phantom(20, seed=9 + k) for k in range(3)]
    files.write_nifti(nifti / "images" / "vol.nii.gz", np.stack([s[0] for s in stack], -1))
    files.write_nifti(nifti / "labels" / "vol.nii.gz", np.stack([s[1] for s in stack], -1))
    export_site_as_dicom(nifti, tmp_path / "dicom")
    expected = load_site(nifti, 16)
    got = load_site(tmp_path / "dicom", 16)  # the registry's DICOM reader claims the folders
    assert got.skipped == [] and got.num_patients == expected.num_patients == 3
    assert torch.equal(got.images, expected.images) and torch.equal(got.labels, expected.labels)
    assert torch.equal(got.patient_index, expected.patient_index)


# -- one item = one patient ---------------------------------------------------------
def test_patient_dataset_item_is_a_patient_and_draws_its_slices(good_site):
    site = load_site(good_site, 16)
    dataset = PatientDataset(site, generator_seed=1)
    assert len(dataset) == site.num_patients == 4
    volume_patient = int(torch.bincount(site.patient_index).argmax())
    rows = (site.patient_index == volume_patient).nonzero().flatten().tolist()
    drawn = set()
    for _ in range(30):
        image, label = dataset[volume_patient]
        assert image.shape == (1, 16, 16) and label.shape == (16, 16)
        match = [r for r in rows if torch.equal(site.images[r], image)]
        assert len(match) == 1 and torch.equal(site.labels[match[0]], label)
        drawn.add(match[0])
    assert drawn == set(rows)  # every slice of the 3-slice patient is used, and only those
    again = PatientDataset(site, generator_seed=1)
    other = PatientDataset(site, generator_seed=2)
    first = [again[volume_patient][0] for _ in range(12)]
    replay = [PatientDataset(site, generator_seed=1)[volume_patient][0]]
    assert torch.equal(first[0], replay[0])
    assert any(not torch.equal(a, other[volume_patient][0]) for a in first)
    with pytest.raises(IndexError):
        dataset[4]


def test_unlabelled_site_returns_zero_placeholder_labels(good_site):
    shutil.rmtree(good_site / "labels")
    dataset = PatientDataset(load_site(good_site, 16), generator_seed=0)
    assert not dataset.has_labels
    _, label = dataset[0]
    assert label.dtype == torch.int64 and label.shape == (16, 16) and not label.any()


@pytest.mark.parametrize("labelled", [True, False])
def test_poisson_loader_handles_empty_batches(good_site, labelled):
    if not labelled:
        shutil.rmtree(good_site / "labels")
    dataset = PatientDataset(load_site(good_site, 16), generator_seed=0)
    sizes_by_seed = []
    for seed in range(30):
        loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=1),
                                               generator=torch.Generator().manual_seed(seed))
        assert loader.sample_rate == pytest.approx(1 / 4)  # batch / patients
        sizes = []
        for images, labels in loader:
            assert images.shape[1:] == (1, 16, 16) and images.dtype == torch.float32
            assert labels.shape == (images.shape[0], 16, 16) and labels.dtype == torch.int64
            sizes.append(images.shape[0])
        sizes_by_seed.append(sizes)
    # q = 1/4 over 4 patients: P(empty batch) = 0.32; both an empty FIRST batch (collate
    # has no example to copy from) and empty later batches occur across these seeds
    assert any(sizes[0] == 0 for sizes in sizes_by_seed)
    assert any(0 in sizes[1:] for sizes in sizes_by_seed)
    assert any(max(sizes) > 1 for sizes in sizes_by_seed)


# -- public bank and held-out data --------------------------------------------------
def test_public_bank_label_maps_only_resized_nearest(tmp_path, files):
    bank = tmp_path / "public"
    for index in range(3):
        files.write_nifti(bank / "labels" / f"b{index}.nii.gz", files.phantom(20, seed=index)[1])
    files.write_nifti(bank / "labels" / "bad.nii.gz", np.full((20, 20), 5, np.uint8))
    public = load_public_bank(bank, 16)
    assert isinstance(public, PublicData)
    assert public.label_maps.shape == (3, 16, 16) and public.label_maps.dtype == torch.int64
    assert set(public.label_maps.unique().tolist()) == {0, 1, 2, 3}  # nearest: no new values
    files.write_nifti(tmp_path / "badbank" / "labels" / "x.nii.gz", np.full((8, 8), -1, np.int16))
    with pytest.raises(SiteDataError, match="no usable public label maps"):
        load_public_bank(tmp_path / "badbank", 16)


def build_heldout(root: Path, files, sites=("A", "B"), subjects=3) -> Path:
    rng = np.random.default_rng(0)
    for site_index, site in enumerate(sites):
        for subject in range(subjects):
            clean, labels = files.phantom(16, seed=subject)
            clean = clean.astype(np.float32) * (1 + site_index)
            noisy = clean + rng.normal(0, 60, clean.shape).astype(np.float32)
            folder = root / "heldout" / "test" / site
            files.write_nifti(folder / "images" / f"s{subject}.nii.gz", noisy)
            files.write_nifti(folder / "clean" / f"s{subject}.nii.gz", clean)
            files.write_nifti(folder / "labels" / f"s{subject}.nii.gz", labels)
    return root


def test_heldout_clean_uses_its_noisy_images_scaling(tmp_path, files):
    root = build_heldout(tmp_path, files)
    sites = load_heldout(root, "test", 16)
    assert set(sites) == {"A", "B"}
    assert sites["A"].subjects == sites["B"].subjects == ("s0", "s1", "s2")
    site = sites["A"]
    assert site.images.shape == site.clean.shape == (3, 1, 16, 16) and site.labels.shape == (3, 16, 16)
    noisy = np.asarray(nibabel.load(str(root / "heldout/test/A/images/s1.nii.gz")).get_fdata())
    clean = np.asarray(nibabel.load(str(root / "heldout/test/A/clean/s1.nii.gz")).get_fdata())
    low, high = np.percentile(noisy, [0.5, 99.5])
    expected = np.clip(2 * (clean - low) / (high - low) - 1, -1, 1)
    np.testing.assert_allclose(site.clean[1, 0].numpy(), expected, atol=1e-5)
    # the clean rendering's own range would give another picture: the choice matters
    assert not np.allclose(expected, reference_normalise(clean), atol=1e-2)
    # the heldout folder itself is accepted too
    assert load_heldout(root / "heldout", "test", 16)["B"].subjects == ("s0", "s1", "s2")


def test_heldout_subject_without_clean_is_skipped(tmp_path, files):
    root = build_heldout(tmp_path, files, sites=("A",))
    (root / "heldout/test/A/clean/s2.nii.gz").unlink()
    site = load_heldout(root, "test", 16)["A"]
    assert site.subjects == ("s0", "s1")
    assert len(site.skipped) == 1 and "s2" in site.skipped[0].reason and "clean" in site.skipped[0].reason
    with pytest.raises(SiteDataError, match="no held-out split 'fit'"):
        load_heldout(root, "fit", 16)


def test_heldout_clean_in_other_units_than_images_is_flagged(tmp_path, caplog, files):
    root = build_heldout(tmp_path, files, sites=("A",))
    for path in (root / "heldout/test/A/clean").iterdir():  # clean rescaled to [0, 1]
        array = nibabel.load(str(path)).get_fdata()
        files.write_nifti(path, (array / array.max()).astype(np.float32))
    with caplog.at_level(logging.WARNING):
        load_heldout(root, "test", 16)
    assert any("other units than images" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_heldout(build_heldout(tmp_path / "ok", files, sites=("A",)), "test", 16)
    assert not any("other units" in r.getMessage() for r in caplog.records)
