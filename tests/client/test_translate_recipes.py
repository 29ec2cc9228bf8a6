"""`medgen translate` on real files with EVERY recipe that declares the Translation capability.

The input is real MR: two axial slices of the MNI ICBM152 T1 shipped in nilearn (DATA.md),
area-pooled to 32 x 32 px of 6 mm, written as a NIfTI with an oblique, shifted affine (and,
for the other-modality case, as an MR DICOM series by data/dicom_writer.py). Each run dir
holds the recipe's initialised networks (config.toml + checkpoint.pt, as the server
writes them): the tests check the file path, not the quality of a model.

The oracle: the record's own map (the volume's 0.5..99.5 percentiles) to [-1, 1], the
run's translation, then back through what the capability declares: the same map (a
recipe that declares no output: the input's modality and units) or the declared window
(da-gan: CT in HU). The written file, read back (NIfTI scaling, DICOM modality LUT), must
equal it. Mutation, tried: ``translate_site`` ignoring the declared output (writing da-gan's
output through the input's MR map, as before the declaration existed) fails the da-gan
cases: MR units where HU are expected, and a dataset.toml still saying MR.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage

from medgen.atomic import atomic_write_text
from medgen.client.translate import TranslateError, Translator, main, translate_site
from medgen.config import RunConfig
from medgen.data.dicom_writer import write_physical_dicom
from medgen.data.intensity import PercentileMap, WindowMap
from medgen.data.manifest import load_manifest
from medgen.models.capabilities import Translation, declares
from medgen.models.registry import RECIPES, build_recipe, recipe_class
from medgen.server.checkpoint import new_checkpoint, save_checkpoint
from medgen.sim.anatomy import template_paths

SIZE, PIXEL_MM = 32, 6.0
# The smallest networks of every recipe that declares Translation. A recipe that starts to
# declare it without an entry here fails test_every_translation_recipe_has_a_real_file_test.
TRANSLATION_RECIPES = {
    "bridge-translate": {"gen-width": 4, "disc-width": 4, "noise-dim": 8, "style-samples": 4},
    "spcycle-gan": {"gen-width": 4, "gen-blocks": 1, "disc-width": 4, "seg-pretrain-steps": 0,
                    "public-eval-samples": 0},
    "icycle-gan": {"gen-width": 4, "gen-blocks": 1, "disc-width": 4, "corr-width": 4},
    "da-gan": {"gen-width": 4, "gen-blocks": 1, "disc-width": 4, "reg-width": 4, "integration-steps": 3},
}
MR_TOML = """[dataset]
modality = "MR"

[intensity]
units = "arbitrary"
normalisation = "percentile"
percentiles = [0.5, 99.5]

[labels]
none = true
"""
CT_TOML = '[dataset]\nmodality = "CT"\n\n[intensity]\nunits = "HU"\nnormalisation = "window"\n' \
          'window = [-1000, 2000]\n\n[labels]\nnone = true\n'

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def real_mr() -> np.ndarray:
    """(32, 32, 2) real T1 values: two axial MNI slices, a 192 mm square, 6 x 6 area pooled."""
    t1 = nib.load(str(template_paths()["t1"]))
    volume = np.stack([np.asarray(t1.dataobj[2:194, 20:212, z], np.float64) for z in (70, 90)], -1)
    return volume.reshape(SIZE, 6, SIZE, 6, 2).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def public(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("public")
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[4:28, 4:28], labels[8:24, 8:24], labels[13:19, 13:19] = 1, 2, 3
    for i in range(3):
        path = root / "labels" / f"p{i}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.roll(labels, i, axis=0), np.eye(4)), str(path))
    return root


def make_run(root: Path, name: str) -> Path:
    """An initialised run dir of recipe ``name``: config.toml and checkpoint.pt."""
    run_dir = root / f"run-{name}"
    config = RunConfig(recipe=name, image_size=SIZE, sites="A,B", run_dir=str(run_dir),
                       options=TRANSLATION_RECIPES[name])
    recipe = build_recipe(config)
    run_dir.mkdir(parents=True)
    atomic_write_text(run_dir / "config.toml", config.to_toml())
    save_checkpoint(run_dir, new_checkpoint(recipe.shared_state(recipe.build()), 1, config, "test"))
    return run_dir


def oblique_affine() -> np.ndarray:
    c, s = np.cos(0.2), np.sin(0.2)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([PIXEL_MM, PIXEL_MM, 20.0])
    affine[:3, 3] = [-90.5, 40.25, 12.0]
    return affine


def mr_nifti_site(root: Path, volume: np.ndarray) -> Path:
    site = root / "mr-site"
    (site / "images").mkdir(parents=True)
    image = nib.Nifti1Image(volume.astype(np.float32), oblique_affine())
    image.set_qform(oblique_affine(), code=1)
    image.set_sform(oblique_affine(), code=2)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, site / "images" / "p1.nii.gz")
    (site / "dataset.toml").write_text(MR_TOML)
    return site


def expected_output(translator: Translator, volume: np.ndarray) -> np.ndarray:
    """The oracle: the volume's percentile map, the translation, the declared way back."""
    source_map = PercentileMap.fit(volume, (0.5, 99.5))
    x = torch.from_numpy(np.moveaxis(source_map.forward(volume), -1, 0))[:, None]
    y = translator(x).float().numpy()[:, 0]
    declared = translator.output
    back = source_map if declared is None else WindowMap(*declared.window, units=declared.units)
    return np.moveaxis(back.inverse(y), 0, -1)


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_translation_recipe_has_a_real_file_test():
    """The registry's recipes that declare Translation are exactly the ones tested below."""
    declaring = {name for name in RECIPES if declares(recipe_class(name), Translation)}
    assert declaring == set(TRANSLATION_RECIPES), (
        f"declare Translation but have no real-file translate test: {sorted(declaring - set(TRANSLATION_RECIPES))}; "
        f"listed but do not declare it: {sorted(set(TRANSLATION_RECIPES) - declaring)}")


@pytest.mark.parametrize("name", sorted(TRANSLATION_RECIPES))
def test_translate_a_real_mr_nifti_with_every_translation_recipe(name, real_mr, public, tmp_path, capsys):
    """`medgen translate` (the CLI) on a real MR NIfTI: the output holds the oracle's values
    in the declared units (the input's when nothing is declared), the input's geometry
    whole, a dataset.toml of the output modality; the input is never modified."""
    run_dir, site = make_run(tmp_path, name), mr_nifti_site(tmp_path, real_mr)
    before, out = digests(site), tmp_path / "out"
    assert main(["--run-dir", str(run_dir), "--public", str(public), "--source-site", "A",
                 "--target-site", "B", "--out", str(out), str(site)]) == 0, capsys.readouterr().err
    assert digests(site) == before
    translator = Translator(run_dir, public, "A", "B")
    declared = translator.output
    written = nib.load(str(out / "images" / "p1.nii.gz"))
    source = nib.load(str(site / "images" / "p1.nii.gz"))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert written.header.get_zooms() == pytest.approx(source.header.get_zooms())
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
    back, expected = written.get_fdata(dtype=np.float64), expected_output(translator, real_mr)
    manifest = load_manifest(out)
    if declared is None:  # same modality: the input's units, through the volume's own map
        assert manifest.modality == "MR" and written.get_data_dtype() == np.float32
        span = np.ptp(expected)
        assert np.abs(back - expected).max() <= 1e-4 * span
    else:                 # another modality: its units, through the declared window
        assert (manifest.modality, manifest.intensity.units) == (declared.modality, declared.units)
        assert manifest.intensity.window == declared.window
        assert written.get_data_dtype() == np.int16 and declared.units == "HU"
        assert np.abs(back - expected).max() <= 0.5 + 1e-6   # integer HU
        assert declared.window[0] <= back.min() and back.max() <= declared.window[1]


def test_da_gan_writes_an_mr_dicom_series_as_a_ct_series_in_hu(real_mr, public, tmp_path):
    """An oblique MR DICOM series (data/dicom_writer.py, as the simulator writes them) becomes
    a new CT series: CT Image Storage, Modality CT, RescaleType HU with slope 1, pydicom's
    modality LUT returning the oracle's HU, new UIDs, the source's orientation, positions
    and pixel spacing; the source files unchanged."""
    site = tmp_path / "mr-dicom"
    files = write_physical_dicom(site / "images" / "patient1", real_mr, (PIXEL_MM, PIXEL_MM, 20.0),
                                 modality="MR", units="arbitrary", seed=5, description="hospital T1")
    (site / "dataset.toml").write_text(MR_TOML)
    c, s = np.cos(0.25), np.sin(0.25)
    orientation, origin = [1.0, 0.0, 0.0, 0.0, c, s], np.array([-96.0, -80.5, 310.0])
    normal = np.cross(orientation[:3], orientation[3:])
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient, ds.ImagePositionPatient = orientation, (origin + 20.0 * k * normal).tolist()
        ds.save_as(path)
    sources = [pydicom.dcmread(p) for p in files]
    stored_mr = np.stack([np.asarray(apply_modality_lut(d.pixel_array, d), np.float64) for d in sources], -1)
    before, out = digests(site), tmp_path / "out"
    translator = Translator(make_run(tmp_path, "da-gan"), public, "A", "B")
    translate_site(site, out, translator, translator.size, "B", translator.output)
    assert digests(site) == before
    written = [pydicom.dcmread(p) for p in sorted((out / "images" / "patient1").glob("*.dcm"))]
    assert len(written) == len(sources)
    hu = np.stack([np.asarray(apply_modality_lut(d.pixel_array, d), np.float64) for d in written], -1)
    assert np.abs(hu - expected_output(translator, stored_mr)).max() <= 0.5 + 1e-6
    for k, (ds, src) in enumerate(zip(written, sources)):
        assert ds.Modality == "CT" and ds.SOPClassUID == CTImageStorage and ds.RescaleType == "HU"
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) <= -1024
        assert "translated to B" in ds.SeriesDescription
        for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert getattr(ds, uid) != getattr(src, uid)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], orientation, atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   [float(v) for v in src.ImagePositionPatient], atol=1e-4)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([float(v) for v in src.PixelSpacing])
    assert load_manifest(out).modality == "CT"


def test_da_gan_refuses_a_site_of_another_modality_than_it_reads(public, tmp_path):
    site = tmp_path / "ct-site"
    (site / "images").mkdir(parents=True)
    hu = np.rint(np.random.default_rng(0).uniform(-900, 1500, (SIZE, SIZE, 2))).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), site / "images" / "p1.nii.gz")
    (site / "dataset.toml").write_text(CT_TOML)
    translator = Translator(make_run(tmp_path, "da-gan"), public, "A", "B")
    with pytest.raises(TranslateError, match="modality CT, but this run translates MR to CT"):
        translate_site(site, tmp_path / "out", translator, translator.size, "B", translator.output)
    assert not (tmp_path / "out").exists()
