"""A coordinator owns its run directory and every process it starts.

``Coordinator.claim(run_dir)`` (a context manager) is how ``medgen-server simulate`` (and
``run_simulation`` when called directly) begins:

1. a fresh coordinator id (printed, written into the run config and so into the DONE
   marker: the harness trusts only a DONE with its own id);
2. the run-directory lock (server/run_lock.py): a second coordinator is refused with a
   message naming the pid that holds it;
3. cleanup after a crash: whatever a previous coordinator of this run directory left
   running (recorded pids, marked environments, their sessions) is stopped before
   anything starts (server/supervisor.py ``sweep``);
4. the supervisor process, which stops everything this coordinator started when it
   dies, SIGKILL included.

While it runs, the coordinator records what it started (``record``) and gives every child
the marker environment (``env``). On a normal exit the harness stops its processes
itself; the supervisor then sweeps (finding nothing) and exits, which frees the lock.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from medgen.server.processes import markers
from medgen.server.run_lock import Holder, RunLock
from medgen.server.supervisor import Supervisor, record_processes, sweep


@dataclass
class Coordinator:
    run_dir: Path
    id: str
    lock: RunLock
    supervisor: Supervisor | None = None
    previous: Holder | None = None           # who held the run directory before (None: nobody)
    left_over: list[str] = field(default_factory=list)  # processes a crashed predecessor left
    _recorded: dict[int, str] = field(default_factory=dict)

    @classmethod
    @contextmanager
    def claim(cls, run_dir: Path, progress: Callable[[str], None] = print) -> Iterator["Coordinator"]:
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        coordinator_id = uuid.uuid4().hex[:16]
        lock = RunLock(run_dir)
        previous = lock.acquire(coordinator_id)   # raises RunDirLocked
        coordinator = cls(run_dir, coordinator_id, lock, previous=previous)
        try:
            coordinator.left_over = sweep(run_dir)
            if coordinator.left_over:
                who = previous.describe() if previous else "an earlier coordinator"
                progress(f"stopped {len(coordinator.left_over)} process(es) left running by {who}")
            record_processes(run_dir, coordinator_id, {})
            coordinator.supervisor = Supervisor(run_dir, coordinator_id, lock.fd).start()
            lock.update(supervisor_pid=coordinator.supervisor.pid)
            yield coordinator
        finally:
            coordinator.close()

    @property
    def env(self) -> dict[str, str]:
        """Environment entries for every child: how the supervisor recognises them."""
        return markers(self.run_dir, self.id)

    def record(self, pids: Mapping[int, str]) -> None:
        """Remember processes started for this run (pid -> start time), for the supervisor."""
        if any(self._recorded.get(pid) != start for pid, start in pids.items()):
            self._recorded.update(pids)
            record_processes(self.run_dir, self.id, self._recorded)

    def check_supervisor(self) -> None:
        """Restart the supervisor if something killed it (the coordinator still runs)."""
        if self.supervisor is not None and not self.supervisor.running():
            self.supervisor = Supervisor(self.run_dir, self.id, self.lock.fd).start()
            self.lock.update(supervisor_pid=self.supervisor.pid)

    def close(self) -> None:
        try:
            if self.supervisor is not None:
                self.supervisor.stop()
        finally:
            self.lock.release()

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Coordinator({self.run_dir}, id={self.id}, pid={os.getpid()})"
