"""One coordinator per run directory, and nothing it started outlives it (no Flower here:
stand-in processes with the same shapes as the SuperLink's tree, see test_coordinator_kill.py
for the real one).

Every process these tests start is stopped by PID in a finalizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medgen.server.coordinator import Coordinator
from medgen.server.processes import alive, read_proc
from medgen.server.run_lock import RunDirLocked, RunLock, read_holder
from medgen.server.supervisor import sweep

# a coordinator stand-in: claims RUN_DIR, starts a marked child in a NEW session, which
# starts a grandchild with an EMPTY environment (like Ray's renamed agents), records the
# child, prints the pids and waits to be killed
COORDINATOR = textwrap.dedent("""
    import json, subprocess, sys, time
    from pathlib import Path
    from medgen.server.coordinator import Coordinator
    from medgen.server.processes import start_time

    with Coordinator.claim(Path(sys.argv[1]), progress=lambda line: None) as coordinator:
        child = subprocess.Popen([sys.executable, "-c", '''
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env={})
    print(grandchild.pid, flush=True)
    time.sleep(600)
    '''], env={**coordinator.env, "PATH": "/usr/bin:/bin"}, start_new_session=True, stdout=subprocess.PIPE, text=True)
        grandchild = int(child.stdout.readline())
        if len(sys.argv) > 2:  # record the child, as the harness records the SuperLink
            coordinator.record({child.pid: start_time(child.pid)})
        print(json.dumps({"child": child.pid, "grandchild": grandchild,
                          "supervisor": coordinator.supervisor.pid}), flush=True)
        time.sleep(600)
""")


@pytest.fixture
def started():
    """Processes to stop at the end, whatever happened: (pid, start time)."""
    pids: list[tuple[int, str]] = []
    yield pids
    for pid, start in pids:
        if alive(pid, start):
            os.kill(pid, signal.SIGKILL)


def _track(started, pid: int) -> None:
    proc = read_proc(pid)
    if proc is not None:
        started.append((pid, proc.start))


def _coordinator(run_dir: Path, started, *, record: bool = True) -> tuple[subprocess.Popen, dict]:
    args = [sys.executable, "-c", COORDINATOR, str(run_dir)] + (["record"] if record else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    _track(started, proc.pid)
    pids = json.loads(proc.stdout.readline())
    for pid in pids.values():
        _track(started, pid)
    return proc, pids


def _gone_within(pids, seconds: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if not any(alive(pid) for pid in pids):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"still alive after {seconds} s: {[p for p in pids if alive(p)]}")


def test_a_second_coordinator_is_refused_with_the_holders_pid(tmp_path, started):
    proc, _ = _coordinator(tmp_path / "run", started)
    with pytest.raises(RunDirLocked, match=f"in use by another coordinator, pid {proc.pid} "):
        RunLock(tmp_path / "run").acquire("second")
    assert read_holder(tmp_path / "run").pid == proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "marked-only"])
def test_sigkill_of_the_coordinator_stops_everything_it_started(tmp_path, started, record):
    proc, pids = _coordinator(tmp_path / "run", started, record=record)
    assert alive(pids["child"]) and alive(pids["grandchild"])
    assert read_proc(pids["child"]).sid == pids["child"]                      # its own session
    assert (Path("/proc") / str(pids["grandchild"]) / "environ").read_bytes() == b""  # no marker
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the supervisor sweeps: the marked child, and its session with the unmarked grandchild
    _gone_within([pids["child"], pids["grandchild"], pids["supervisor"]], 10.0)
    log = (tmp_path / "run" / ".coordinator" / "supervisor.log").read_text()
    assert "died; stopped 2 process(es)" in log
    # the lock is free again, and names the dead coordinator as the previous holder
    lock = RunLock(tmp_path / "run")
    assert lock.acquire("next").pid == proc.pid
    lock.release()


def test_a_restart_cleans_up_what_a_killed_coordinator_and_supervisor_left(tmp_path, started):
    proc, pids = _coordinator(tmp_path / "run", started)
    os.kill(pids["supervisor"], signal.SIGKILL)  # both die: nobody swept
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert alive(pids["child"]) and alive(pids["grandchild"])
    lines = []
    with Coordinator.claim(tmp_path / "run", progress=lines.append) as coordinator:
        assert not alive(pids["child"]) and not alive(pids["grandchild"])
        assert coordinator.previous.pid == proc.pid and len(coordinator.left_over) == 2
    assert lines == [f"stopped 2 process(es) left running by {coordinator.previous.describe()}"]


def test_a_clean_exit_frees_the_lock_at_once(tmp_path):
    with Coordinator.claim(tmp_path / "run", progress=lambda line: None) as first:
        supervisor = first.supervisor.pid
    assert not alive(supervisor)
    with Coordinator.claim(tmp_path / "run", progress=lambda line: None) as second:
        assert second.previous.coordinator_id == first.id and second.previous.ended_at
        assert second.left_over == []


def test_sweep_never_touches_unmarked_processes(tmp_path, started):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                start_new_session=True)
    _track(started, stranger.pid)
    assert sweep(tmp_path / "run") == []
    assert alive(stranger.pid)
    stranger.kill()
    stranger.wait()
