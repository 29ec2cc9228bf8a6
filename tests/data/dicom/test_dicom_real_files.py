"""The real DICOM files pydicom and pydicom-data ship: multi-frame, compressed, LUTs, MONOCHROME1."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medgen.data.dicom import (DicomReadOptions, DicomSeriesReader, PixelOptions, decode_series,
                               group_series, scan_folder)
from medgen.data.readers import SkippedFile, Volume

from conftest import tree_digest


def read_one(name, **options):
    items = list(DicomSeriesReader(DicomReadOptions(**options)).read(Path(get_testdata_file(name))))
    volumes = [v for v in items if isinstance(v, Volume)]
    skipped = [s for s in items if isinstance(s, SkippedFile)]
    return (volumes[0] if volumes else None), skipped


def decode_one(name) -> np.ndarray:
    """The pixels of one file's series, decoded whatever kind of object it is."""
    path = Path(get_testdata_file(name))
    [series] = group_series(scan_folder(path.parent, only=[path]))
    array, problems = decode_series(path.parent, series, PixelOptions())
    assert not problems
    return array


def test_enhanced_ct_functional_groups():
    vol, skipped = read_one("eCT_Supplemental.dcm")
    assert not skipped
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    pvt = shared.PixelValueTransformationSequence[0]
    hu = ds.pixel_array.astype(np.float64) * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert z == [-159.0, -149.0]
    # row (-1,0,0) x column (0,1,0) = (0,0,-1): increasing position along the normal is
    # decreasing z, so frame 2 (z=-149) comes first
    np.testing.assert_array_equal(vol.array[:, :, 0], hu[1].astype(np.float32))
    np.testing.assert_array_equal(vol.array[:, :, 1], hu[0].astype(np.float32))
    assert vol.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    assert vol.meta["units"] == "HU" and vol.array.min() == -1024


@pytest.mark.parametrize("reference, compressed", [
    ("MR_small.dcm", "MR_small_RLE.dcm"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
    ("MR_small.dcm", "MR_small_bigendian.dcm"),
    ("emri_small.dcm", "emri_small_RLE.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
    ("693_UNCR.dcm", "693_J2KR.dcm"),
    ("JPEG2000_UNC.dcm", "JPEG2000.dcm"),
])
def test_compressed_decodes_to_uncompressed(reference, compressed):
    ref, got = decode_one(reference), decode_one(compressed)
    if compressed == "JPEG2000.dcm":  # lossy J2K: close, not equal
        assert np.abs(got - ref).mean() < 2.0
    else:
        np.testing.assert_array_equal(got, ref)
    assert got.shape[2] == (10 if reference.startswith("emri") else 1)
    # the reader trains on acquisitions only: the JPEG 2000 pair are NM secondary captures
    volume, skipped = read_one(compressed)
    if reference == "JPEG2000_UNC.dcm":
        assert volume is None and "secondary capture" in skipped[0].reason
    else:
        assert volume is not None and not skipped


def test_modality_lut_sequence_matches_a_manual_lookup():
    ds = pydicom.dcmread(get_testdata_file("mlut_18.dcm"))
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.float64)
    stored = ds.pixel_array.astype(np.int64)
    expected = lut[np.clip(stored - first, 0, (entries or 65536) - 1)]
    array = decode_one("mlut_18.dcm")   # a secondary capture: decoded here, never trained on
    assert not np.array_equal(expected, stored)  # the LUT really changes values
    np.testing.assert_array_equal(array[:, :, 0], expected.astype(np.float32))


def test_file_voi_lut_applied_on_request():
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(get_testdata_file("vlut_04.dcm"))
    reference = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    path = Path(get_testdata_file("vlut_04.dcm"))   # a secondary capture: decoded directly
    [series] = group_series(scan_folder(path.parent, only=[path]))
    plain, _ = decode_series(path.parent, series, PixelOptions())
    voi, _ = decode_series(path.parent, series, PixelOptions(file_voi=True))
    assert not np.array_equal(plain, voi)
    np.testing.assert_allclose(voi[:, :, 0], reference.astype(np.float32))


def test_monochrome1_radiograph_inverted():
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "RescaleSlope" not in ds
    hi = 2 ** int(ds.BitsStored) - 1
    vol, _ = read_one("RG1_UNCR.dcm")
    np.testing.assert_array_equal(vol.array[:, :, 0], (hi - ds.pixel_array.astype(np.float64)).astype(np.float32))
    compressed, _ = read_one("RG1_J2KR.dcm")
    np.testing.assert_array_equal(compressed.array, vol.array)


def test_ct_window_clips_in_hounsfield_units():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    vol, _ = read_one("CT_small.dcm", window=(40.0, 80.0))
    np.testing.assert_array_equal(vol.array[:, :, 0], np.clip(hu, 0, 80).astype(np.float32))


def test_colour_and_truncated_files_refused_with_reason():
    vol, skipped = read_one("US1_UNCR.dcm")
    assert vol is None and "not greyscale" in skipped[0].reason
    vol, skipped = read_one("MR_truncated.dcm")
    assert vol is None and any("truncated" in s.reason and s.path.name == "MR_truncated.dcm"
                               for s in skipped)


def test_real_multi_slice_ct_from_dicomdir_tests():
    root = Path(os.path.dirname(get_testdata_file("DICOMDIR")))
    before = tree_digest(root / "98892001")
    items = list(DicomSeriesReader().read(root / "98892001" / "CT5N"))
    [vol] = [v for v in items if isinstance(v, Volume)]
    z = sorted(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
               for p in (root / "98892001" / "CT5N").iterdir())
    assert vol.array.shape == (16, 16, 5) and vol.spacing[2] == pytest.approx(np.diff(z).mean())
    first = next(p for p in (root / "98892001" / "CT5N").iterdir()
                 if float(pydicom.dcmread(p).ImagePositionPatient[2]) == z[0])
    ds = pydicom.dcmread(first)
    np.testing.assert_array_equal(vol.array[:, :, 0],
                                  (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.float32))
    # the scout/localizer series next door mixes orientations and is refused
    mixed = list(DicomSeriesReader().read(root / "98892001" / "CT2N"))
    assert any(isinstance(s, SkippedFile) and "ImageOrientationPatient" in s.reason for s in mixed)
    assert tree_digest(root / "98892001") == before


def test_dicom_seg_aligned_with_its_image_series_by_position(tmp_path):
    import shutil

    from medgen.sim.dicom_export import write_series

    seg = pydicom.dcmread(get_testdata_file("liver.dcm"))
    referenced = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    # an image series on the SEG's grid with two extra slices below it; its UID is the
    # one the SEG references (the real CT is not shipped)
    volume = np.arange(5, dtype=np.float64)[None, None, :] * np.ones((512, 512, 1))
    files = write_series(volume, (0.810547, 0.810547, 1.0), tmp_path, seed=11,
                         origin=(-235.2, -226.8, -130.69))
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = referenced
        ds.save_as(path)
    shutil.copyfile(get_testdata_file("liver.dcm"), tmp_path / "seg")
    [vol] = [v for v in DicomSeriesReader().read(tmp_path) if isinstance(v, Volume)]
    labels = vol.meta["labels"]
    assert labels.shape == vol.array.shape
    assert not labels[:, :, :2].any()
    for k in range(3):  # SEG frame k (z = -128.69 + k) -> image slice k + 2, segment 1
        np.testing.assert_array_equal(labels[:, :, k + 2], seg.pixel_array[k].astype(np.int64))
