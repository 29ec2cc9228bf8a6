"""Readers: each format's voxels come back exactly, and bad files raise a clear ReaderError."""

from __future__ import annotations

import nibabel
import numpy as np
import pytest

from medgen.data.readers import (NiftiReader, PngReader, ReaderError, Volume, default_readers,
                                   find_reader)


def test_nifti_2d_and_3d_voxels_and_spacing(tmp_path, files):
    rng = np.random.default_rng(0)
    flat = rng.integers(0, 4000, (12, 10)).astype(np.int16)
    vol = rng.normal(size=(12, 10, 5)).astype(np.float32)
    a = NiftiReader().read(files.write_nifti(tmp_path / "a.nii.gz", flat, spacing=(0.5, 0.7)))
    b = NiftiReader().read(files.write_nifti(tmp_path / "b.nii", vol, spacing=(1.0, 2.0, 3.0)))
    assert a.array.shape == (12, 10, 1) and a.array.dtype == np.float32
    np.testing.assert_array_equal(a.array[..., 0], flat)
    assert a.spacing[:2] == pytest.approx((0.5, 0.7))
    np.testing.assert_array_equal(b.array, vol)
    assert b.spacing == pytest.approx((1.0, 2.0, 3.0))
    assert isinstance(a, Volume) and a.source.name == "a.nii.gz"


def test_nifti_scale_factors_are_applied(tmp_path):
    stored = np.arange(20, dtype=np.int16).reshape(4, 5)
    image = nibabel.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(2.5, -3.0)
    nibabel.save(image, str(tmp_path / "s.nii.gz"))
    got = NiftiReader().read(tmp_path / "s.nii.gz").array[..., 0]
    np.testing.assert_allclose(got, stored * 2.5 - 3.0)


def test_trailing_singleton_axes_dropped_but_4d_refused(tmp_path, files):
    ok = NiftiReader().read(files.write_nifti(tmp_path / "ok.nii.gz", np.ones((6, 5, 3, 1), np.float32)))
    assert ok.array.shape == (6, 5, 3)
    with pytest.raises(ReaderError, match="4 dimensions"):
        NiftiReader().read(files.write_nifti(tmp_path / "t.nii.gz", np.ones((6, 5, 3, 2), np.float32)))


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 40])
def test_corrupt_or_empty_nifti_raises_reader_error(tmp_path, content):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ReaderError, match="not a readable NIfTI"):
        NiftiReader().read(path)


def test_complex_nifti_refused(tmp_path, files):
    path = files.write_nifti(tmp_path / "c.nii.gz", np.ones((4, 4), np.complex64))
    with pytest.raises(ReaderError, match="not a real number type"):
        NiftiReader().read(path)


def test_png_16bit_gray_exact_and_gray_rgb_accepted(tmp_path, files):
    sixteen = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000)
    got = PngReader().read(files.write_png(tmp_path / "g.png", sixteen)).array
    np.testing.assert_array_equal(got[..., 0], sixteen)
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_array_equal(PngReader().read(files.write_png(tmp_path / "rgb.png", rgb)).array[..., 0], gray)


def test_colour_png_and_non_png_bytes_refused(tmp_path, files):
    colour = np.zeros((6, 8, 3), np.uint8)
    colour[..., 0] = 200
    with pytest.raises(ReaderError, match="colour PNG"):
        PngReader().read(files.write_png(tmp_path / "c.png", colour))
    (tmp_path / "fake.png").write_bytes(b"not a png")
    with pytest.raises(ReaderError, match="not a readable PNG"):
        PngReader().read(tmp_path / "fake.png")


def test_registry_claims_by_suffix_and_ignores_others(tmp_path):
    readers = default_readers()
    assert [r.name for r in readers][:2] == ["nifti", "png"]
    for name, expected in [("x.nii.gz", "nifti"), ("X.NII", "nifti"), ("y.png", "png")]:
        (tmp_path / name).write_bytes(b"")
        assert find_reader(tmp_path / name, readers).name == expected
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "folder").mkdir()
    assert find_reader(tmp_path / "notes.txt", readers) is None
    assert find_reader(tmp_path / "folder", readers) is None
