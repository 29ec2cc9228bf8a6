"""The corpus of item 4: real voxels written as DICOM, shuffled and damaged on purpose."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from medgen.data.dicom import DicomReadOptions, DicomSeriesReader
from medgen.data.readers import SkippedFile, Volume
from medgen.sim.dicom_export import PHI, mni_t1_volume, real_ct_hu

from conftest import tree_digest


def read_all(root, **options):
    """Volumes by folder name; skipped entries named as the site loader names them
    (the reader's reason says why, the path relative to the folder read says where)."""
    items = list(DicomSeriesReader(DicomReadOptions(**options)).read(root))
    volumes = {v.source.name: v for v in items if isinstance(v, Volume)}
    skipped = [SkippedFile(s.path, f"{s.path.relative_to(root).as_posix()}: {s.reason}")
               for s in items if isinstance(s, SkippedFile)]
    return volumes, skipped


def test_volumes_in_geometric_order_with_exact_values_and_spacing(corpus):
    root, series = corpus
    volumes, _ = read_all(root)
    usable = {name for name, s in series.items() if not s.problem}
    assert set(volumes) == usable
    for name in usable:
        got, want = volumes[name], series[name]
        expected = want.expected.reshape(got.array.shape)
        np.testing.assert_array_equal(got.array, expected, err_msg=name)
        assert got.spacing == pytest.approx(want.spacing), name
        assert got.meta["modality"] == want.modality


def test_values_match_the_source_voxels_within_quantisation(corpus):
    root, _ = corpus
    volumes, _ = read_all(root)
    mni, _ = mni_t1_volume()
    # slope 0.25: stored values are exact for the integer MNI intensities
    np.testing.assert_allclose(volumes["mni_t1"].array, mni, atol=0.125)
    ct, _ = real_ct_hu()
    assert volumes["ct_head"].meta["units"] == "HU"
    np.testing.assert_array_equal(volumes["ct_head"].array, ct.astype(np.float32))
    assert volumes["ct_head"].array.min() < -800 and volumes["ct_head"].array.max() > 500  # air/bone HU


def test_file_names_are_shuffled_so_order_cannot_come_from_names(corpus):
    root, series = corpus
    files = series["mni_t1"].files  # in slice order
    assert files != sorted(files)


def test_compressed_series_decode_to_the_uncompressed_values(corpus):
    root, _ = corpus
    volumes, _ = read_all(root)
    np.testing.assert_array_equal(volumes["mni_rle"].array, volumes["mni_t1"].array)
    np.testing.assert_array_equal(volumes["mni_j2k"].array, volumes["mni_t1"].array[:, :, :8])


def test_monochrome1_is_inverted_back(corpus):
    import pydicom

    root, series = corpus
    volumes, _ = read_all(root)
    ds = pydicom.dcmread(root / series["dx_mono1"].files[0])
    raw = ds.pixel_array.astype(np.float32)
    mni, _ = mni_t1_volume()
    original = mni[:, :, mni.shape[2] // 2].astype(np.float32)
    assert not np.array_equal(raw, original)  # stored mirrored: a reader that ignores it fails
    np.testing.assert_array_equal(volumes["dx_mono1"].array[:, :, 0], original)


@pytest.mark.parametrize("name, words", [
    ("missing_slice", ["missing slice", "12.00 mm", "6.00 mm"]),
    ("corrupt_file", ["truncated"]),
    ("duplicate_slice", ["duplicate", "_copy"]),
    ("burned_in", ["BurnedInAnnotation=YES"]),
])
def test_every_problem_is_reported_with_its_reason(corpus, name, words):
    root, _ = corpus
    _, skipped = read_all(root)
    reasons = [s.reason for s in skipped if s.reason.startswith(name)]
    assert reasons, f"{name} not reported"
    text = " ".join(reasons)
    for word in words:
        assert word in text


def test_corrupt_file_is_named(corpus):
    root, series = corpus
    _, skipped = read_all(root)
    corrupt = series["corrupt_file"].files[3]
    assert any(s.reason.startswith(corrupt) and "truncated" in s.reason for s in skipped)
    assert any(s.reason.startswith("README.txt") and "not a DICOM" in s.reason for s in skipped)


def test_burned_in_read_only_when_allowed(corpus):
    root, _ = corpus
    volumes, _ = read_all(root, allow_burned_in=True)
    assert "burned_in" in volumes


def test_no_identifier_reaches_volumes_reasons_or_logs(corpus, caplog):
    import pydicom

    root, series = corpus
    caplog.set_level(logging.DEBUG)
    volumes, skipped = read_all(root)
    ds = pydicom.dcmread(root / series["phi"].files[0], stop_before_pixels=True)
    secrets = [str(v) for v in PHI.values()] + [ds.SeriesInstanceUID, ds.StudyInstanceUID,
                                                ds.SOPInstanceUID, "Synthetic^Subject", "SYNTH-0001"]
    text = repr([(v.meta, v.spacing) for v in volumes.values()]) + repr(skipped) + caplog.text
    for secret in secrets:
        assert secret not in text
    assert "phi" in volumes  # the PHI series itself is usable: headers never leave the reader


def test_series_of_one_patient_share_a_patient_key(corpus):
    root, _ = corpus
    volumes, _ = read_all(root)
    # every corpus series but 'phi' was written with the same synthetic PatientID
    keys = {name: v.meta["patient_key"] for name, v in volumes.items()}
    assert keys["mni_t1"] == keys["ct_head"] == keys["mni_rle"]
    assert keys["phi"] != keys["mni_t1"]
    assert DicomSeriesReader()._salt != DicomSeriesReader()._salt  # unlinkable across readers


def test_nothing_on_disk_is_modified(corpus):
    from medgen.data.data_check import main

    root, _ = corpus
    before = tree_digest(root)
    read_all(root)
    read_all(root, allow_burned_in=True, window=(40.0, 80.0), in_plane_spacing_mm=3.0)
    main([str(root), "--json"])
    assert tree_digest(root) == before
