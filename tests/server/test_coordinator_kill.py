"""Issue 13 on Flower's real simulation engine: a coordinator owns its run directory and its
processes, and never loses trained work.

One federation (2 sites, 32 px, 2 local steps, 3 rounds), driven through the real command
line in subprocesses, in this order (a module fixture: each simulation costs ~40 s here):

1. ``medgen-server simulate`` starts; a second one on the same --out is refused, naming the
   first one's pid (exit 4);
2. when metrics.jsonl shows round 1, the first is SIGKILLed mid-round; within seconds no
   process it started remains (its descendants, their sessions, anything carrying the
   run's marker environment), timed;
3. the same command again resumes and finishes: every site's privacy ledger is charged
   exactly once per round, metrics.jsonl has exactly one train line per round;
then, on that finished run, whose sites' budgets are now spent:
4. raising num-rounds: round 4 trains no site; exit 3, the line says why, and the
   checkpoint still holds the round-3 weights (it used to be relabelled round 4);
5. ``--fresh`` moves the trained run aside to RUN.prev-<time> (checkpoint intact), then
   every site refuses (exit 3).

Every process the tests start is stopped by PID in the fixture's teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medgen.server.checkpoint import load_checkpoint
from medgen.server.processes import Proc, descendants, is_marked, markers, read_proc, scan
from medgen.server.run_log import read_metrics

pytestmark = pytest.mark.slow

ROUNDS = 3
SETTINGS = ["--set", "local-steps=2", "--set", "batch-size=2", "--set", "image-size=32",
            "--set", "accountant=rdp", "--set", "eval-every=0", "--set", "options.gen-width=4",
            "--set", "simulate-actors=1",  # one Ray actor: see tests/conftest.py
            "--set", "options.disc-width=4", "--timeout", "600"]


def _command(data_root: Path, out: Path, rounds: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medgen.server.cli", "simulate", "--data-root", str(data_root),
            "--out", str(out), "--set", f"num-rounds={rounds}", *SETTINGS, *extra]


def _left_behind(out: Path, snapshot: list[Proc]) -> list[Proc]:
    """Processes still alive that the killed coordinator started: the same pid and start
    time as in the snapshot, or in one of the snapshot's sessions (not ours), or marked."""
    own_session = os.getsid(0)
    known = {(p.pid, p.start) for p in snapshot}
    sessions = {p.sid for p in snapshot} - {own_session}
    marks = markers(out)
    home = f"FLWR_HOME={out / 'flower' / 'home'}"
    left = []
    for proc in scan().values():
        if proc.pid == os.getpid() or proc.zombie:
            continue
        env = (Path("/proc") / str(proc.pid) / "environ")
        try:
            flwr_home = home.encode() in env.read_bytes()
        except OSError:
            flwr_home = False
        if (proc.pid, proc.start) in known or proc.sid in sessions or is_marked(proc.pid, marks) or flwr_home:
            left.append(proc)
    return left


def _wait_for_round(metrics: Path, round_: int, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(r.get("kind") == "train" and r.get("round") == round_ for r in read_metrics(metrics)):
            return time.monotonic() - t0
        assert proc.poll() is None, f"the coordinator exited early ({proc.returncode})"
        time.sleep(0.5)
    raise AssertionError(f"no round {round_} in {metrics} after {timeout} s")


@pytest.fixture(scope="module")
def lifecycle(tiny_federation, tmp_path_factory):
    out = tmp_path_factory.mktemp("coordinator") / "run"
    logs = out.parent
    started: list[subprocess.Popen] = []
    facts: dict = {"out": out}

    def run(name: str, command: list[str], wait: bool = True) -> subprocess.Popen:
        with open(logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started.append(proc)
        if wait:
            proc.wait(timeout=900)
        return proc

    try:
        first = run("first", _command(tiny_federation, out, ROUNDS), wait=False)
        t0 = time.monotonic()
        while not (out / ".coordinator" / "lock").exists() or '"supervisor_pid": null' in \
                (out / ".coordinator" / "lock").read_text():
            assert time.monotonic() - t0 < 120 and first.poll() is None
            time.sleep(0.2)
        second = run("second", _command(tiny_federation, out, ROUNDS))
        facts["second"] = (second.returncode, (logs / "second.log").read_text(), first.pid)
        assert first.poll() is None, "the first coordinator must still run while the second is refused"

        facts["round_1_after"] = _wait_for_round(out / "metrics.jsonl", 1, first, timeout=600)
        snapshot = [read_proc(first.pid), *descendants(first.pid)]
        facts["snapshot"] = [p for p in snapshot if p is not None]
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_at = time.monotonic()
        left = _left_behind(out, facts["snapshot"])
        while left and time.monotonic() - killed_at < 30:
            time.sleep(0.1)
            left = _left_behind(out, facts["snapshot"])
        facts["cleanup_seconds"] = time.monotonic() - killed_at
        facts["left"] = [(p.pid, p.sid, p.state) for p in left]

        resumed = run("resumed", _command(tiny_federation, out, ROUNDS))
        facts["resumed"] = (resumed.returncode, (logs / "resumed.log").read_text())
        facts["left_after_resume"] = _left_behind(out, [])
        yield facts
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for proc in _left_behind(out, facts.get("snapshot", [])):  # safety net, by PID
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_second_coordinator_is_refused_while_the_first_runs(lifecycle):
    code, output, first_pid = lifecycle["second"]
    assert code == 4, output
    assert f"is in use by another coordinator, pid {first_pid} " in output


def test_sigkill_mid_round_leaves_no_process_behind(lifecycle):
    # the snapshot at the kill: the coordinator, its supervisor, `flwr log`, the SuperLink,
    # Flower's SuperExec and simulation, Ray's daemons and actors
    assert len(lifecycle["snapshot"]) >= 8, lifecycle["snapshot"]
    assert lifecycle["left"] == [], lifecycle["left"]
    assert lifecycle["cleanup_seconds"] < 10.0
    print(f"\nround 1 after {lifecycle['round_1_after']:.1f} s; {len(lifecycle['snapshot'])} processes "
          f"stopped {lifecycle['cleanup_seconds']:.2f} s after the SIGKILL")


def test_the_rerun_resumes_and_charges_every_ledger_once_per_round(lifecycle):
    out = lifecycle["out"]
    code, output = lifecycle["resumed"]
    assert code == 0, output
    assert f"finished round {ROUNDS}" in output.splitlines()[-1]
    train = [r["round"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert train == list(range(1, ROUNDS + 1))
    for site in ("A", "B"):
        ledger = json.loads((out / "state" / site / "privacy_ledger.json").read_text())
        charged = [e["server_round"] for e in ledger["rounds"] if e["steps"] > 0]
        assert sorted(charged) == list(range(1, ROUNDS + 1)), (site, ledger["rounds"])
    assert load_checkpoint(out).server_round == ROUNDS
    assert lifecycle["left_after_resume"] == []


def test_rounds_past_the_budget_keep_the_checkpoint_and_exit_3(lifecycle, tiny_federation):
    out = lifecycle["out"]
    before = load_checkpoint(out)
    done = subprocess.run(_command(tiny_federation, out, ROUNDS + 1), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 3, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medgen-server simulate: no site trained in round {ROUNDS + 1}: budget "
                           f"exhausted at every site"), last
    assert last.endswith(f"the checkpoint stays at round {ROUNDS}, the last round that trained")
    after = load_checkpoint(out)
    assert after.server_round == ROUNDS
    for key, value in before.shared_state.items():
        assert torch.equal(after.shared_state[key], value)


def test_fresh_moves_the_trained_run_aside(lifecycle, tiny_federation):
    out = lifecycle["out"]
    trained = load_checkpoint(out)
    done = subprocess.run(_command(tiny_federation, out, ROUNDS, "--fresh"), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 3, done.stdout + done.stderr   # the ledgers stayed: all refuse
    assert "no site trained in rounds 1-3: budget exhausted at every site" in done.stderr
    kept = [p for p in out.parent.iterdir() if p.name.startswith("run.prev-")]
    assert len(kept) == 1 and f"results are kept in {kept[0]}" in done.stdout
    moved = load_checkpoint(kept[0])
    assert moved.server_round == ROUNDS and moved.run_key == trained.run_key
    assert [r["round"] for r in read_metrics(kept[0] / "metrics.jsonl") if r["kind"] == "train"] == \
        list(range(1, ROUNDS + 2))
    assert load_checkpoint(out).server_round == 0  # the fresh run trained nothing: initial weights
    assert (out / "state" / "A" / "privacy_ledger.json").exists()  # ledgers are not results
