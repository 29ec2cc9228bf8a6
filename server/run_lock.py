"""One coordinator per run directory: an flock on RUN_DIR/.coordinator/lock.

The lock is ``fcntl.flock`` on an open file description, so the kernel releases it when
the last process holding that description dies, however it dies (SIGKILL included): a
lock can never outlive its coordinator and there is no stale-lock guessing. The file's
content names the holder (pid, start time, coordinator id, command, supervisor pid) for
the message a second coordinator gets, and for the cleanup after a crash: a new holder
reads what the previous one recorded before writing its own line.

The file is written in place, never replaced by a rename (a rename would swap the inode
and with it the lock). The coordinator's supervisor (server/supervisor.py) inherits the
descriptor, so after a crash the lock stays held until the supervisor has stopped every
process the coordinator left; a coordinator that finds the lock held by a dead pid
therefore waits a little for that supervisor instead of failing at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medgen.server.processes import alive, start_time

COORDINATOR_DIR = ".coordinator"
LOCK_FILE = "lock"


class RunDirLocked(RuntimeError):
    """Another coordinator owns the run directory; the message names it and what to do."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run directory."""

    pid: int
    coordinator_id: str
    start: str | None = None           # the pid's start time: a recycled pid is not the holder
    started_at: float = 0.0
    host: str = ""
    command: str = ""
    supervisor_pid: int | None = None
    ended_at: float | None = None      # set on a clean release

    @property
    def running(self) -> bool:
        return alive(self.pid, self.start)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at)) if self.started_at else "?"
        return f"pid {self.pid} (coordinator {self.coordinator_id}, started {when}: {self.command or '?'})"


def coordinator_dir(run_dir: Path) -> Path:
    return Path(run_dir) / COORDINATOR_DIR


def read_holder(run_dir: Path) -> Holder | None:
    """What the lock file says (None if there is none or it is unreadable)."""
    try:
        data = json.loads((coordinator_dir(run_dir) / LOCK_FILE).read_text())
        return Holder(**{k: v for k, v in data.items() if k in Holder.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


@dataclass
class RunLock:
    """The exclusive lock on one run directory, held from ``acquire`` until ``release``."""

    run_dir: Path
    fd: int | None = field(default=None, init=False)
    holder: Holder | None = field(default=None, init=False)

    @property
    def path(self) -> Path:
        return coordinator_dir(self.run_dir) / LOCK_FILE

    def acquire(self, coordinator_id: str, *, wait_for_cleanup: float = 60.0) -> Holder | None:
        """Take the lock or raise RunDirLocked; returns the previous holder's record."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_for_cleanup
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                previous = read_holder(self.run_dir)
                if previous is None or previous.running or time.monotonic() > deadline:
                    os.close(fd)
                    raise RunDirLocked(self._refusal(previous)) from None
                time.sleep(0.5)  # its coordinator is dead: its supervisor is cleaning up
        previous = read_holder(self.run_dir)
        self.fd = fd
        self.holder = Holder(pid=os.getpid(), coordinator_id=coordinator_id, start=start_time(os.getpid()),
                             started_at=time.time(), host=socket.gethostname(),
                             command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500])
        self._write()
        return previous

    def update(self, **changes) -> None:
        if self.holder is None:
            raise RuntimeError("the run lock is not held")
        self.holder = Holder(**{**asdict(self.holder), **changes})
        self._write()

    def release(self) -> None:
        """Mark the record ended and close this process's descriptor. The lock itself is
        free once every holder of the description (the supervisor too) has closed it."""
        if self.fd is None:
            return
        try:
            self.update(ended_at=time.time())
        finally:
            os.close(self.fd)
            self.fd = None

    def _write(self) -> None:
        data = (json.dumps(asdict(self.holder), sort_keys=True) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def _refusal(self, holder: Holder | None) -> str:
        where = self.run_dir
        if holder is None:
            return (f"run directory {where} is locked by another coordinator ({self.path}); wait for "
                    "it to finish or use another --out")
        if holder.running:
            return (f"run directory {where} is in use by another coordinator, {holder.describe()}; "
                    f"wait for it to finish, stop it (kill {holder.pid}), or use another --out")
        helper = f" (supervisor pid {holder.supervisor_pid})" if holder.supervisor_pid else ""
        return (f"run directory {where} is still locked although its coordinator, {holder.describe()}, "
                f"has exited: its supervisor{helper} is still stopping the processes it left. "
                "Try again in a minute")
