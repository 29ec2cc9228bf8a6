"""medgen-client on the warm path: the SuperNode and the warm trainer, kept up together.

``run_node`` starts the trainer (client/worker.py) and ``flower-supernode`` as children
of medgen-client, in its process group, with its stdout (the node's log). While the
SuperNode runs, a trainer that exits is started again (its pid in
``<state dir>/trainer.pid``); a ClientApp waiting on the socket then gets its answer from
the new one (client/worker_channel.py). A trainer that keeps dying soon after start is
restarted with a growing pause (up to a minute), so a broken installation does not spin.
SIGTERM or SIGINT to medgen-client stops both; so does the SuperNode exiting (its code
becomes medgen-client's).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from medgen.atomic import atomic_write_text
from medgen.client.worker_channel import PID_NAME


QUICK_EXIT_S = 30.0     # a trainer that lived shorter than this counts as a failed start
MAX_PAUSE_S = 60.0


class TrainerProcess:
    """The warm trainer as a child process, restarted when it exits."""

    def __init__(self, state_dir: Path, env: Mapping[str, str] | None = None, log_path: Path | None = None):
        self.state_dir = Path(state_dir)
        self.command = [sys.executable, "-m", "medgen.client.worker", "--state", str(self.state_dir),
                        "--parent-pid", str(os.getpid())]
        self.env = dict(env) if env is not None else None
        self.log_path = log_path  # None: the trainer writes to medgen-client's stdout (the node log)
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.died_at: float | None = None
        self.pause = 0.0
        self.restarts = 0

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_NAME

    def start(self) -> "TrainerProcess":
        if self.log_path is None:
            self.proc = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL)
        else:
            with open(self.log_path, "ab") as log_file:
                self.proc = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL,
                                             stdout=log_file, stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()
        atomic_write_text(self.pid_file, f"{self.proc.pid}\n")
        return self

    def keep_alive(self) -> None:
        """Start the trainer again if it exited (at once if it had run a while, else after
        a pause that doubles with each quick exit)."""
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if self.died_at is None:
            self.died_at, lived = now, now - self.started_at
            self.pause = 0.0 if lived >= QUICK_EXIT_S else min(MAX_PAUSE_S, max(1.0, 2 * self.pause))
            print(f"medgen-client: the warm trainer (pid {self.proc.pid}) exited with code "
                  f"{self.proc.returncode} after {lived:.0f} s; restarting it in {self.pause:.0f} s",
                  file=sys.stderr, flush=True)
        if now - self.died_at >= self.pause:
            self.died_at = None
            self.restarts += 1
            self.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pid_file.unlink(missing_ok=True)


def run_node(node_command: Sequence[str], env: Mapping[str, str], state_dir: Path) -> int:
    """Run the SuperNode and the warm trainer until the SuperNode exits or we are stopped."""
    stopping: list[int] = []

    def stop(signum, _frame) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    trainer = TrainerProcess(state_dir, env).start()
    node = subprocess.Popen(list(node_command), env=dict(env), stdin=subprocess.DEVNULL)
    try:
        while not stopping and node.poll() is None:
            trainer.keep_alive()
            time.sleep(0.2)
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)  # the SuperNode deactivates itself on SIGTERM
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        trainer.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if stopping else int(node.returncode or 0)
