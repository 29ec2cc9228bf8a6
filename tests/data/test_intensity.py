"""Intensity maps and write-back: HU survive normalisation, NIfTI and DICOM exactly."""

import gzip

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from medgen.data.intensity import (PercentileMap, WindowMap, intensity_map,
                                   intensity_map_from_dict)
from medgen.data.manifest import DatasetManifest, IntensityPolicy
from medgen.data.dicom_writer import write_physical_dicom
from medgen.data.nifti_io import read_physical_nifti, write_physical_nifti

WINDOW = (-1000.0, 2000.0)


def _head_like_hu(shape=(24, 20, 3), seed=0) -> np.ndarray:
    """Integer HU covering air, fat, brain and bone (what a CT site stores)."""
    rng = np.random.default_rng(seed)
    tissue = rng.choice([-1000, -80, 8, 25, 40, 1200], size=shape)
    return (tissue + rng.normal(0, 20, shape)).round().clip(-1000, 2000)


def test_window_round_trip_is_exact_for_every_integer_hu_in_the_window():
    window = WindowMap(*WINDOW)
    hu = np.arange(-1000, 2001, dtype=np.float64)
    normalised = window.forward(hu)
    assert normalised.dtype == np.float32 and normalised.min() == -1 and normalised.max() == 1
    assert np.array_equal(np.rint(window.inverse(normalised)), hu)
    assert np.abs(window.inverse(normalised) - hu).max() <= window.step  # float32 rounding


def test_window_clips_outside_and_ignores_the_volume():
    window = intensity_map(IntensityPolicy("HU", "window", WINDOW))
    assert window.forward(np.array([-1500.0, 2500.0])).tolist() == [-1.0, 1.0]
    other = intensity_map(IntensityPolicy("HU", "window", WINDOW), volume=np.ones(4) * 300)
    assert other == window  # the same window for every volume: HU mean one thing


def test_percentile_map_is_fitted_per_volume_and_inverts():
    rng = np.random.default_rng(1)
    volume = rng.gamma(2.0, 100.0, size=(16, 16, 5))
    volume[:, :, 0] *= 3.0  # one bright slice: a per-slice map would flatten it
    fitted = intensity_map(DatasetManifest.default_brain().intensity, volume)
    assert isinstance(fitted, PercentileMap)
    assert (fitted.lo, fitted.hi) == tuple(np.percentile(volume, (0.5, 99.5)))
    inside = volume[(volume > fitted.lo) & (volume < fitted.hi)]
    assert np.allclose(fitted.inverse(fitted.forward(inside)), inside, rtol=0, atol=1e-3)
    slice_means = fitted.forward(volume).mean(axis=(0, 1))
    assert slice_means[0] > slice_means[1:].max()  # through-plane contrast kept
    again = intensity_map_from_dict(fitted.to_dict())
    assert again == fitted


def test_hu_through_window_and_int16_nifti_round_trip(tmp_path):
    hu = _head_like_hu()
    window = WindowMap(*WINDOW)
    generated = window.forward(hu)  # what a recipe's sampler would hand back
    path = write_physical_nifti(tmp_path / "gen.nii.gz", window.inverse(generated),
                                (0.9, 0.9, 3.0), "HU")
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.int16
    raw = gzip.decompress(path.read_bytes())
    assert np.frombuffer(raw[112:120], "<f4").tolist() == [1.0, 0.0]  # scl_slope, scl_inter
    back, spacing = read_physical_nifti(path)
    assert np.array_equal(back, hu) and np.allclose(spacing, (0.9, 0.9, 3.0))


def test_hu_written_as_dicom_reads_back_through_the_modality_lut(tmp_path):
    hu = _head_like_hu() + np.random.default_rng(2).uniform(-0.4, 0.4, (24, 20, 3))
    hu[0, 0, 0] = -1024.0  # scanner air floor
    files = write_physical_dicom(tmp_path / "series", hu, (0.9, 0.9, 3.0), modality="CT",
                                 units="HU", seed=3, window=WINDOW)
    assert [f.name for f in files] == ["slice_0001.dcm", "slice_0002.dcm", "slice_0003.dcm"]
    datasets = [pydicom.dcmread(f) for f in files]
    assert {ds.Modality for ds in datasets} == {"CT"} and datasets[0].RescaleType == "HU"
    assert float(datasets[0].RescaleIntercept) == -1024.0 and float(datasets[0].RescaleSlope) == 1.0
    read = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in datasets], axis=-1)
    assert np.abs(read - hu).max() <= 0.5 + 1e-9  # within 1 HU: rounding only
    again = write_physical_dicom(tmp_path / "again", hu, (0.9, 0.9, 3.0), modality="CT",
                                 units="HU", seed=3, window=WINDOW)
    assert [f.read_bytes() for f in again] == [f.read_bytes() for f in files]  # deterministic


def test_arbitrary_units_as_dicom_keep_their_range(tmp_path):
    mr = np.random.default_rng(4).uniform(12.0, 950.0, (16, 16))
    (path,) = write_physical_dicom(tmp_path / "mr", mr, (1.0, 1.0), modality="MR",
                                   units="arbitrary")
    ds = pydicom.dcmread(path)
    step = float(ds.RescaleSlope)
    assert np.abs(apply_modality_lut(ds.pixel_array, ds) - mr).max() <= step / 2 + 1e-9


def test_out_of_range_hu_is_refused_not_wrapped():
    with pytest.raises(ValueError, match="int16"):
        write_physical_nifti("/nonexistent/x.nii.gz", np.array([40000.0]), (1.0,), "HU")
