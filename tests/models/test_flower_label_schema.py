"""Through Flower's real simulation engine (`medgen-server simulate`): dp-cgan and cddpm
train on the head-CT federation (7 classes, label-names filled from its dataset.toml, no
CT-specific recipe code, epsilon accounted per site), and site-gan trains on a federation
whose site B has no label maps.

Cost: the head-CT federation is built once for the module (2 sites, 6 subjects, 32 px) and
every run reads it with --data-root; the runs are 2 rounds of 2 steps on batches of 2 with
evaluation off, so most of each test is Flower's start-up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medgen.server.checkpoint import load_checkpoint
from medgen.server.cli import main
from medgen.server.run_log import read_metrics
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import build_head_federation

BASE = ["--set", "num-rounds=2", "--set", "local-steps=2", "--set", "batch-size=2",
        "--set", "image-size=32", "--set", "accountant=rdp", "--set", "eval-every=0",
        "--set", "simulate-actors=1",  # one Ray actor: see tests/conftest.py
        "--timeout", "900"]
TINY = [*BASE, "--set", "options.gen-width=4", "--set", "options.disc-width=4"]   # the GANs
TINY_CDDPM = [*BASE, "--set", "recipe=cddpm", "--set", "options.channels=8,16",
              "--set", "options.norm-groups=4", "--set", "options.sample-steps=2"]


HEAD_CLASSES = "air,soft_tissue,fat,bone,csf,gm,wm"


@pytest.fixture(scope="module")
def head_ct(tmp_path_factory) -> Path:
    """The head-CT federation, CT sites A and B in HU, built once for every run below."""
    root = tmp_path_factory.mktemp("head-ct") / "data"
    build_head_federation(HeadSimConfig(seed=0, sites="A,B", subjects_per_site=6, public_size=8,
                                        heldout_fit=4, heldout_test=4, image_size=32), root)
    return root


def _schema_travelled(run_dir: Path) -> None:
    config_text = (run_dir / "config.toml").read_text()
    assert HEAD_CLASSES in config_text, "label-names did not come from the head's dataset.toml"


def _two_trained_rounds(run_dir: Path, sites: set[str]) -> list[dict]:
    assert load_checkpoint(run_dir).server_round == 2
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["round"] for r in train] == [1, 2]
    for record in train:
        assert set(record["per_site"]) == sites and record["excluded"] == []
    return train


@pytest.mark.slow
def test_dp_cgan_trains_on_the_head_ct_federation_through_flower(head_ct, run_dir, capsys):
    code = main(["simulate", "--data-root", str(head_ct), "--out", str(run_dir), *TINY])
    out = capsys.readouterr().out
    assert code == 0, out
    train = _two_trained_rounds(run_dir, {"A", "B"})
    assert train[0]["aggregate"]["epsilon"] < train[1]["aggregate"]["epsilon"] <= 10.0 + 1e-6
    _schema_travelled(run_dir)
    privacy = json.loads((run_dir / "privacy.json").read_text())
    # 2 rounds x 2 steps, plus the one-off scanner-moment release (sized from the 7 classes)
    assert privacy["node_ledgers"]["A"]["steps"] == 5


@pytest.mark.slow
def test_cddpm_trains_on_the_head_ct_federation_through_flower(head_ct, run_dir, capsys):
    code = main(["simulate", "--data-root", str(head_ct), "--out", str(run_dir), *TINY_CDDPM])
    out = capsys.readouterr().out
    assert code == 0, out
    train = _two_trained_rounds(run_dir, {"A", "B"})
    _schema_travelled(run_dir)
    checkpoint = load_checkpoint(run_dir)
    # the denoiser's input is sized from the schema: the image plus 7 tissue channels, not 4
    shapes = {tuple(v.shape) for k, v in checkpoint.shared_state.items() if "conv_in" in k and k.endswith("weight")}
    assert shapes and all(shape[1] == 1 + 7 for shape in shapes), shapes
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for site in ("A", "B"):
        eps = [t["per_site"][site]["epsilon"] for t in train]
        assert 0 < eps[0] < eps[1] <= 10.0 + 1e-6, eps  # spent per round, within the per-site cap
        ledger = privacy["node_ledgers"][site]
        assert abs(ledger["epsilon"] - eps[1]) < 1e-6 and ledger["steps"] >= 4


@pytest.mark.slow
def test_site_gan_trains_an_unlabelled_site_through_flower(tiny_federation, tmp_path, run_dir, capsys):
    root = tmp_path / "unlabelled"
    shutil.copytree(tiny_federation, root)
    shutil.rmtree(root / "sites" / "B" / "labels")
    code = main(["simulate", "--data-root", str(root), "--out", str(run_dir),
                 "--set", "recipe=site-gan", *TINY])
    out = capsys.readouterr().out
    assert code == 0, out
    _two_trained_rounds(run_dir, {"A", "B"})
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["node_ledgers"]["B"]["steps"] == 4  # 2 rounds x 2 steps, no one-off release
