"""Issue 13 failure 1, end to end: a symlink loop in a site folder cannot inflate its patients.

A real `medgen-server simulate` on Flower's simulation engine (2 sites, 2 rounds, 32 px,
2 local steps) over a federation whose site B holds ``images/loop -> .`` and
``labels/loop -> .``. Following the loop used to turn each patient into 41 records: the
site planned its noise for q = 1/82 instead of 1/2 and its per-patient epsilon was about
41 times too optimistic. Now B's privacy ledger on disk plans for the distinct patients,
B reports them as num-examples every round, and B's folder is left exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from medgen.data.data_check import check_folder
from medgen.privacy.accounting import sample_rate_for
from medgen.server.cli import main
from medgen.server.run_log import read_metrics
from medgen.sim.config import SimConfig
from medgen.sim.federation import build_federation

SIM = dict(seed=0, sites="A,B", subjects_per_site=4, public_size=4, heldout_fit=0,
           heldout_test=0, image_size=32)
BATCH = 2


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry by lstat: files by content hash, links by target text (never followed)."""
    state = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder) / name
            info = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                state[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                state[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mtime_ns)
            else:
                state[rel] = ("dir",)
    return state


@pytest.mark.slow
def test_a_symlink_loop_does_not_inflate_a_sites_patients(tmp_path, run_dir, capsys):
    torch.set_num_threads(1)
    fed = build_federation(SimConfig(**SIM), tmp_path / "fed")
    site_b = fed.site_dir("B")
    patients = fed.data["counts"]["sites/B"]
    assert patients == SIM["subjects_per_site"]
    os.symlink(".", site_b / "images" / "loop")
    os.symlink(".", site_b / "labels" / "loop")
    before = tree_state(site_b)
    assert check_folder(site_b).patients == patients  # data check's verdict, before training

    code = main(["simulate", "--data-root", str(fed.root), "--out", str(run_dir),
                 "--set", "num-rounds=2", "--set", "local-steps=2",
                 "--set", f"batch-size={BATCH}", "--set", "image-size=32",
                 "--set", "accountant=rdp", "--set", "eval-every=0",
                 "--set", "simulate-actors=1",  # one Ray actor: see tests/conftest.py
                 "--set", "target-epsilon=10", "--set", "options.gen-width=4",
                 "--set", "options.disc-width=4", "--timeout", "600"])
    out = capsys.readouterr().out
    assert code == 0, out

    # the ledger on B's disk planned its noise for the distinct patients ...
    ledger = json.loads((run_dir / "state" / "B" / "privacy_ledger.json").read_text())
    assert ledger["plan"]["sample_rate"] == pytest.approx(sample_rate_for(patients, BATCH)) == 0.5
    assert ledger["plan"]["unit"] == "patient"
    # ... and B reported them as its examples in every round
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["round"] for r in train] == [1, 2]
    for record in train:
        assert record["per_site"]["B"]["num-examples"] == patients
        assert record["per_site"]["A"]["num-examples"] == patients
    # the site folder, links included, is exactly as it was
    assert tree_state(site_b) == before
