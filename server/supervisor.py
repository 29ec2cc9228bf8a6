"""The coordinator's supervisor: when the coordinator dies, however it dies, every process
it started dies too.

Why a separate process: a SIGKILLed coordinator runs no ``finally``. The SuperLink it
starts lives in a session of its own, Flower's SuperExec starts another session, and Ray
(the simulation engine) starts a dozen processes in it, some of which later lose their
parent and rename themselves, zeroing their environment. A parent-death signal
(PR_SET_PDEATHSIG) on the SuperLink would kill only the SuperLink and orphan the rest,
and it needs a preexec_fn, unsafe in a process with threads. So:

- ``Supervisor.start`` runs ``python -m medgen.server.supervisor RUN_DIR ID`` in a new
  session (a Ctrl-C or ``kill -PGID`` aimed at the coordinator does not reach it), with a
  pipe from the coordinator on stdin and the run-directory lock inherited;
- it blocks reading the pipe. End of file means the coordinator closed it (normal end)
  or died (the kernel closes it, SIGKILL included); either way it runs ``sweep`` and exits,
  and only then is the run-directory lock free;
- ``sweep`` stops, with SIGKILL, every process that is (a) recorded by the coordinator in
  RUN_DIR/.coordinator/processes.json with its start time, (b) marked with this run's
  environment (server/processes.py), or (c) in a session led by such a process, recorded
  or marked (Ray's renamed agents stay in the SuperExec's session). It scans until two
  scans in a row find nothing. The sweeper's own session and the coordinator's are
  never touched.

A new coordinator on the same run directory runs the same ``sweep`` (any coordinator id)
before it starts anything: that covers a supervisor that was killed too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from medgen.atomic import atomic_write_json
from medgen.server.processes import (Proc, alive, command_line, is_marked, markers, read_proc,
                                     scan, start_time)
from medgen.server.run_lock import coordinator_dir

PROCESSES_FILE = "processes.json"
LOG_FILE = "supervisor.log"


# -- the coordinator's record of what it started --------------------------------------
def record_processes(run_dir: Path, coordinator_id: str, pids: Mapping[int, str]) -> None:
    """Write (atomically) the pids the coordinator started, with start times and the
    sessions they lead."""
    sessions = {}
    for pid, start in pids.items():
        proc = read_proc(pid)
        if proc is not None and proc.start == start and proc.sid == pid:
            sessions[str(pid)] = start
    atomic_write_json(coordinator_dir(run_dir) / PROCESSES_FILE, {
        "coordinator": coordinator_id, "pids": {str(p): s for p, s in pids.items()},
        "sessions": sessions})


def recorded_processes(run_dir: Path) -> tuple[dict[int, str], dict[int, str]]:
    """(pids, session leaders) the last coordinator recorded, each with its start time."""
    try:
        data = json.loads((coordinator_dir(run_dir) / PROCESSES_FILE).read_text())
        return ({int(p): str(s) for p, s in data.get("pids", {}).items()},
                {int(p): str(s) for p, s in data.get("sessions", {}).items()})
    except (OSError, ValueError, TypeError, AttributeError):
        return {}, {}


# -- the sweep -------------------------------------------------------------------------
def sweep(run_dir: Path, coordinator_id: str | None = None, *, protect_sessions: tuple[int, ...] = (),
          timeout: float = 20.0) -> list[str]:
    """SIGKILL every process left by the coordinator(s) of ``run_dir``; returns what was
    stopped ("pid command" lines). ``coordinator_id`` None: any coordinator's."""
    run_dir = Path(run_dir).resolve()
    marks = markers(run_dir, coordinator_id)
    pids, leaders = recorded_processes(run_dir)
    protected = {os.getsid(0), *protect_sessions}
    sessions: set[int] = set()
    for sid, start in leaders.items():
        leader = read_proc(sid)
        if leader is None or leader.start == start:  # a live leader with another start: recycled pid
            sessions.add(sid)
    stopped: list[str] = []
    quiet_scans, deadline = 0, time.monotonic() + timeout
    while quiet_scans < 2 and time.monotonic() < deadline:
        table = scan()
        targets = [p for p in table.values() if _ours(p, pids, marks)]
        sessions.update(p.pid for p in targets if p.sid == p.pid)
        sessions -= protected  # a marked process in the user's session is stopped, not its session
        targets += [p for p in table.values() if p.sid in sessions and p not in targets]
        targets = [p for p in targets if p.pid != os.getpid() and not p.zombie]
        for proc in targets:
            line = f"{proc.pid} {command_line(proc.pid)[:160]}"
            try:
                if alive(proc.pid, proc.start):
                    os.kill(proc.pid, signal.SIGKILL)
                    stopped.append(line)
            except (ProcessLookupError, PermissionError):
                pass
        quiet_scans = 0 if targets else quiet_scans + 1
        time.sleep(0.1 if targets else 0.3)
    return stopped


def _ours(proc: Proc, pids: Mapping[int, str], marks: Mapping[str, str]) -> bool:
    return pids.get(proc.pid) == proc.start or is_marked(proc.pid, dict(marks))


# -- the supervisor process --------------------------------------------------------------
class Supervisor:
    """The coordinator's handle on its supervisor process."""

    def __init__(self, run_dir: Path, coordinator_id: str, lock_fd: int | None,
                 protect_session: int | None = None):
        self.run_dir, self.coordinator_id = Path(run_dir).resolve(), coordinator_id
        self.lock_fd, self.protect_session = lock_fd, protect_session if protect_session is not None else os.getsid(0)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Supervisor":
        log = coordinator_dir(self.run_dir) / LOG_FILE
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "medgen.server.supervisor", str(self.run_dir),
                   self.coordinator_id, str(self.protect_session), str(os.getpid()),
                   start_time(os.getpid()) or "?"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEN_")}  # never marked
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env,
                                         pass_fds=(self.lock_fd,) if self.lock_fd is not None else ())
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """Close the pipe (the supervisor sweeps, then exits) and wait for it."""
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    run_dir, coordinator_id, protect, parent, parent_start = (argv or sys.argv[1:])[:5]
    parent = int(parent)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):  # only the pipe ends this process
        signal.signal(sig, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns at end of file: the coordinator closed the pipe or died
    how = "closed the pipe (normal end)" if alive(parent, parent_start) else "died"
    stopped = sweep(Path(run_dir), coordinator_id, protect_sessions=(int(protect),))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} coordinator {coordinator_id} (pid {parent}) {how}; stopped {len(stopped)} "
          f"process(es) it left" + "".join(f"\n  {line}" for line in stopped), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
