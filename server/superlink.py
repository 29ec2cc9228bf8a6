"""A simulation-mode SuperLink that this process owns, with everything it spawns.

``flower-superlink --simulation --insecure --disable-runtime-dependency-installation`` on a
free 127.0.0.1 port, in a new session, with its own FLWR_HOME and the app directory as cwd
(Ray imports the app from there; FLOWER.md). Every descendant seen is remembered with its
start time, so ``stop`` signals exactly those processes and never a recycled pid.
deploy/launch.py's ``OwnedProcess`` borrows ``remember_descendants``/``stop``: they use
only ``self.proc`` and ``self.seen``.

The coordinator's environment markers (``extra_env``, server/coordinator.py) are passed to
every process started here, so the supervisor finds them even after a SIGKILL of the
coordinator (server/supervisor.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from medgen.server.processes import alive, descendants, start_time

CONNECTION = "medgen"


class SimulationError(RuntimeError):
    """The simulation did not produce a usable result; the message says what and where."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    # the console scripts of the environment medgen runs in (not whatever is on PATH)
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


class SuperLink:
    """A SuperLink in simulation mode that this process owns, with everything it spawns."""

    def __init__(self, app_dir: Path, flwr_home: Path, log_path: Path, port: int | None = None,
                 extra_env: Mapping[str, str] | None = None):
        self.app_dir, self.flwr_home, self.log_path = app_dir, flwr_home, log_path
        self.port = port or free_port()
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, str] = {}  # pid -> start time: never kill a recycled pid

    @property
    def env(self) -> dict[str, str]:
        # Flower spawns flower-superexec / flwr-simulation by name: our environment's first
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, "PATH": path, "FLWR_HOME": str(self.flwr_home), "PYTHONUNBUFFERED": "1",
                **self.extra_env}

    def start(self, ready_timeout: float = 60.0) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        command = [_tool("flower-superlink"), "--simulation", "--insecure",
                   "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                   "--port", str(self.port)]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(command, cwd=self.app_dir, env=self.env, stdout=log_file,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.remember_descendants()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)  # a connect attempt costs nothing; the wait is on the SuperLink's start
        raise SimulationError(f"the SuperLink did not open port {self.port} within {ready_timeout:.0f} s; "
                              f"see {self.log_path}")

    def check_alive(self) -> None:
        self.remember_descendants()
        if self.proc is not None and self.proc.poll() is not None:
            raise SimulationError(f"the SuperLink exited with code {self.proc.returncode}; "
                                  f"see {self.log_path}")

    def remember_descendants(self) -> None:
        if self.proc is None:
            return
        if self.proc.pid not in self.seen and (own := start_time(self.proc.pid)) is not None:
            self.seen[self.proc.pid] = own
        for child in descendants(self.proc.pid):
            self.seen.setdefault(child.pid, child.start)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group and every descendant seen, then SIGKILL what is left."""
        if self.proc is None:
            return
        self.remember_descendants()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    pass
            for pid, start in list(self.seen.items()):
                if alive(pid, start):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (self.proc.poll() is None or self._alive_seen()):
                time.sleep(0.2)
            if self.proc.poll() is not None and not self._alive_seen():
                break
        self.proc.wait(timeout=5)

    def _alive_seen(self) -> bool:
        return any(alive(pid, start) for pid, start in self.seen.items())

    def stream_log(self, run_id: str, path: Path) -> subprocess.Popen:
        """`flwr log --stream` into ``path``: the ServerApp's and ClientApps' log lines."""
        with open(path, "ab") as out:
            return subprocess.Popen([_tool("flwr"), "log", run_id, CONNECTION, "--stream"],
                                    cwd=self.app_dir, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("flwr"), *args], cwd=self.app_dir, env=self.env, text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
