"""A hospital's own data, step by step, exactly as README.md ("Your own data") says.

The dataset.toml files are the README's own toml blocks (read from README.md, so the docs
and this test cannot drift apart). On freshly written CT folders in HU, one with label maps
of a 3-class schema of the hospital's own (stored values 0, 10, 20) and one with none:
`medgen-client data check` -> pick a recipe -> one round through the node's real
``train_round`` (a deployed node's setup, resolved from its node config). An unlabelled
folder is refused by a label-map recipe before any ledger file exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from medgen.client.rounds import train_round
from medgen.client.cli import main as client_main
from medgen.client.node import resolve_node
from medgen.config import RunConfig
from medgen.data.dicom_writer import dicom_rescale, write_series
from medgen.data.site_data import load_site, site_manifest
from medgen.models.capabilities import SiteDataRefused
from medgen.models.registry import build_recipe

README = Path(__file__).resolve().parents[2] / "README.md"
SIZE = 32
OPTIONS = {"gen-width": 4, "disc-width": 4, "noise-dim": 8}
EXTRA = {"dp-cgan": {"spade-hidden": 4}}
LABEL_NAMES = "background,soft_tissue,bone"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def readme_toml(title: str) -> str:
    """The README's toml block whose first line is ``# dataset.toml: <title>``."""
    section = README.read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```toml\n(.*?)```", section, flags=re.S):
        lines = [line.strip() for line in block.splitlines()]  # the README indents it
        if lines[0] == f"# dataset.toml: {title}":
            return "\n".join(lines[1:]) + "\n"
    raise AssertionError(f"README.md has no toml block '# dataset.toml: {title}'")


def ct_patient(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2-slice head-like CT in int16 HU and its label map in the hospital's stored values."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :40] - 19.5
    r = np.hypot(yy * (1 + 0.05 * seed), xx)[..., None].repeat(2, axis=-1)
    hu = np.full(r.shape, -1000.0)
    hu[r < 17] = 900 + 40 * seed      # bone
    hu[r < 14] = 35.0                 # soft tissue
    hu += rng.normal(0, 8, hu.shape)
    labels = np.zeros(r.shape, np.uint8)
    labels[r < 17], labels[r < 14] = 20, 10
    return np.rint(hu).astype(np.int16), labels


def write_site(folder: Path, labelled: bool) -> Path:
    for i in range(6):
        hu, labels = ct_patient(i)
        affine = np.diag([0.9, 0.9, 5.0, 1.0])
        path = folder / "images" / f"patient{i:02d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(hu, affine), str(path))
        if labelled:
            (folder / "labels").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(labels, affine), str(folder / "labels" / path.name))
    title = "a labelled CT site" if labelled else "an unlabelled CT site"
    (folder / "dataset.toml").write_text(readme_toml(title))
    return folder


def write_public_bank(folder: Path) -> Path:
    """The federation's public label maps in the same 3-class schema (not the site's data)."""
    for i in range(3):
        _, labels = ct_patient(10 + i)
        path = folder / "labels" / f"public{i}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(labels[..., 0], np.eye(4)), str(path))
    (folder / "dataset.toml").write_text(readme_toml("a labelled CT site"))
    return folder


def config_for(recipe: str, **extra) -> RunConfig:
    return RunConfig(recipe=recipe, num_rounds=1, local_steps=2, batch_size=2, image_size=SIZE,
                     sites="H,K", accountant="rdp", eval_every=0, target_epsilon=5.0,
                     options={**OPTIONS, **EXTRA.get(recipe, {})}, **extra)


def request(config: RunConfig) -> RecordDict:
    recipe = build_recipe(config)
    return RecordDict({"arrays": ArrayRecord(recipe.shared_state(recipe.build())),
                       "config": ConfigRecord({"run-key": f"own-{config.recipe}",
                                               "absolute-round": 1, "server-round": 1})})


def node_for(config: RunConfig, site: Path, state: Path, public: Path):
    """What a deployed hospital node resolves from its --node-config."""
    return resolve_node(config, {"site": "H", "data-dir": str(site), "state-dir": str(state),
                                 "public-dir": str(public)})


def data_check(site: Path, capsys) -> dict:
    assert client_main(["data", "check", str(site), "--json"]) == 0  # 0: the site trains
    return json.loads(capsys.readouterr().out)


def test_labelled_site_with_its_own_three_class_schema_trains_dp_cgan(tmp_path, capsys):
    site = write_site(tmp_path / "ct-labelled", labelled=True)
    public = write_public_bank(tmp_path / "public")
    report = data_check(site, capsys)
    assert report["labelled"] and report["patients"] == 6
    config = config_for("dp-cgan", label_names=LABEL_NAMES)
    node = node_for(config, site, tmp_path / "state", public)
    reply = train_round(config, node, request(config))
    metrics = reply["metrics"]
    assert metrics["num-examples"] == 6 and metrics["steps"] == 2
    assert 0 < metrics["epsilon"] <= 5.0
    assert node.ledger_path.is_file()


def test_unlabelled_site_trains_site_gan_and_dp_cgan_refuses_it_before_the_ledger(tmp_path, capsys):
    site = write_site(tmp_path / "ct-unlabelled", labelled=False)
    public = write_public_bank(tmp_path / "public")
    report = data_check(site, capsys)
    assert not report["labelled"] and report["patients"] == 6
    # a label-map recipe: refused at plan time, nothing of the node's state written
    refused = config_for("dp-cgan", label_names=LABEL_NAMES)
    node = node_for(refused, site, tmp_path / "state-refused", public)
    with pytest.raises(SiteDataRefused, match="dp-cgan"):
        train_round(refused, node, request(refused))
    assert not node.ledger_path.exists() and not node.local_state_path.exists()
    # the label-free recipe trains on the images alone
    config = config_for("site-gan", label_names=LABEL_NAMES)
    node = node_for(config, site, tmp_path / "state", public)
    metrics = train_round(config, node, request(config))["metrics"]
    assert metrics["num-examples"] == 6 and metrics["steps"] == 2
    assert 0 < metrics["epsilon"] <= 5.0 and node.ledger_path.is_file()


def write_dicom_ct_site(folder: Path) -> np.ndarray:
    """A site of real CT voxels (pydicom's CT_small, in HU through its own modality LUT) as
    four DICOM series with honest headers (RescaleSlope/Intercept, Modality CT), the way a
    PACS export arrives: one series folder per patient, no label maps."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = np.rint(np.asarray(apply_modality_lut(ds.pixel_array, ds), np.float64))
    spacing = (*(float(v) for v in ds.PixelSpacing), float(ds.SliceThickness))
    for p in range(4):  # four patients (the privacy unit is the DICOM PatientID)
        volume = np.stack([np.roll(hu, 3 * p, axis=0), np.roll(hu, 3 * p, axis=1)], axis=-1)
        stored, slope, intercept = dicom_rescale(volume, "HU")
        write_series(stored, spacing, folder / "images" / f"series{p}", modality="CT", slope=slope,
                     intercept=intercept, seed=p, patient_id=f"PAT-{p}", description="head CT")
    (folder / "dataset.toml").write_text(readme_toml("an unlabelled CT site"))
    return hu


def test_a_real_ct_dicom_export_checks_trains_and_keeps_its_hounsfield_units(tmp_path, capsys):
    """Item 8 of the data-model issue: real CT DICOM voxels through data check and a
    training round at a deployed node; the values the recipe sees are the HU of the files
    through the manifest's one fixed window."""
    site = tmp_path / "pacs-export"
    hu = write_dicom_ct_site(site)
    report = data_check(site, capsys)
    assert not report["labelled"] and report["patients"] == 4
    data = load_site(site, SIZE)
    lo, hi = site_manifest(site).intensity.window
    # the window map is fixed, so [-1, 1] maps back to the files' HU: the 4x smaller image
    # keeps the mean HU of the scan and its air-to-bone range
    back = (data.images.double() + 1) / 2 * (hi - lo) + lo
    assert abs(float(back.mean()) - float(hu.mean())) < 15
    assert float(back.min()) < -800 and float(back.max()) > 500
    config = config_for("site-gan", label_names=LABEL_NAMES)
    node = node_for(config, site, tmp_path / "state", write_public_bank(tmp_path / "public"))
    metrics = train_round(config, node, request(config))["metrics"]
    assert metrics["num-examples"] == 4 and metrics["steps"] == 2
    assert 0 < metrics["epsilon"] <= 5.0 and node.ledger_path.is_file()
