"""End to end: `medgen-server simulate` on Flower's real simulation engine (2 sites, 2 rounds,
32 px, 2 local steps) yields a checkpoint, metrics, samples and a report, and leaves no
process behind."""

from __future__ import annotations

import json

import pytest

from medgen.server.checkpoint import load_checkpoint
from medgen.server.cli import main
from medgen.server.run_log import read_metrics


@pytest.mark.slow
def test_simulate_two_sites_two_rounds(tiny_federation, run_dir, flower_processes, capsys):
    code = main(["simulate", "--data-root", str(tiny_federation), "--out", str(run_dir),
                 "--set", "num-rounds=2", "--set", "local-steps=2", "--set", "batch-size=2",
                 "--set", "image-size=32", "--set", "accountant=rdp", "--set", "eval-every=2",
                 "--set", "simulate-actors=1",  # one Ray actor: see tests/conftest.py
                 "--set", "eval-samples=8", "--set", "options.gen-width=4",
                 "--set", "options.disc-width=4", "--timeout", "600"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert flower_processes(run_dir) == []  # all stopped

    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.server_round == 2
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["round"] for r in train] == [1, 2]
    for record in train:
        assert set(record["per_site"]) == {"A", "B"} and record["excluded"] == []
        eps = [m["epsilon"] for m in record["per_site"].values()]
        assert record["aggregate"]["epsilon"] == pytest.approx(max(eps))
    # epsilon grows over rounds and ends at (not above) the planned target
    assert train[0]["aggregate"]["epsilon"] < train[1]["aggregate"]["epsilon"] <= 10.0 + 1e-6
    evals = [r for r in records if r["kind"] == "eval"]
    # round 0 scores the untrained generator (the baseline FD), then the final round
    assert [r["round"] for r in evals] == [0, 2] and all(any(k.startswith("fd/") for k in r["metrics"]) for r in evals)
    assert (run_dir / "samples" / "round_002.png").stat().st_size > 0
    assert json.loads((run_dir / "DONE").read_text())["status"] == "ok"
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert set(privacy["node_ledgers"]) == {"A", "B"} and privacy["unit"] == "patient"
    # 2 rounds x 2 local steps + dp-cgan's one scanner-moment release, declared in the plan
    assert privacy["node_ledgers"]["A"]["steps"] == 5
    assert privacy["node_ledgers"]["A"]["plan"]["releases"] == [[3.0, 1.0, 1]]
    assert (run_dir / "report.html").stat().st_size > 0
    assert "round 2/2 train: 2 site(s) answered" in out and "report.html" in out
    assert out.strip().splitlines()[-1].startswith("finished round 2 in ")
    # the run belonged to one coordinator: DONE carries its id, and its own stop left the
    # supervisor nothing to clean up
    holder = json.loads((run_dir / ".coordinator" / "lock").read_text())
    assert json.loads((run_dir / "DONE").read_text())["coordinator"] == holder["coordinator_id"]
    assert holder["ended_at"] is not None
    assert "closed the pipe (normal end); stopped 0 process(es)" in \
        (run_dir / ".coordinator" / "supervisor.log").read_text()
