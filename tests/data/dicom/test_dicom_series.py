"""Grouping and ordering by geometry; missing, duplicate and inconsistent slices."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medgen.data.dicom import DicomSeriesReader, group_series, scan_folder
from medgen.data.readers import SkippedFile, Volume
from medgen.sim.dicom_export import write_series


def ramp(rows=8, cols=6, slices=5):
    # every slice differs, so any misordering shows
    return np.arange(rows * cols * slices, dtype=np.float64).reshape(rows, cols, slices)


def series_of(folder):
    return group_series(scan_folder(folder))


def test_order_follows_position_not_instance_number(tmp_path):
    volume = ramp()
    # positions DEcrease with the instance number: geometry must win
    write_series(volume, (1.0, 1.0, -2.0), tmp_path / "s", seed=1)
    [series] = series_of(tmp_path)
    assert series.usable and series.spacing == pytest.approx((1.0, 1.0, 2.0))
    [vol] = [v for v in DicomSeriesReader().read(tmp_path / "s") if isinstance(v, Volume)]
    np.testing.assert_array_equal(vol.array, volume[:, :, ::-1].astype(np.float32))


def test_oblique_series_sorted_along_its_normal(tmp_path):
    volume = ramp(slices=4)
    files = write_series(volume, (1.0, 1.0, 1.0), tmp_path, seed=2, shuffle_names=False)
    # tilt every slice the same way; positions step along the tilted normal
    c, s = np.cos(0.3), np.sin(0.3)
    row, col = np.array([1, 0, 0]), np.array([0, c, s])
    normal = np.cross(row, col)
    order = [2, 0, 3, 1]  # positions not in file order
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [*row.tolist(), *col.tolist()]
        ds.ImagePositionPatient = (np.array([5.0, -3.0, 7.0]) + 1.5 * order[k] * normal).tolist()
        ds.save_as(path)
    [series] = series_of(tmp_path)
    assert series.usable, series.problems
    assert series.spacing[2] == pytest.approx(1.5)
    assert [ref.relpath for ref in series.slices] == [files[order.index(i)].name for i in range(4)]


def test_missing_slice_reported_with_gap(tmp_path):
    files = write_series(ramp(slices=6), (1.0, 1.0, 3.0), tmp_path, seed=3)
    files[2].unlink()
    [series] = series_of(tmp_path)
    assert not series.usable
    assert "missing slice" in series.problems[0] and "6.00 mm" in series.problems[0]


def test_duplicate_position_reported(tmp_path):
    files = write_series(ramp(slices=4), (1.0, 1.0, 1.0), tmp_path, seed=4)
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()  # another image at the same place
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(files[1].with_name("other"))
    [series] = series_of(tmp_path)
    assert any("two images at the same position" in p for p in series.problems)


@pytest.mark.parametrize("attribute, value, word", [
    ("ImageOrientationPatient", [0, 1, 0, 0, 0, -1], "ImageOrientationPatient"),
    ("PixelSpacing", [0.5, 0.5], "PixelSpacing"),
])
def test_inconsistent_geometry_refused(tmp_path, attribute, value, word):
    files = write_series(ramp(slices=4), (1.0, 1.0, 1.0), tmp_path, seed=5)
    ds = pydicom.dcmread(files[2])
    setattr(ds, attribute, value)
    ds.save_as(files[2])
    [series] = series_of(tmp_path)
    assert not series.usable and any(word in p and files[2].name in p for p in series.problems)


def test_inconsistent_size_refused(tmp_path):
    write_series(ramp(slices=3), (1.0, 1.0, 1.0), tmp_path / "a", seed=6)
    write_series(ramp(rows=4, slices=3), (1.0, 1.0, 1.0), tmp_path / "b", seed=6)  # same UIDs
    [series] = series_of(tmp_path)
    assert any("inconsistent image size" in p for p in series.problems)


def test_two_series_in_one_folder_are_separated(tmp_path):
    write_series(ramp(slices=3), (1.0, 1.0, 1.0), tmp_path, seed=7)
    write_series(ramp(slices=4) + 1000, (1.0, 1.0, 1.0), tmp_path, seed=8)
    all_series = series_of(tmp_path)
    assert sorted(len(s.slices) for s in all_series) == [3, 4]
    items = list(DicomSeriesReader().read(tmp_path))
    assert sorted(v.array.shape[2] for v in items if isinstance(v, Volume)) == [3, 4]


def test_series_files_cover_every_file(tmp_path):
    files = write_series(ramp(slices=5), (1.0, 1.0, 1.0), tmp_path, seed=9)
    [series] = series_of(tmp_path)
    assert series.files == sorted(p.name for p in files)
    [vol] = [v for v in DicomSeriesReader().read(tmp_path) if isinstance(v, Volume)]
    assert vol.meta["file_count"] == len(files)


def test_images_without_geometry_are_not_stacked(tmp_path):
    files = write_series(ramp(slices=3), (1.0, 1.0, 1.0), tmp_path, seed=10)
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        del ds.ImageOrientationPatient
        ds.save_as(path)
    items = list(DicomSeriesReader().read(tmp_path))
    assert not any(isinstance(v, Volume) for v in items)
    assert any(isinstance(s, SkippedFile) and "without slice geometry" in s.reason for s in items)
