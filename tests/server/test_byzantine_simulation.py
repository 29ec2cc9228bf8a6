"""Byzantine sites on Flower's REAL simulation engine, through `medgen-server simulate`.

The app bundle's shim is replaced, for this test only, by one whose ClientApp wraps the
installed medgen ClientApp in an attack mod keyed on the simulated partition (nothing of
it is in the product). 4 sites, 2 rounds, 32 px:

- round 1: site D is absent (an error reply before any training: no budget spent); site C
  sends its update x100 (the norm screen must reject it although every site's one-off
  release row changes in round 1);
- round 2: D returns (its release row jumps from zero: it must be accepted); C claims site
  A's index with a sign-flipped update (refused, logged against C, A's metrics intact); B
  claims 10^12 examples (weighted by what it declared in round 1).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from medgen.server import simulate
from medgen.server.checkpoint import load_checkpoint
from medgen.server.cli import main
from medgen.server.run_log import read_metrics

ATTACK_SHIM = '''"""TEST-ONLY app bundle: the installed medgen apps, the ClientApp wrapped in attacks."""
import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import medgen.client.app as _client
import medgen.server.app as _server

server_app = _server.app
client_app = ClientApp()


def _attack(msg, context, call_next):
    site, server_round = int(context.node_config["partition-id"]), int(msg.content["config"]["absolute-round"])
    if site == 3 and server_round == 1:
        return Message(Error(4099, "site D is away this round"), reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_error() or site not in (1, 2):
        return reply
    before = msg.content["arrays"]
    arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    metrics = dict(reply.content["metrics"])
    if site == 2:
        factor = 100.0 if server_round == 1 else -1.0
        arrays = {k: (before[k].numpy() + factor * (v - before[k].numpy())).astype(v.dtype)
                  if v.dtype.kind == "f" else v for k, v in arrays.items()}
        if server_round == 2:
            metrics["site-index"] = 0
    elif server_round == 2:
        metrics["num-examples"] = 10 ** 12
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.train(mods=[_attack])
def _train(msg, context):
    return _client.app(msg, context)
'''


def _kill_marked(run_dir: Path) -> None:
    marker = f"FLWR_HOME={run_dir / 'flower' / 'home'}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                continue


@pytest.mark.slow
def test_byzantine_sites_on_the_simulation_engine(tmp_path, monkeypatch, capsys):
    from medgen.sim.config import SimConfig
    from medgen.sim.federation import build_federation

    real_write = simulate.write_app_dir

    def write_attack_app(config, dest):
        app_dir = real_write(config, dest)
        (app_dir / "medgen_flower_shim.py").write_text(ATTACK_SHIM)
        return app_dir

    monkeypatch.setattr(simulate, "write_app_dir", write_attack_app)
    data = tmp_path / "data"
    build_federation(SimConfig(seed=0, sites="A,B,C,D", subjects_per_site=6, public_size=8,
                               heldout_fit=2, heldout_test=2, image_size=32), data)
    run_dir = tmp_path / "run"
    try:
        code = main(["simulate", "--data-root", str(data), "--out", str(run_dir),
                     "--set", "num-rounds=2", "--set", "local-steps=2", "--set", "batch-size=2",
                     "--set", "image-size=32", "--set", "accountant=rdp", "--set", "eval-every=0",
                     "--set", "simulate-actors=1",  # one Ray actor: see tests/conftest.py
                     "--set", "options.gen-width=4", "--set", "options.disc-width=4",
                     "--set", "sites=A,B,C,D", "--timeout", "900"])
        assert code == 0, capsys.readouterr().out
    finally:
        _kill_marked(run_dir)

    first, second = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    excluded = {e["site"]: e["reason"] for e in first["excluded"]}
    assert set(first["per_site"]) == {"A", "B"}
    assert "update norm" in excluded["C"] and any("away" in r for s, r in excluded.items() if s.startswith("node-"))
    assert set(second["per_site"]) == {"A", "B", "D"}  # D back after missing round 1
    assert [e["site"] for e in second["excluded"]] == ["C"]
    assert "cannot speak for another site" in second["excluded"][0]["reason"]
    assert second["per_site"]["B"]["num-examples"] == 10 ** 12
    assert second["per_site"]["B"]["aggregation-weight"] == first["per_site"]["B"]["num-examples"]
    assert second["per_site"]["A"]["epsilon"] > first["per_site"]["A"]["epsilon"]  # A's own reply
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["reported_by_sites"]["C"]["spent_while_excluded"] is True
    assert privacy["reported_by_sites"]["C"]["epsilon"] > 0
    shared = load_checkpoint(run_dir).shared_state
    assert all(np.isfinite(v.float().numpy()).all() and float(v.float().abs().max()) < 100 for v in shared.values())
