"""Through Flower's real simulation engine (`medgen-server simulate`): dp-cgan trains on the
head-CT federation (7 classes, label-names filled from its dataset.toml, no CT-specific
recipe code), and site-gan trains on a federation whose site B has no label maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medgen.server.checkpoint import load_checkpoint
from medgen.server.cli import main
from medgen.server.run_log import read_metrics

TINY = ["--set", "num-rounds=2", "--set", "local-steps=2", "--set", "batch-size=2",
        "--set", "image-size=32", "--set", "accountant=rdp", "--set", "eval-every=0",
        "--set", "options.gen-width=4", "--set", "options.disc-width=4", "--timeout", "900"]


def _two_trained_rounds(run_dir: Path, sites: set[str]) -> list[dict]:
    assert load_checkpoint(run_dir).server_round == 2
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["round"] for r in train] == [1, 2]
    for record in train:
        assert set(record["per_site"]) == sites and record["excluded"] == []
    return train


@pytest.mark.slow
def test_dp_cgan_trains_on_the_head_ct_federation_through_flower(run_dir, capsys):
    code = main(["simulate", "--federation", "head-ct", "--sites", "2", "--subjects-per-site", "6",
                 "--public-size", "8", "--heldout-size", "4", "--out", str(run_dir), *TINY])
    out = capsys.readouterr().out
    assert code == 0, out
    train = _two_trained_rounds(run_dir, {"A", "B"})
    assert train[0]["aggregate"]["epsilon"] < train[1]["aggregate"]["epsilon"] <= 10.0 + 1e-6
    config_text = (run_dir / "flower" / "app" / "pyproject.toml").read_text() \
        if (run_dir / "flower" / "app" / "pyproject.toml").is_file() else ""
    if config_text:  # the run config travelled with the head's schema
        assert '"air,soft_tissue,fat,bone,csf,gm,wm"' in config_text
    privacy = json.loads((run_dir / "privacy.json").read_text())
    # the scanner-moment release vector is sized from the 7 classes: 3K+3 = 24 values
    assert privacy["node_ledgers"]["A"]["steps"] == 5


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
