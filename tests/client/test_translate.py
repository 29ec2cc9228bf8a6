"""`medgen translate`: a site folder read through medgen.data, written back in physical units.

Real files end to end: a CT site made of pydicom-data's CT voxels (HU through their modality
LUT) written as a DICOM series by data/dicom_writer.py, a CT NIfTI site in int16 HU, an MR
NIfTI site. The identity check runs the translation path with an identity network at the
images' own size: what comes out is the input in HU exactly (the window's inverse map),
read back through pydicom's modality LUT.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from medgen.atomic import atomic_write_text
from medgen.client.cli import main as client_main
from medgen.client.translate import Translator, _unsquare, main, translate_site
from medgen.config import RunConfig
from medgen.data.dicom_writer import write_physical_dicom
from medgen.data.nifti_io import read_physical_nifti, write_physical_nifti
from medgen.data.site_data import load_site, square_resize
from medgen.models.registry import build_recipe
from medgen.server.checkpoint import new_checkpoint, save_checkpoint

SIZE = 16
CT_TOML = """[dataset]
modality = "CT"
dims = 2

[intensity]
units = "HU"
normalisation = "window"
window = [-1000, 2000]

[labels]
none = true
"""
MR_TOML = """[dataset]
modality = "MR"

[intensity]
units = "arbitrary"
normalisation = "percentile"
percentiles = [0.5, 99.5]

[labels]
none = true
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


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


def ct_hu() -> tuple[np.ndarray, tuple[float, float, float]]:
    """Real CT voxels in HU (pydicom-data CT_small.dcm through its modality LUT), 3 slices."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), np.float64)
    volume = np.stack([hu, hu[::-1], np.roll(hu, 9, axis=1)], axis=-1)
    row, col = (float(v) for v in ds.PixelSpacing)
    return np.rint(volume), (row, col, float(ds.SliceThickness))


@pytest.fixture
def ct_dicom_site(tmp_path) -> tuple[Path, np.ndarray]:
    site = tmp_path / "ct-site"
    hu, spacing = ct_hu()
    write_physical_dicom(site / "images" / "patient1", hu, spacing, modality="CT", units="HU",
                         seed=3, window=(-1000, 2000), description="hospital CT")
    (site / "dataset.toml").write_text(CT_TOML)
    return site, hu


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_series_hu(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    files = sorted(folder.glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([np.asarray(apply_modality_lut(d.pixel_array, d), np.float64) for d in datasets], -1)
    return hu, datasets


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def test_unsquare_inverts_square_resize_geometry():
    yy, xx = np.mgrid[:20, :12]
    image = np.tanh(((yy - 8) ** 2 + (xx - 4) ** 2) / 30.0 - 1.0)[..., None].astype(np.float32)
    square = square_resize(image, 40, (1.0, 1.0, 1.0), "image")  # padded to 20x20, enlarged
    back = _unsquare(square[:, None], (20, 12), (1.0, 1.0, 1.0))[0].numpy()
    assert back.shape == (20, 12)
    error = np.abs(back - image[..., 0]).mean()
    assert error < 0.05  # a resize round trip of a smooth image, aligned
    assert error < 0.3 * np.abs(np.roll(back, 2, axis=1) - image[..., 0]).mean()  # not shifted


def test_ct_dicom_identity_path_preserves_hu_through_the_modality_lut(ct_dicom_site, tmp_path):
    site, hu = ct_dicom_site
    assert -1000 <= hu.min() and hu.max() <= 2000  # inside the window: nothing clipped
    before = digests(site)
    out = tmp_path / "out"
    written = translate_site(site, out, identity, size=hu.shape[0], target="B")
    assert digests(site) == before  # input never modified
    assert written == [out / "images" / "patient1"]
    back, datasets = read_series_hu(out / "images" / "patient1")
    assert back.shape == hu.shape
    assert np.abs(back - hu).max() <= 0.5  # HU preserved within quantisation (1 HU steps)
    for ds in datasets:
        assert ds.Modality == "CT" and ds.RescaleType == "HU"
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) <= -1024
        assert "translated to B" in ds.SeriesDescription
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert (out / "dataset.toml").is_file()  # the output is a site folder medgen reads again
    again = load_site(out, 32)
    assert again.manifest.modality == "CT" and not again.has_labels
    assert not list(tmp_path.glob(".out.building-*"))  # staged, renamed into place


def test_translate_cli_on_a_ct_dicom_site_writes_a_hu_dicom_series(run, ct_dicom_site, tmp_path, capsys):
    run_dir, public = run
    site, hu = ct_dicom_site
    before = digests(site)
    out = tmp_path / "out"
    args = ["--run-dir", str(run_dir), "--public", str(public), "--source-site", "A",
            "--target-site", "B", "--out", str(out), str(site)]
    assert client_main(["translate", *args]) == 0  # medgen-client translate
    assert digests(site) == before
    back, datasets = read_series_hu(out / "images" / "patient1")
    assert back.shape == hu.shape and np.isfinite(back).all()
    assert -1000 <= back.min() and back.max() <= 2000  # the window's inverse: HU in range
    assert not np.allclose(back, hu)  # it did translate (an untrained model is no identity)
    assert all(ds.RescaleType == "HU" and ds.Modality == "CT" for ds in datasets)
    original = pydicom.dcmread(sorted((site / "images" / "patient1").glob("*.dcm"))[0])
    assert datasets[0].SeriesInstanceUID != original.SeriesInstanceUID
    assert datasets[0].SOPInstanceUID != original.SOPInstanceUID
    # never overwrites, never writes inside its input
    assert main(args) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert main([*args[:-2], str(site / "out"), str(site)]) == 2
    assert not (site / "out").exists()
    assert digests(site) == before


def test_ct_nifti_site_round_trips_int16_hu(tmp_path):
    site = tmp_path / "site"
    hu = np.rint(np.random.default_rng(0).uniform(-900, 1500, (24, 24, 2)))
    write_physical_nifti(site / "images" / "p1.nii.gz", hu, (0.8, 0.8, 3.0), "HU")
    (site / "dataset.toml").write_text(CT_TOML)
    out = tmp_path / "out"
    translate_site(site, out, identity, size=24, target="C")
    back, spacing = read_physical_nifti(out / "images" / "p1.nii.gz")
    assert nib.load(str(out / "images" / "p1.nii.gz")).get_data_dtype() == np.int16
    assert np.array_equal(back, hu) and spacing == pytest.approx((0.8, 0.8, 3.0))


def test_mr_site_comes_back_in_its_own_scale_with_constant_slices_untouched(tmp_path):
    site = tmp_path / "site"
    rng = np.random.default_rng(1)
    volume = rng.uniform(100, 900, (20, 20, 3))
    volume[..., 2] = 7.0  # a constant slice: passed through
    write_physical_nifti(site / "images" / "p1.nii.gz", volume, (1.0, 1.0, 1.0), "arbitrary")
    (site / "dataset.toml").write_text(MR_TOML)
    out = tmp_path / "out"
    translate_site(site, out, identity, size=20, target="B")
    back, _ = read_physical_nifti(out / "images" / "p1.nii.gz")
    kept = volume[..., :2]
    lo, hi = np.percentile(kept, [0.5, 99.5])  # the volume's map, not a per-slice one
    assert np.allclose(back[..., :2], np.clip(kept, lo, hi), atol=1e-3 * (hi - lo))
    assert np.all(back[..., 2] == 7.0)


def test_bad_arguments_are_clear_errors(run, tmp_path, capsys):
    run_dir, public = run
    assert main(["--run-dir", str(run_dir), "--public", str(public), "--source-site", "A",
                 "--target-site", "B", "--out", str(tmp_path / "o"), str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a site of this run"):
        Translator(run_dir, public, "A", "Z")
    gan = tmp_path / "gan"
    gan.mkdir()
    atomic_write_text(gan / "config.toml", RunConfig(recipe="dp-cgan", image_size=SIZE, sites="A,B").to_toml())
    with pytest.raises(ValueError, match="Translation capability"):
        Translator(gan, public, "A", "B")


def test_translated_nifti_keeps_the_source_affine_and_header_geometry(tmp_path):
    """An oblique, shifted, anisotropic CT volume with distinct qform and sform: the output
    holds the same affine, codes, voxel sizes and units; no free-text field is copied."""
    site = tmp_path / "site"
    hu = np.rint(np.random.default_rng(2).uniform(-900, 1500, (20, 18, 3)))
    c, s = np.cos(0.2), np.sin(0.2)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    sform = np.eye(4)
    sform[:3, :3] = rotation @ np.diag([0.8, 0.8, 2.5])   # square pixels: identity is exact
    sform[:3, 3] = [-81.5, 40.25, 12.0]
    qform = np.diag([-0.8, 0.8, 2.5, 1.0])
    qform[:3, 3] = [10.0, -20.0, 30.0]
    source = nib.Nifti1Image(hu.astype(np.int16), sform)
    source.set_qform(qform, code=1)
    source.set_sform(sform, code=2)
    source.header.set_xyzt_units("mm", "sec")
    source.header["descrip"] = b"Doe^Jane 1970-01-01"
    (site / "images").mkdir(parents=True)
    nib.save(source, site / "images" / "p1.nii.gz")
    (site / "dataset.toml").write_text(CT_TOML)
    out = tmp_path / "out"
    translate_site(site, out, identity, size=20, target="C")
    back = nib.load(str(out / "images" / "p1.nii.gz"))
    header, original = back.header, nib.load(str(site / "images" / "p1.nii.gz")).header
    np.testing.assert_allclose(back.affine, sform, atol=1e-5)
    np.testing.assert_allclose(header.get_sform(), sform, atol=1e-5)
    np.testing.assert_allclose(header.get_qform(), original.get_qform(), atol=1e-5)
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 2)
    assert header.get_zooms() == pytest.approx(original.get_zooms())
    assert header.get_xyzt_units() == ("mm", "sec")
    assert b"Doe" not in header["descrip"].tobytes()
    assert back.get_data_dtype() == np.int16 and np.array_equal(back.get_fdata(), hu)
    again = load_site(out, 20)   # medgen reads its own output back
    assert again.manifest.modality == "CT"


def test_translated_dicom_keeps_the_source_orientation_and_slice_positions(ct_dicom_site, tmp_path):
    site, hu = ct_dicom_site
    c, s = np.cos(0.25), np.sin(0.25)
    orientation = [1.0, 0.0, 0.0, 0.0, c, s]    # gantry tilt about x
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([-120.0, -95.5, 310.0])
    files = sorted((site / "images" / "patient1").glob("*.dcm"))
    positions = {}
    for path in files:
        ds = pydicom.dcmread(path)
        k = int(ds.InstanceNumber) - 1
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = (origin + 5.0 * k * normal).tolist()
        positions[k] = ds.ImagePositionPatient
        ds.save_as(path)
    out = tmp_path / "out"
    translate_site(site, out, identity, size=hu.shape[0], target="B")
    written = [pydicom.dcmread(p) for p in sorted((out / "images" / "patient1").glob("*.dcm"))]
    assert len(written) == len(files)
    for k, ds in enumerate(written):   # slice_0001 is the first slice along the normal
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], orientation, atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   [float(v) for v in positions[k]], atol=1e-4)
        assert float(ds.SliceLocation) == pytest.approx(float(np.dot(normal, positions[k])), abs=1e-4)
    assert [float(v) for v in written[0].PixelSpacing] == pytest.approx([float(v) for v in
                                                                         pydicom.dcmread(files[0]).PixelSpacing])
