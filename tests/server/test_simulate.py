"""The harness' pieces that need no engine: the app bundle, result verification (what a
run achieved, in one line), the DONE marker's owner, --fresh and the command line's numbers."""

from __future__ import annotations

import ast
import io
import tomllib
import zipfile

import pytest
import torch
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import validate_config

from medgen.config import RunConfig
from medgen.server import simulate
from medgen.server.checkpoint import new_checkpoint, save_checkpoint
from medgen.server.cli import main
from medgen.server.previous_run import set_aside
from medgen.server.run_log import RunDir
from medgen.server.simulate import NothingTrained, SimulationError, verify_results, write_app_dir


def test_app_dir_carries_the_full_run_config_and_ships_only_the_shim(tmp_path):
    config = RunConfig(num_rounds=3, sites="A,B", data_root="/data/x y", options={"gen-width": 8})
    app_dir = write_app_dir(config, tmp_path / "app")
    (app_dir / "stray_module.py").write_text("raise SystemExit('must not ship')\n")
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(pyproject, check_module=False)
    assert ok, errors
    flat = pyproject["tool"]["flwr"]["app"]["config"]
    options = flat.pop("options")
    assert RunConfig.from_run_config({**flat, **{f"options.{k}": v for k, v in options.items()}}) == config
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir))).namelist())
    shipped = {n for n in names if not n.startswith(".info/")}
    assert shipped == {"pyproject.toml", "medgen_flower_shim.py"}
    # no logic in the bundle: the shim only looks up the INSTALLED apps, lazily, one per process
    tree = ast.parse((app_dir / "medgen_flower_shim.py").read_text())
    assert [a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names] \
        == ["importlib"]
    assert [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))] \
        == ["__getattr__"]
    looked_up = {c.args[0].value for c in ast.walk(tree)
                 if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "import_module"}
    assert looked_up == {"medgen.server.app", "medgen.client.app"}


def _run_dir(tmp_path, status="ok", train_lines=(), checkpoint_round=2):
    run_dir = RunDir(tmp_path)
    config = RunConfig(sites="A,B", num_rounds=2)
    for line in train_lines:
        run_dir.log_train(**line)
    if checkpoint_round is not None:
        save_checkpoint(tmp_path, new_checkpoint({"gen.w": torch.ones(1)}, checkpoint_round, config, "k"))
    run_dir.write_done(status, error="boom" if status != "ok" else None)
    return run_dir, config


def test_verify_rejects_a_run_where_every_client_failed(tmp_path):
    # `flwr run` exits 0 in this case: the harness must notice on its own
    excluded = [{"site": "A", "reason": "training failed"}, {"site": "B", "reason": "training failed"}]
    kept = {"kept-previous-weights": 1.0}
    run_dir, config = _run_dir(tmp_path, checkpoint_round=0, train_lines=[
        dict(server_round=r, per_site={}, excluded=excluded, aggregate=kept) for r in (1, 2)])
    with pytest.raises(NothingTrained, match="no site trained in rounds 1-2: A: training failed; "
                       "B: training failed; the checkpoint holds the initial weights"):
        verify_results(run_dir, run_dir.read_done(), config, 1.0)


def test_verify_reports_server_failure_and_accepts_a_good_run(tmp_path):
    run_dir, config = _run_dir(tmp_path / "bad", status="failed")
    with pytest.raises(SimulationError, match="boom"):
        verify_results(run_dir, run_dir.read_done(), config, 1.0)
    good, config = _run_dir(tmp_path / "good", train_lines=[
        dict(server_round=r, per_site={"A": {"epsilon": 1.0}}, excluded=[], aggregate={}) for r in (1, 2)])
    result = verify_results(good, good.read_done(), config, 1.0)
    assert result.final_round == 2 and result.outcome.summary() == "finished round 2"


def test_a_skipped_middle_round_is_named_but_the_run_is_complete(tmp_path):
    lines = [dict(server_round=1, per_site={"A": {}}, excluded=[{"site": "B", "reason": "timeout"}],
                  aggregate={"kept-previous-weights": 1.0}),
             dict(server_round=2, per_site={"A": {}, "B": {}}, excluded=[], aggregate={})]
    run_dir, config = _run_dir(tmp_path, train_lines=lines)
    result = verify_results(run_dir, run_dir.read_done(), config, 1.0)
    assert result.outcome.summary() == "finished round 2 (round 1 trained no site and kept the weights)"


def test_no_checkpoint_and_partial_answers_are_explained(tmp_path):
    line = dict(server_round=1, per_site={"A": {}}, aggregate={"kept-previous-weights": 1.0},
                excluded=[{"site": "B", "reason": "site replied with an error: site B: refused to "
                           "train, its privacy budget would be exceeded"}])
    run_dir, config = _run_dir(tmp_path, train_lines=[line], checkpoint_round=None)
    with pytest.raises(NothingTrained) as err:
        verify_results(run_dir, run_dir.read_done(), config, 1.0)
    assert str(err.value) == ("no site trained in rounds 1-2: budget exhausted at B; only 1 valid "
                              "update(s) per round, fewer than min-sites 2; no checkpoint holds "
                              "trained weights")


def test_a_done_marker_of_another_coordinator_is_not_trusted(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.write_done("ok", coordinator="someone-else", final_round=6)
    assert run_dir.read_done("me") is None and run_dir.read_done("someone-else")["final_round"] == 6
    run_dir.write_done("ok", coordinator="me", final_round=2)
    assert run_dir.read_done("me")["final_round"] == 2



class _Clock:
    """simulate's `time`, advanced only by its sleeps (no test waits for real)."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_flower_is_asked_whether_the_run_finished_when_the_log_stream_ends_not_every_30_s(
        tmp_path, monkeypatch):
    """The harness asks `flwr ls` (a Python start: ~2 s of CPU) only once the SuperLink has
    ended the log stream, which it does when the run finishes; a run that finished without
    a DONE marker is still a failure that names the marker. Mutation: the old 30 s polling
    asks 4 times before the stream ends at 100 s (fails the count)."""
    import os
    import subprocess
    from types import SimpleNamespace

    clock, asked = _Clock(), []

    class Stream:
        pid = os.getpid()

        def poll(self):
            return 0 if clock.now >= 100 else None

        def wait(self, timeout=None):
            return 0

    class Link:
        log_path, seen = tmp_path / "superlink.log", {}

        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            pass

        def check_alive(self):
            pass

        def stop(self):
            pass

        def stream_log(self, run_id, path):
            return Stream()

        def flwr(self, *args, timeout=120.0):
            if args[0] == "ls":
                asked.append(clock.now)
                return subprocess.CompletedProcess(args, 0, '{"runs": [{"status": "finished:completed"}]}', "")
            return subprocess.CompletedProcess(args, 0, '{"run-id": 7}', "")

    monkeypatch.setattr(simulate, "time", clock)
    monkeypatch.setattr(simulate, "SuperLink", Link)
    coordinator = SimpleNamespace(id="me", env={}, record=lambda pids: None, check_supervisor=lambda: None)
    config = RunConfig(sites="A,B", run_dir=str(tmp_path / "run"))
    with pytest.raises(SimulationError, match="finished but the ServerApp wrote no DONE marker"):
        simulate.run_simulation(config, tmp_path / "work", progress=lambda line: None,
                                coordinator=coordinator)
    assert asked and asked[0] >= 100 and len(asked) == 1

def test_fresh_moves_the_previous_results_aside_and_keeps_ledgers_and_data(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "metrics.jsonl", "samples/round_001.png", "state/A/privacy_ledger.json",
                 "federation/manifest.json", ".coordinator/lock", "flower/run.log"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    moved = set_aside(run, keep=(run / "federation", run / "state"))
    assert moved.parent == tmp_path and moved.name.startswith("run.prev-")
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoint.pt", "flower", "metrics.jsonl", "samples"]
    assert (moved / "checkpoint.pt").read_text() == "checkpoint.pt"
    assert sorted(p.name for p in run.iterdir()) == [".coordinator", "federation", "state"]
    assert set_aside(run, keep=(run / "federation", run / "state")) is None  # nothing left to move
    (run / "metrics.jsonl").write_text("x")
    assert set_aside(run, keep=(run / "state",), delete=True) is None
    assert sorted(p.name for p in run.iterdir()) == [".coordinator", "state"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", moved.name]


@pytest.mark.parametrize("argv,needle", [
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "-1"], "--timeout"),
    (["--port", "0"], "--port"),
    (["--sites", "0"], "--sites"),
    (["--subjects-per-site", "-3"], "--subjects-per-site"),
])
def test_simulate_command_line_numbers_are_refused_by_name(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", *argv])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_delete_previous_needs_fresh(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "run"), "--delete-previous"]) == 2
    assert "--delete-previous only goes with --fresh" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, num_sites, expected", [
    ({}, None, ("A", "B", "C", "D", "M")),               # the default: the MR site M included
    ({"sites": "A,M"}, None, ("A", "M")),                 # sites asked for by name
    ({}, 4, ("A", "B", "C", "D")),                        # --sites 4: the CT sites only
])
def test_head_ct_builds_the_sites_asked_for_and_by_default_all_five(tmp_path, monkeypatch,
                                                                    overrides, num_sites, expected):
    built = []

    class Built:
        def __init__(self, head):
            built.append(head)
            self.site_names = head.site_names

    monkeypatch.setattr(simulate, "build_head_federation", lambda head, root: Built(head))
    config = simulate._build_head(RunConfig.from_run_config(overrides), tmp_path, num_sites, 8)
    assert tuple(built[0].site_names) == expected and config.site_names == expected


def test_dims_three_builds_the_head_federation_as_volumes_and_is_refused_for_the_brain(
        tmp_path, monkeypatch, capsys):
    built = []

    class Built:
        def __init__(self, head):
            built.append(head)
            self.site_names = head.site_names

    monkeypatch.setattr(simulate, "build_head_federation", lambda head, root: Built(head))
    simulate._build_head(RunConfig(), tmp_path, None, 8, dims=3)
    assert built[0].dims == 3
    assert main(["simulate", "--out", str(tmp_path / "run"), "--dims", "3"]) == 2
    assert "--federation head-ct" in capsys.readouterr().err
    assert not (tmp_path / "run" / "federation").exists()  # refused before any build
