"""``medgen-server start | register-node | run | pki``: the coordinator on Flower's deployment engine.

    medgen-server pki ca --out certs ; medgen-server pki server-cert --ca certs --out certs --host NAME
    medgen-server start --certs certs --state server-state          # the SuperLink (foreground)
    medgen-server register-node site-a.pub --state server-state     # once per hospital
    medgen-server run --config run.toml --state server-state        # one training run, waits

``start`` replaces itself with ``flower-superlink`` (TLS, SuperNode authentication, a
persistent ``--database``, runtime dependency installation off: hospitals are air-gapped),
after writing the `flwr` connection the other subcommands use. ``run`` writes the app
bundle (the shim over the installed medgen, medgen.server.simulate.write_app_dir), submits
it, prints progress from the run directory and verifies the result itself (``flwr run``
exits 0 even when every ClientApp failed). Running the same ``run`` again after a server
restart resumes from the last checkpoint; sites replay answers they already gave.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Callable

from medgen.config import RunConfig, parse_overrides
from medgen.deploy.cli_pki import main as pki_main
from medgen.deploy.launch import (CONNECTION, FlwrClient, LaunchError, ServerCerts, ServerState,
                                  control_address, flower_env, superlink_command)
from medgen.server.cli_types import positive_int, port, seconds
from medgen.server.run_lock import RunDirLocked, RunLock
from medgen.server.run_log import RunDir, read_metrics, show_new_records
from medgen.server.simulate import (NothingTrained, SimulationError, _finished, _run_id, verify_results,
                                    write_app_dir)

DEFAULT_STATE = Path("server-state")


def _reporting(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Setup problems (missing certificates, server not started, ...) as one clear line, exit 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except LaunchError as err:
            print(f"medgen-server {args.command}: {err}", file=sys.stderr)
            return 2
    return run


def _add_start(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "start", help="start the SuperLink (TLS, authenticated hospitals, persistent state)",
        description="Start Flower's SuperLink for a medgen federation, in the foreground (stop it "
        "with Ctrl-C or SIGTERM). TLS with the certificates in --certs; only SuperNodes whose "
        "public key was registered (`medgen-server register-node`) may join; runs, node ids and "
        "registrations survive a restart (database in --state); no dependency is installed at run "
        "time. Clients connect to HOST:PORT, which must be a name or address in the server "
        "certificate.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--certs", type=Path, required=True, metavar="DIR",
                   help="folder with server.crt and server.key (`medgen-server pki server-cert`)")
    p.add_argument("--ca", type=Path, metavar="CA.crt", help="the federation CA certificate "
                   "(default: DIR/ca.crt); the CA's private key never needs to be on this machine")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, metavar="DIR",
                   help="the server's persistent folder (database, flwr connection, app bundles)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=port, default=9092, help="port for hospitals and `flwr` commands")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.set_defaults(func=_reporting(_start))


def _start(args: argparse.Namespace) -> int:
    certs = ServerCerts.from_dir(args.certs, args.ca)
    state = ServerState(args.state.resolve())
    state.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.write_connection(control_address(args.host, args.port), certs.ca_cert)
    command = superlink_command(certs, state, args.host, args.port)
    print(f"SuperLink on {args.host}:{args.port} (TLS, SuperNode auth); state {state.root}",
          flush=True)
    print(" ".join(command), flush=True)
    if args.dry_run:
        return 0
    os.execve(command[0], command, flower_env(state.flwr_home))
    return 1  # not reached


def _add_register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register-node", help="allow a hospital's SuperNode key to join",
                       description="Register a hospital's public key (NAME.pub from `medgen-server "
                       "pki node-key`, sent to you by the hospital) with the running SuperLink. "
                       "Prints the node id.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("public_key", type=Path, metavar="KEY.pub")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, metavar="DIR",
                   help="the folder given to `medgen-server start`")
    p.set_defaults(func=_reporting(_register))


def _register(args: argparse.Namespace) -> int:
    state = ServerState(args.state.resolve())
    state.require_connection()
    if not args.public_key.is_file():
        print(f"medgen-server register-node: {args.public_key} does not exist", file=sys.stderr)
        return 2
    node_id = FlwrClient(state).register(args.public_key)
    print(f"registered {args.public_key.name}: node id {node_id}")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="train a recipe on the federation served by `medgen-server start`",
        description="Submit one training run to the running SuperLink and wait for it: progress "
        "per round, the report path at the end. Waits first until --wait-nodes hospitals are "
        "online. If the server was restarted, running the same command again resumes from the "
        "last checkpoint (raise num-rounds to train longer). One `run` per RUN_DIR at a time: a "
        "second is refused while the first waits. Exit codes: 0 every round trained; 1 the run "
        "failed; 2 setup problem; 3 the last rounds trained no site (the line says why; the "
        "checkpoint keeps the last round that trained); 4 RUN_DIR is in use.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, help="RunConfig TOML file; defaults apply to keys it "
                   "does not set (sites must name the hospitals' --site names)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run-config key, e.g. --set num-rounds=3; repeatable")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, metavar="DIR",
                   help="the folder given to `medgen-server start`")
    p.add_argument("--out", type=Path, metavar="RUN_DIR", help="run directory (default: the "
                   "config's run-dir): metrics.jsonl, checkpoint, privacy.json, report.html")
    p.add_argument("--wait-nodes", type=positive_int, metavar="N", help="hospitals to wait for before "
                   "submitting (default: all sites in the config)")
    p.add_argument("--wait-timeout", type=seconds, default=600.0, metavar="SECONDS",
                   help="submit anyway after this long (rounds need min-sites)")
    p.add_argument("--timeout", type=seconds, default=24 * 3600, metavar="SECONDS",
                   help="give up waiting for the run after this long")
    p.set_defaults(func=_reporting(_run))


def _run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    config = RunConfig.from_toml(args.config, overrides) if args.config else \
        RunConfig.from_run_config(overrides)
    if config.simulate_dropout:
        # refused before anything starts: a deployment's replies are real, losing them on
        # purpose would waste the budget the hospitals spent on them
        raise LaunchError(f"simulate-dropout = {config.simulate_dropout} is a simulation setting "
                          "(replies lost on purpose); remove it from the run config of a deployment")
    run_dir = (args.out or Path(config.run_dir)).resolve()
    # the ServerApp runs in a process started elsewhere: every path must be absolute
    config = config.replace(run_dir=str(run_dir),
                            data_root=str(Path(config.data_root).resolve()) if config.data_root else "")
    state = ServerState(args.state.resolve())
    state.require_connection()
    # one coordinator per run directory; the ServerApp writes DONE with this id and stops
    # writing if another `run` takes the directory over (server/app.py)
    lock = RunLock(run_dir)
    try:
        lock.acquire(uuid.uuid4().hex[:16])
    except RunDirLocked as err:
        print(f"medgen-server run: {err}", file=sys.stderr)
        return 4
    try:
        config = config.replace(coordinator_id=lock.holder.coordinator_id)
        client = FlwrClient(state)
        wanted = args.wait_nodes if args.wait_nodes is not None else len(config.site_names)
        online = client.wait_online(wanted, args.wait_timeout)
        print(f"{online} hospital(s) online (waited for {wanted}); sites {config.sites}, "
              f"min-sites {config.min_sites}", flush=True)
        app_dir = write_app_dir(config, state.apps / "run")
        try:
            result = submit_and_wait(client, app_dir, config, timeout=args.timeout)
        except NothingTrained as err:
            print(f"report: {err.result.report or run_dir / 'report.html (missing: see the log above)'}")
            print(f"medgen-server run: {err}", file=sys.stderr)
            return 3
        except (SimulationError, LaunchError) as err:
            print(f"medgen-server run: {err}", file=sys.stderr)
            return 1
    finally:
        lock.release()
    print(f"report: {result.report or run_dir / 'report.html (missing: see the log above)'}")
    print(f"{result.outcome.summary()} in {result.seconds:.0f} s")
    return 0


def submit_and_wait(client, app_dir: Path, config: RunConfig, *, timeout: float,
                    progress: Callable[[str], None] = lambda line: print(line, flush=True),
                    unreachable_after: float = 30.0):
    """``flwr run`` the app, follow metrics.jsonl until a DONE of this config's coordinator,
    verify; returns SimulationResult (NothingTrained if the last rounds trained no site)."""
    run_dir = RunDir(Path(config.run_dir))
    run_dir.path.mkdir(parents=True, exist_ok=True)
    run_dir.clear_done()
    started, shown = time.monotonic(), len(read_metrics(run_dir.metrics))
    submitted = client.flwr("run", str(app_dir), CONNECTION, "--format", "json")
    run_id = _run_id(submitted.stdout)
    if submitted.returncode != 0 or not run_id:
        raise LaunchError(f"flwr run failed ({submitted.returncode}): "
                          f"{(submitted.stderr or submitted.stdout).strip()[-2000:]}")
    progress(f"submitted Flower run {run_id}: sites {config.sites}, {config.num_rounds} rounds, "
             f"run dir {run_dir.path}")
    host, port = _address(client)
    last_check, finished_at, reachable_at = 0.0, None, time.monotonic()
    while (done := run_dir.read_done(config.coordinator_id or None)) is None:
        shown = show_new_records(run_dir.metrics, shown, config.num_rounds, progress)
        now = time.monotonic()
        if now - started > timeout:
            raise LaunchError(f"run {run_id} did not finish within {timeout:.0f} s")
        if now - last_check > 10:
            last_check = now
            if _reachable(host, port):
                reachable_at = now
                if finished_at is None and _finished(client, run_id):
                    finished_at = now
            elif now - reachable_at > unreachable_after:
                raise LaunchError(f"the SuperLink at {host}:{port} is unreachable; when it is back, "
                                  "run the same command again: the run resumes from the last checkpoint")
        if finished_at is not None and now - finished_at > 15:
            raise LaunchError(f"Flower reports run {run_id} ended but the ServerApp wrote no DONE marker "
                              f"in {run_dir.path}: it was stopped or crashed (see `flwr log {run_id}`). "
                              "Run the same command again to resume from the last checkpoint")
        time.sleep(1.0)
    show_new_records(run_dir.metrics, shown, config.num_rounds, progress)
    return verify_results(run_dir, done, config, time.monotonic() - started)


def _address(client) -> tuple[str, int]:
    connection = tomllib.loads(client.state.connection_file.read_text())["superlink"][CONNECTION]
    address = connection["address"]
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _reachable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(3.0)
        return sock.connect_ex((host, port)) == 0


def _add_pki(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pki", add_help=False, prefix_chars="+", help="certificates and hospital keys "
                       "(ca | server-cert | node-key | verify; `medgen-server pki -h`)")
    p.add_argument("pki_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _pki(args.pki_args))


def _pki(argv: list[str]) -> int:
    try:
        return pki_main(argv)
    except SystemExit as exit_:  # argparse's --help / usage errors
        return int(exit_.code or 0)


DEPLOY_SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "start": _add_start,
    "register-node": _add_register,
    "run": _add_run,
    "pki": _add_pki,
}
