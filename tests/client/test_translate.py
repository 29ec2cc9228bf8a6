"""`medgen translate`: formats in = formats out, geometry and headers kept, never in place."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.atomic import atomic_write_text
from medgen.client.translate import Translator, _unsquare, main
from medgen.data.site_data import square_resize
from medgen.config import RunConfig
from medgen.models.registry import build_recipe
from medgen.server.checkpoint import new_checkpoint, save_checkpoint

SIZE = 16


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """An (untrained) bridge-translate run directory and a public label folder."""
    root = tmp_path_factory.mktemp("translate")
    config = RunConfig(recipe="bridge-translate", image_size=SIZE, sites="A,B", run_dir=str(root / "run"),
                       options={"gen-width": 4, "disc-width": 4, "noise-dim": 8, "style-samples": 4})
    recipe = build_recipe(config)
    model = recipe.build()
    run_dir = root / "run"
    run_dir.mkdir()
    atomic_write_text(run_dir / "config.toml", config.to_toml())
    save_checkpoint(run_dir, new_checkpoint(recipe.shared_state(model), 1, config, "test"))
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[3:13, 3:13], labels[5:11, 5:11], labels[7:9, 7:9] = 1, 2, 3
    for i in range(3):
        path = root / "public" / "labels" / f"p{i}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.roll(labels, i, axis=0), np.eye(4)), str(path))
    return run_dir, root / "public"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_unsquare_inverts_square_resize_geometry():
    yy, xx = np.mgrid[:20, :12]
    image = np.tanh(((yy - 8) ** 2 + (xx - 4) ** 2) / 30.0 - 1.0)[..., None].astype(np.float32)
    square = square_resize(image, 40, (1.0, 1.0, 1.0), "image")  # padded to 20x20, enlarged
    back = _unsquare(square[:, None], (20, 12), (1.0, 1.0, 1.0))[0].numpy()
    assert back.shape == (20, 12)
    error = np.abs(back - image[..., 0]).mean()
    assert error < 0.05  # a resize round trip of a smooth image, aligned
    assert error < 0.3 * np.abs(np.roll(back, 2, axis=1) - image[..., 0]).mean()  # not shifted


def test_nifti_in_nifti_out_with_affine_and_header(run, tmp_path):
    run_dir, public = run
    affine = np.array([[0.0, -1.2, 0, 10], [1.1, 0, 0, -5], [0, 0, 3.0, 2], [0, 0, 0, 1]])
    volume = np.random.default_rng(1).integers(0, 4000, (20, 18, 3)).astype(np.int16)
    volume[..., 2] = 7  # a constant slice: passed through as is
    source = tmp_path / "in" / "patient.nii.gz"
    source.parent.mkdir()
    image = nib.Nifti1Image(volume, affine)
    image.header["descrip"] = b"hospital scan"
    nib.save(image, str(source))
    before = digest(source)
    out = tmp_path / "out"
    assert main([str(source.parent), "--run-dir", str(run_dir), "--public", str(public),
                 "--source-site", "A", "--target-site", "B", "--out", str(out)]) == 0
    result = nib.load(str(out / "patient.nii.gz"))
    assert digest(source) == before  # input untouched
    assert result.shape == volume.shape
    assert np.allclose(result.affine, affine)
    assert result.header.get_zooms() == pytest.approx(image.header.get_zooms())
    assert result.header["descrip"].tobytes().startswith(b"hospital scan")
    data = np.asarray(result.dataobj)
    assert data.dtype == np.float32 and np.isfinite(data).all()
    assert np.all(data[..., 2] == 7)
    lo, hi = np.percentile(volume[..., 0], [0.5, 99.5])  # mapped back onto the slice's own range
    assert lo - 1e-3 <= data[..., 0].min() and data[..., 0].max() <= hi + 1e-3
    # never overwrites, never writes next to its input
    assert main([str(source), "--run-dir", str(run_dir), "--public", str(public),
                 "--source-site", "A", "--target-site", "B", "--out", str(out)]) == 2
    assert main([str(source), "--run-dir", str(run_dir), "--public", str(public),
                 "--source-site", "A", "--target-site", "B", "--out", str(source.parent)]) == 2


def test_dicom_in_dicom_out_keeps_headers(run, tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    run_dir, public = run
    source = tmp_path / "in" / "slice.dcm"
    source.parent.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), source)
    before = digest(source)
    original = pydicom.dcmread(str(source))
    out = tmp_path / "out"
    assert main([str(source), "--run-dir", str(run_dir), "--public", str(public),
                 "--source-site", "A", "--target-site", "B", "--out", str(out)]) == 0
    result = pydicom.dcmread(str(out / "slice.dcm"))
    assert digest(source) == before
    assert result.pixel_array.shape == original.pixel_array.shape
    assert result.pixel_array.dtype == original.pixel_array.dtype
    assert not np.array_equal(result.pixel_array, original.pixel_array)
    for keyword in ("PatientID", "StudyInstanceUID", "PixelSpacing", "ImageOrientationPatient",
                    "ImagePositionPatient", "Rows", "Columns"):
        assert result.get(keyword) == original.get(keyword), keyword
    assert result.SOPInstanceUID != original.SOPInstanceUID
    assert result.SeriesInstanceUID != original.SeriesInstanceUID
    assert "translated to B" in result.SeriesDescription


def test_bad_arguments_are_clear_errors(run, tmp_path, capsys):
    run_dir, public = run
    assert main([str(tmp_path / "missing.nii.gz"), "--run-dir", str(run_dir), "--public", str(public),
                 "--source-site", "A", "--target-site", "B", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a site of this run"):
        Translator(run_dir, public, "A", "Z")
