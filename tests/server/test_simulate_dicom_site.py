"""Issue 7: a simulation in which one site's data is a DICOM folder trains like the NIfTI sites.

A real `medgen-server simulate` on Flower's simulation engine (2 sites, 2 rounds, 32 px, 2
local steps) over a federation built with site B as DICOM series (no NIfTI image in B's
folder): B answers every round with its patient count and its epsilon, the tensors its node
trained on are those of the NIfTI build of B, and the DICOM folder is left byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from medgen.data.cache import TensorCache
from medgen.data.site_data import load_site
from medgen.server.cli import main
from medgen.server.run_log import read_metrics

SIM = dict(seed=0, sites="A,B", subjects_per_site=5, public_size=4, heldout_fit=0,
           heldout_test=0, image_size=32)
TARGET_EPSILON = 10.0


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_dicom_site_trains_like_a_nifti_site(tmp_path, run_dir, flower_processes, capsys):
    from medgen.sim.config import SimConfig
    from medgen.sim.federation import build_federation

    torch.set_num_threads(1)
    fed = build_federation(SimConfig(**SIM, dicom_sites="B"), tmp_path / "fed")
    twin = build_federation(SimConfig(**SIM), tmp_path / "fed-nifti")  # the same B, as NIfTI
    site_b = fed.site_dir("B")
    assert not list((site_b / "images").rglob("*.nii*"))  # B's images are DICOM only
    patients_b = fed.data["counts"]["sites/B"]
    before = _tree_hashes(site_b)

    code = main(["simulate", "--data-root", str(fed.root), "--dicom-sites", "B",
                 "--out", str(run_dir), "--set", "num-rounds=2", "--set", "local-steps=2",
                 "--set", "batch-size=2", "--set", "image-size=32", "--set", "accountant=rdp",
                 "--set", "eval-every=0", "--set", f"target-epsilon={TARGET_EPSILON}",
                 "--set", "simulate-actors=1",  # one Ray actor: see tests/conftest.py
                 "--set", "options.gen-width=4", "--set", "options.disc-width=4",
                 "--timeout", "600"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert flower_processes(run_dir) == []

    # B took part in every round, with one example per patient and an epsilon within target
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["round"] for r in train] == [1, 2]
    epsilons = []
    for record in train:
        assert set(record["per_site"]) == {"A", "B"} and record["excluded"] == []
        b = record["per_site"]["B"]
        assert b["num-examples"] == patients_b == 5
        assert b["steps"] == 2
        assert 0.0 < b["epsilon"] <= TARGET_EPSILON + 1e-6
        assert record["aggregate"]["epsilon"] >= b["epsilon"]
        epsilons.append(b["epsilon"])
    assert epsilons[0] < epsilons[1]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["node_ledgers"]["B"]["steps"] == 5  # 2 x 2 DP-SGD steps + the moment release

    # what B's node trained on: its one cache entry, keyed on the DICOM files' bytes ...
    cache_dir = run_dir / "state" / "B" / "cache"
    [entry] = list(cache_dir.glob("site-*.pt"))
    from_dicom = load_site(site_b, 32)  # no cache: read through the DICOM reader again
    assert TensorCache(cache_dir).path_for(from_dicom.fingerprint) == entry
    trained = TensorCache(cache_dir).get(from_dicom.fingerprint)
    assert trained is not None and trained["skipped"] == []
    # ... equals what the NIfTI build of B yields
    nifti = load_site(twin.site_dir("B"), 32)
    assert int(trained["num_patients"]) == nifti.num_patients == patients_b
    torch.testing.assert_close(trained["images"], nifti.images, rtol=0, atol=0)
    assert torch.equal(trained["labels"], nifti.labels)
    assert torch.equal(trained["patient_index"], nifti.patient_index)

    # nothing in the DICOM site's folder was modified, added or removed
    assert _tree_hashes(site_b) == before


def test_dicom_sites_must_match_an_existing_data_root(tmp_path, capsys):
    """`--data-root` on an all-NIfTI build with `--dicom-sites B` is refused before any run."""
    from medgen.sim.config import SimConfig
    from medgen.sim.federation import build_federation

    torch.set_num_threads(1)
    fed = build_federation(SimConfig(**{**SIM, "subjects_per_site": 1, "public_size": 0}),
                           tmp_path / "fed")
    code = main(["simulate", "--data-root", str(fed.root), "--dicom-sites", "B",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "DICOM sites are none, not B" in capsys.readouterr().err
    assert not (tmp_path / "run" / "flower").exists()
