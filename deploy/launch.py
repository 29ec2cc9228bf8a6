"""Flower's deployment engine as processes medgen owns: the SuperLink and the SuperNodes.

Builds the exact command lines (TLS, SuperNode authentication, persistent state, no
runtime dependency installation), the coordinator's server-state folder, the `flwr` CLI
connection that talks TLS to the SuperLink, and ``OwnedProcess``: a process started in
its own session whose every descendant is remembered and stopped by PID.

Facts this relies on (FLOWER.md, checked against flwr 1.42 on 127.0.0.1):
- the SuperLink serves the Fleet, Control and Runtime APIs on one ``--host/--port``;
  it spawns ``flower-superexec`` BY NAME, so the environment's bin folder must be first
  on PATH (``flower_env``), or the SuperLink dies at start-up;
- superexec and the per-run ``flwr-serverapp``/``flwr-clientapp`` processes are detached
  into their own sessions: a process group kill misses them, hence the descendant list;
- a SuperNode stopped with SIGTERM deactivates itself (the SuperLink answers its pending
  messages with NODE_UNAVAILABLE at once); a SIGKILLed one is noticed only after
  2 x 30 s of missed heartbeats;
- ``--node-config`` accepts a TOML file, which avoids quoting paths on a command line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from medgen.atomic import atomic_write_text
from medgen.config import _toml_value
from medgen.server.simulate import SuperLink, _tool, free_port

CONNECTION = "medgen"
DEFAULT_PORT = 9092
CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.crt", "server.key"


class LaunchError(RuntimeError):
    """A process could not be started or configured; the message says what to fix."""


# -- the coordinator's files ---------------------------------------------------------
@dataclass(frozen=True)
class ServerCerts:
    """The SuperLink's TLS files, as written by ``medgen-server pki``."""

    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, certs_dir: Path, ca_cert: Path | None = None) -> "ServerCerts":
        """server.crt/server.key from ``certs_dir``; the CA certificate from ``ca_cert``
        (default: ``certs_dir/ca.crt``). The CA's private key is not needed here."""
        certs_dir = Path(certs_dir).resolve()
        ca = Path(ca_cert).resolve() if ca_cert else certs_dir / CA_CERT
        certs = cls(ca, certs_dir / SERVER_CERT, certs_dir / SERVER_KEY)
        missing = [str(p) for p in (certs.ca_cert, certs.cert, certs.key) if not p.is_file()]
        if missing:
            raise LaunchError(f"missing {', '.join(missing)}; create them with `medgen-server pki "
                              f"ca --out pki/ca` and `medgen-server pki server-cert --ca pki/ca "
                              f"--out {certs_dir} --host <name>` (then --ca pki/ca/ca.crt)")
        return certs


@dataclass(frozen=True)
class ServerState:
    """The coordinator's persistent folder: SuperLink database, flwr connection, apps, logs."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def connection_file(self) -> Path:
        return self.flwr_home / "config.toml"

    @property
    def apps(self) -> Path:
        return self.root / "apps"

    @property
    def log(self) -> Path:
        return self.root / "superlink.log"

    def write_connection(self, address: str, ca_cert: Path) -> Path:
        """The `flwr` CLI's connection to this SuperLink: TLS, verified against the CA."""
        text = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f"address = {_toml_value(address)}\n"
                f"root-certificates = {_toml_value(str(Path(ca_cert).resolve()))}\n")
        return atomic_write_text(self.connection_file, text)

    def require_connection(self) -> None:
        if not self.connection_file.is_file():
            raise LaunchError(f"{self.connection_file} does not exist: start the server first with "
                              f"`medgen-server start --certs DIR --state {self.root}`")


def control_address(host: str, port: int) -> str:
    """Where local `flwr` commands reach a SuperLink bound to ``host`` (a wildcard: loopback)."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def superlink_command(certs: ServerCerts, state: ServerState, host: str = "0.0.0.0",
                      port: int = DEFAULT_PORT) -> list[str]:
    return [_tool("flower-superlink"),
            "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key),
            "--ssl-ca-certfile", str(certs.ca_cert),
            "--enable-supernode-auth",
            "--database", str(state.database.resolve()),
            "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port)]


# -- a hospital's node ---------------------------------------------------------------
@dataclass(frozen=True)
class NodeLaunch:
    """Everything a hospital's SuperNode is started with."""

    server: str                  # HOST:PORT of the SuperLink
    ca_cert: Path
    key: Path                    # the node's private key (OpenSSH format, mode 0600)
    node_config: Path            # TOML file with the medgen node-config keys
    port: int                    # the node's local ClientAppIo/Runtime API port
    max_retries: int | None = None
    max_wait_time: float | None = None


def node_config_toml(values: Mapping[str, Any]) -> str:
    """The medgen node-config keys (client/node.py) as a flat TOML document."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def supernode_command(node: NodeLaunch) -> list[str]:
    command = [_tool("flower-supernode"),
               "--superlink", node.server,
               "--root-certificates", str(Path(node.ca_cert).resolve()),
               "--auth-supernode-private-key", str(Path(node.key).resolve()),
               "--node-config", str(Path(node.node_config).resolve()),
               "--host", "127.0.0.1", "--port", str(node.port)]
    if node.max_retries is not None:
        command += ["--max-retries", str(node.max_retries)]
    if node.max_wait_time is not None:
        command += ["--max-wait-time", str(node.max_wait_time)]
    return command


# -- environment and processes -------------------------------------------------------
def flower_env(flwr_home: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Flower's tools need: this interpreter's bin first on PATH."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep)
                                              if p and p != bin_dir]])
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env


# SuperExec, which the SuperNode spawns with its own environment, asks the SuperNode's local
# Runtime API for a ClientApp task every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (Flower
# 1.42's default 1.0; flwr/supercore/superexec/run_superexec.py): every round's message waited
# up to that long before its flwr-clientapp started. 0.25 s costs a localhost HTTP call four
# times a second and changes no guarantee (the task, its token, heartbeats, TLS and the
# SuperNode's authentication to the SuperLink are untouched). An operator's own value wins.
NODE_TASK_POLL_S = "0.25"


def node_env() -> dict[str, str]:
    """``flower_env`` for a SuperNode (and the SuperExec it spawns)."""
    env = flower_env()
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", NODE_TASK_POLL_S)
    return env


class OwnedProcess:
    """A process in its own session, stopped by PID with every descendant it spawned.

    The stop logic is the simulation harness's (``medgen.server.simulate.SuperLink``):
    SIGTERM the group and each remembered descendant (recycled PIDs are recognised by
    their start time), wait, then SIGKILL what is left.
    """

    remember_descendants = SuperLink.remember_descendants
    stop = SuperLink.stop
    _alive_seen = SuperLink._alive_seen

    def __init__(self, command: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None):
        self.command, self.log_path = list(command), Path(log_path)
        self.env, self.cwd = dict(env or flower_env()), cwd
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, str] = {}

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise LaunchError("the process has not been started")
        return self.proc.pid

    def start(self) -> "OwnedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=log_file,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    def running(self) -> bool:
        self.remember_descendants()
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                return self.proc.returncode
            time.sleep(0.5)
        return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def wait_for_port(host: str, port: int, timeout: float, process: OwnedProcess | None = None) -> None:
    """Block until something accepts TCP connections on host:port (or fail clearly)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.running():
            raise LaunchError(f"{Path(process.command[0]).name} exited with code "
                              f"{process.proc.returncode}; see {process.log_path}")
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise LaunchError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


# -- the `flwr` CLI against a TLS SuperLink -------------------------------------------
@dataclass(frozen=True)
class FlwrClient:
    """Runs `flwr` commands against the connection in ``ServerState.flwr_home``.

    Has the ``flwr(*args)`` method the simulation harness's run helpers call.
    """

    state: ServerState
    cwd: Path | None = None

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("flwr"), *args], cwd=self.cwd, env=flower_env(self.state.flwr_home),
                              text=True, capture_output=True, timeout=timeout)

    def json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        done = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            return {"success": False, "error-message": (done.stderr or done.stdout).strip()}

    def register(self, public_key: Path) -> str:
        reply = self.json("supernode", "register", str(Path(public_key).resolve()), CONNECTION)
        if not reply.get("success"):
            raise LaunchError(f"could not register {public_key}: {reply.get('error-message')}")
        return str(reply["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        reply = self.json("supernode", "ls", CONNECTION, timeout=60)
        if not reply.get("success"):
            raise LaunchError(f"could not list the SuperNodes: {reply.get('error-message')}")
        return list(reply.get("nodes", []))

    def online_nodes(self) -> int:
        try:
            return sum(1 for node in self.nodes() if node.get("status") == "online")
        except (LaunchError, subprocess.TimeoutExpired):
            return 0

    def wait_online(self, count: int, timeout: float) -> int:
        """Wait until ``count`` SuperNodes are online; returns how many are (maybe fewer)."""
        deadline = time.monotonic() + timeout
        online = self.online_nodes()
        while online < count and time.monotonic() < deadline:
            time.sleep(2.0)
            online = self.online_nodes()
        return online
