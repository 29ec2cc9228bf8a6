"""`medgen restore`: a trained restoration run applied to a hospital's own DICOM/NIfTI files.

The series are real CT pixels in HU (pydicom's CT_small through sim/dicom_export.py's
``real_ct_hu``) written by the simulator's DICOM export (``write_series``), with white noise
added: the clean volume is the ground truth. Mutations that fail these tests: writing the
output with the input's Series/SOP UIDs; dropping the rescale (stored values not HU); not
moving the positions/affine for super-resolution; skipping the units/modality check; a
restorer that returns its input (not closer to the truth).
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

from medgen.atomic import atomic_write_text
from medgen.client.cli import main as client_main
from medgen.cli import COMMANDS
from medgen.client.restore import main
from medgen.config import RunConfig
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.registry import build_recipe
from medgen.server.checkpoint import new_checkpoint, save_checkpoint
from medgen.sim.dicom_export import real_ct_hu, write_series

SIZE, NOISE_HU = 32, 40.0
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
MR_TOML = CT_TOML.replace('"CT"', '"MR"').replace('units = "HU"\nnormalisation = "window"\nwindow = [-1000, 2000]',
                                                  'units = "arbitrary"\nnormalisation = "percentile"')


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def public_maps() -> torch.Tensor:
    """Public label maps: nested discs (the denoiser's clean images are renderings of them)."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    maps = torch.zeros(6, SIZE, SIZE, dtype=torch.long)
    for i in range(6):
        d = ((yy - 15 - i % 3) ** 2 + (xx - 16) ** 2).float().sqrt()
        maps[i][d < 13 - i % 2], maps[i][d < 10], maps[i][d < 5 + i % 3] = 1, 2, 3
    return maps


def save_run(root: Path, recipe_name: str, options: dict, train_denoiser: bool = False) -> Path:
    """A run directory (config.toml + checkpoint.pt + DONE) whose data-root names CT in HU."""
    data_root = root / "federation"
    data_root.mkdir(parents=True, exist_ok=True)
    (data_root / "dataset.toml").write_text(CT_TOML)
    run_dir = root / f"run-{recipe_name}"
    config = RunConfig(recipe=recipe_name, image_size=SIZE, batch_size=8, sites="A,B", run_dir=str(run_dir),
                       data_root=str(data_root), options=options)
    recipe = build_recipe(config)
    model = recipe.build()
    if train_denoiser:  # public renderings + white noise of the series' std: a real, small training
        ctx = RoundContext(None, PublicData(public_maps()), None, 0, 1, {}, "cpu", 0)
        recipe.denoiser_steps(model, torch.optim.Adam(model.denoiser.parameters(), lr=3e-3), ctx)
    run_dir.mkdir()
    atomic_write_text(run_dir / "config.toml", config.to_toml())
    save_checkpoint(run_dir, new_checkpoint(recipe.shared_state(model), 1, config, "test"))
    (run_dir / "DONE").write_text('{"status": "complete"}')
    return run_dir


BLIND = {"synth-noise": "gaussian", "gaussian-std": f"{2 * NOISE_HU / 3000}",  # the series' std (3000 HU window)
         "denoiser-width": 8, "denoiser-depth": 3, "denoiser-steps": 100, "lr-denoiser": 3e-3, "noise-scale": 0.05}


@pytest.fixture(scope="module")
def trained_denoiser(tmp_path_factory) -> Path:
    """A blind-denoise run whose denoiser took 100 public steps for site A (Gaussian synth noise)."""
    return save_run(tmp_path_factory.mktemp("restore-trained"), "blind-denoise", BLIND, train_denoiser=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("restore")
    return {"denoise": save_run(root, "blind-denoise", BLIND),  # untrained: enough to be refused
            "sr2": save_run(root, "restore-diffusion", {"task": "sr2", "channels": "8,16", "norm-groups": 4,
                                                        "sample-steps": 2}),
            "gan": save_run(root, "site-gan", {"gen-width": 4, "disc-width": 4, "noise-dim": 8})}


def ct_site(root: Path, hu: np.ndarray, spacing, toml: str = CT_TOML) -> Path:
    write_series(hu, spacing, root / "images" / "patient1", modality="CT", seed=5, origin=(-60.0, 12.5, 30.0))
    (root / "dataset.toml").write_text(toml)
    return root


def read_series(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    datasets = sorted((pydicom.dcmread(f) for f in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([np.asarray(apply_modality_lut(d.pixel_array, d), np.float64) for d in datasets], -1), datasets


def digests(folder: Path) -> dict[str, str]:
    return {p.as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_denoising_a_ct_dicom_series_writes_a_new_hu_series_closer_to_the_truth(trained_denoiser, tmp_path):
    clean, spacing = real_ct_hu(SIZE, 3)
    noisy = np.rint(clean + np.random.default_rng(0).normal(0.0, NOISE_HU, clean.shape))
    site = ct_site(tmp_path / "site", noisy, spacing)
    before = digests(site)
    assert main([str(site), "--run-dir", str(trained_denoiser), "--site", "A", "--task", "denoise",
                 "--out", str(tmp_path / "out")]) == 0
    assert digests(site) == before  # input files only read
    source_hu, source = read_series(site / "images" / "patient1")
    out_hu, out = read_series(tmp_path / "out" / "images" / "patient1")
    assert out_hu.shape == noisy.shape and np.array_equal(source_hu, noisy)
    for a, b in zip(source, out):
        assert b.Modality == "CT" and b.RescaleType == "HU" and "restored" in b.SeriesDescription
        assert b.SeriesInstanceUID != a.SeriesInstanceUID and b.SOPInstanceUID != a.SOPInstanceUID
        assert list(b.ImageOrientationPatient) == list(a.ImageOrientationPatient)
        assert np.allclose([float(v) for v in b.ImagePositionPatient], [float(v) for v in a.ImagePositionPatient])
        assert np.allclose([float(v) for v in b.PixelSpacing], [float(v) for v in a.PixelSpacing])
        assert b.PatientID != a.PatientID
    assert len({d.SOPInstanceUID for d in out}) == len(out)
    body = clean > -700
    input_mae = np.abs(np.clip(noisy, -1000, 2000) - clean)[body].mean()
    restored_mae = np.abs(out_hu - clean)[body].mean()
    assert restored_mae < 0.95 * input_mae, (restored_mae, input_mae)  # closer to the truth, in HU
    assert abs(out_hu[body].mean() - clean[body].mean()) < 15  # HU stay HU


def test_super_resolution_scales_spacing_and_moves_positions_and_the_nifti_affine(runs, tmp_path):
    clean, (row, col, thick) = real_ct_hu(SIZE, 2)
    low = clean.reshape(SIZE // 2, 2, SIZE // 2, 2, 2).mean(axis=(1, 3))
    site = ct_site(tmp_path / "site", np.rint(low), (2 * row, 2 * col, thick))
    assert main([str(site), "--run-dir", str(runs["sr2"]), "--site", "A", "--out", str(tmp_path / "out")]) == 0
    src_hu, src = read_series(site / "images" / "patient1")
    out_hu, out = read_series(tmp_path / "out" / "images" / "patient1")
    assert out_hu.shape == (SIZE, SIZE, 2)
    for a, b in zip(src, out):
        assert np.allclose([float(v) for v in b.PixelSpacing], [row, col])
        shift = np.asarray([float(v) for v in b.ImagePositionPatient]) - [float(v) for v in a.ImagePositionPatient]
        assert np.allclose(shift, [-col / 2, -row / 2, 0.0])  # the new first pixel's centre
    assert np.abs(out_hu.reshape(SIZE // 2, 2, SIZE // 2, 2, 2).mean(axis=(1, 3)) - src_hu).mean() < 40
    # NIfTI: the affine maps the centre of each new 2x2 block onto its source voxel
    nifti = tmp_path / "nifti"
    (nifti / "images").mkdir(parents=True)
    (nifti / "dataset.toml").write_text(CT_TOML)
    affine = np.array([[0.0, -3.0, 0.0, 40.0], [2.5, 0.0, 0.0, -7.0], [0.0, 0.0, 4.0, 11.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.rint(low).astype(np.int16), affine), str(nifti / "images" / "p1.nii.gz"))
    # through the hospital's own command: medgen-client restore
    assert client_main(["restore", str(nifti), "--run-dir", str(runs["sr2"]), "--site", "A",
                        "--out", str(tmp_path / "out2")]) == 0
    image = nib.load(str(tmp_path / "out2" / "images" / "p1.nii.gz"))
    assert image.shape == (SIZE, SIZE, 2) and np.allclose(image.header.get_zooms(), (1.25, 1.5, 4.0))
    for k in (0, 1):
        assert np.allclose(image.affine @ [0.5, 0.5, k, 1], affine @ [0, 0, k, 1])
        assert np.allclose(image.affine @ [2.5, 4.5, k, 1], affine @ [1, 2, k, 1])
    assert np.asarray(image.dataobj).dtype == np.int16  # HU as int16, identity scaling


def test_wrong_runs_tasks_units_and_grids_are_refused_naming_what_to_do(runs, tmp_path, capsys):
    clean, spacing = real_ct_hu(SIZE, 2)
    site = ct_site(tmp_path / "site", np.rint(clean), spacing)
    cases = [([str(site), "--run-dir", str(runs["gan"]), "--site", "A"], "not a restoration recipe"),
             ([str(site), "--run-dir", str(runs["denoise"]), "--site", "A", "--task", "sr2"], "--task denoise"),
             ([str(site), "--run-dir", str(runs["denoise"]), "--site", "Z"], "--site Z"),
             ([str(site), "--run-dir", str(runs["sr2"]), "--site", "A"], "16x16"),  # a 32 px series to a x2 model
             ([str(ct_site(tmp_path / "mr", np.rint(clean), spacing, MR_TOML)), "--run-dir", str(runs["denoise"]),
               "--site", "A"], "[dataset] modality")]
    for k, (args, expected) in enumerate(cases):
        out = tmp_path / f"out{k}"
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert expected in err, err
        assert not out.exists()  # refused before anything is written
    assert "dataset.toml" in err  # the mismatch names the file and field
    assert "restore" in COMMANDS  # `medgen restore` dispatches here


def test_a_deployed_hospital_restores_with_its_node_state_and_is_held_to_its_training_folder(runs, tmp_path, capsys):
    """--state: the site comes from the node's node-config.toml and the input must match the
    dataset.toml of the folder that node trained on. Mutations: ignoring the node's site (the
    run is then asked for no site and refuses), or checking against the run's data-root instead
    of the node's folder (the window case then passes) fail this test."""
    clean, spacing = real_ct_hu(SIZE, 2)
    trained = ct_site(tmp_path / "trained", np.rint(clean), spacing)  # the node's own training folder
    state = tmp_path / "state"
    state.mkdir()
    (state / "node-config.toml").write_text(f'site = "B"\ndata-dir = "{trained}"\n')
    site = ct_site(tmp_path / "site", np.rint(clean), spacing)
    before = digests(site)

    out = tmp_path / "restored"
    assert main([str(site), "--run-dir", str(runs["denoise"]), "--state", str(state), "--out", str(out)]) == 0
    restored, datasets = read_series(out / "images" / "patient1")
    assert restored.shape == clean.shape and datasets[0].Modality == "CT"
    assert digests(site) == before  # the input is never modified

    soft = CT_TOML.replace("window = [-1000, 2000]", "window = [-160, 240]")
    other = ct_site(tmp_path / "other-window", np.rint(clean), spacing, soft)
    refusals = [([str(other), "--state", str(state)], str(trained / "dataset.toml")),  # the node's folder, named
                ([str(site), "--state", str(state), "--site", "A"], "--site A"),
                ([str(site), "--state", str(tmp_path / "no-such-node")], "node-config.toml")]
    for k, (args, expected) in enumerate(refusals):
        target = tmp_path / f"refused{k}"
        assert main([*args, "--run-dir", str(runs["denoise"]), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert expected in err, err
        assert not target.exists()
