"""``medgen-client``: a hospital joins a medgen federation (or checks its data first).

    medgen-client data check /data/mri                       # read-only: what is usable
    medgen-client translate --run-dir RUN --public PUB --source-site A --target-site C \
        --out OUT /data/ct                                   # local, read-only on the input
    medgen-client restore --run-dir RUN --site A --out OUT /data/ct   # denoise/up-sample, local
    medgen-client --server fl.example.org:9092 --data /data/mri --state /var/lib/medgen \\
        --key keys/site-a --ca ca.crt --site A --epsilon-cap 3 --allow allow.toml

The second form checks everything it can locally (files exist, the key is private, the
allow-list parses), writes the node configuration to STATE/node-config.toml and then
starts ``flower-supernode``: TLS verified against the federation's CA, authenticated
with the hospital's key, no run-time dependency installation (the node runs the medgen
it has installed; the app bundle is only a shim, FLOWER.md). With ``--trainer warm`` (the
default) it also starts the hospital's warm trainer (client/worker.py) and keeps both up
(client/worker_supervisor.py): each message's ClientApp forwards the round to it over a
0600 Unix socket in STATE. ``--trainer cold`` replaces itself with the SuperNode and
every round runs in the message's own fresh process. The privacy ledger, caches and
replies stay in STATE either way.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import sys
from pathlib import Path

from medgen.atomic import atomic_write_text
from medgen.data.data_check import main as data_check
from medgen.client.node import epsilon_cap
from medgen.client.restore import main as restore
from medgen.client.translate import main as translate
from medgen.client.worker_channel import TRAINER_KEY, WARM
from medgen.client.worker_supervisor import run_node
from medgen.config import ConfigError
from medgen.deploy.allowlist import AllowList, AllowListError
from medgen.deploy.launch import NodeLaunch, node_config_toml, node_env, supernode_command

DEFAULT_PORT = 9094


class ClientSetupError(ValueError):
    """Something a hospital must fix before its node can start; the message says what."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medgen-client",
        description="Join a medgen federation as a hospital: trains the coordinator's generator on "
        "this site's images with differential privacy; only model weights and aggregate numbers "
        "leave the site. Check the data first with `medgen-client data check DIR`.",
        epilog="Files you receive from the coordinator: the CA certificate (--ca) and the server "
        "address. The key pair you create yourself (`medgen-server pki node-key --out keys --name "
        "site-a`); send only the .pub file to the coordinator. Stop the node with Ctrl-C.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", required=True, metavar="HOST:PORT",
                   help="the coordinator's SuperLink, as named in its certificate")
    p.add_argument("--data", required=True, type=Path, metavar="DIR",
                   help="this site's images (read only, never modified or sent)")
    p.add_argument("--state", required=True, type=Path, metavar="DIR",
                   help="persistent node folder: privacy ledger, caches, local model parts "
                   "(keep it and back it up: the ledger remembers privacy already spent)")
    p.add_argument("--key", required=True, type=Path, metavar="FILE",
                   help="this node's private key (OpenSSH format, mode 0600)")
    p.add_argument("--ca", required=True, type=Path, metavar="CA.crt",
                   help="the federation's CA certificate, to verify the server")
    p.add_argument("--site", metavar="NAME", help="this site's name in the run config's `sites` "
                   "(default: the key file's name)")
    p.add_argument("--public", type=Path, metavar="DIR", help="public anatomy bank (label maps, "
                   "no patient data); default: a `public` folder next to --data")
    p.add_argument("--epsilon-cap", type=float, metavar="EPS", help="this site's own privacy "
                   "ceiling; the node plans for min(cap, the run's target) and refuses beyond it")
    p.add_argument("--allow", type=Path, metavar="FILE", help="allow-list (TOML): approved medgen "
                   "release, recipes and run settings; other runs are refused (docs/deployment.md)")
    p.add_argument("--trainer", choices=("warm", "cold"), default=WARM,
                   help="warm: one long-lived trainer process keeps torch and the recipe loaded "
                   "across rounds (each message's ClientApp forwards the round to it over a 0600 "
                   "Unix socket in --state); cold: every message trains in its own fresh process "
                   "(docs/deployment.md, 'The warm trainer')")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="local port for the node's app processes (one per node on a host)")
    p.add_argument("--max-retries", type=int, metavar="N",
                   help="give up after N failed connection attempts (default: retry forever)")
    p.add_argument("--max-wait-time", type=float, metavar="SECONDS",
                   help="give up reconnecting after this long (default: never)")
    p.add_argument("--dry-run", action="store_true", help="check and print the command, do not start")
    return p


def node_settings(args: argparse.Namespace) -> dict[str, object]:
    """Validate the hospital's inputs; return the node-config keys (client/node.py)."""
    data = args.data.resolve()
    if not data.is_dir():
        raise ClientSetupError(f"--data {args.data} is not a folder; point it at the site's images "
                               "(check it with `medgen-client data check DIR`)")
    public = (args.public or data.parent / "public").resolve()
    if not public.is_dir():
        raise ClientSetupError(f"public anatomy bank {public} not found; pass --public DIR")
    for flag, path in (("--ca", args.ca), ("--key", args.key)):
        if not path.is_file():
            raise ClientSetupError(f"{flag} {path} does not exist")
    mode = stat.S_IMODE(args.key.stat().st_mode)
    if mode & 0o077:
        raise ClientSetupError(f"--key {args.key} is readable by others (mode {mode:o}); "
                               f"run `chmod 600 {args.key}`")
    _check_numbers(args)
    allow = None
    if args.allow is not None:
        try:
            AllowList.load(args.allow)  # fail now, not at the first round
        except AllowListError as err:
            raise ClientSetupError(str(err)) from None
        allow = str(args.allow.resolve())
    state = args.state.resolve()
    if args.trainer == WARM and state.is_dir() and stat.S_IMODE(state.stat().st_mode) & 0o022:
        raise ClientSetupError(f"--state {args.state} is writable by other users (mode "
                               f"{stat.S_IMODE(state.stat().st_mode):o}); the warm trainer's socket "
                               f"lives there: run `chmod 700 {args.state}`")
    return {"site": args.site or args.key.name, "data-dir": str(data), "state-dir": str(state),
            "public-dir": str(public), "epsilon-cap": args.epsilon_cap, "allow-list": allow,
            TRAINER_KEY: WARM if args.trainer == WARM else None}


def _check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag finite and in range, refused with the flag's name."""
    if args.epsilon_cap is not None:
        try:  # the node applies the same rule to node-config 'epsilon-cap' (client/node.py)
            epsilon_cap({"epsilon-cap": args.epsilon_cap})
        except ConfigError:
            raise ClientSetupError(f"--epsilon-cap must be a finite number > 0, got {args.epsilon_cap}; "
                                   "leave it out to use the run's target-epsilon") from None
    if not 1 <= args.port <= 65535:
        raise ClientSetupError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_retries is not None and args.max_retries < 0:
        raise ClientSetupError(f"--max-retries must be >= 0, got {args.max_retries}")
    if args.max_wait_time is not None and not (math.isfinite(args.max_wait_time) and args.max_wait_time > 0):
        raise ClientSetupError(f"--max-wait-time must be a finite number of seconds > 0, "
                               f"got {args.max_wait_time}; leave it out to wait forever")


def start(args: argparse.Namespace) -> int:
    settings = node_settings(args)
    state = Path(str(settings["state-dir"]))
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    node_config = atomic_write_text(state / "node-config.toml", node_config_toml(settings))
    command = supernode_command(NodeLaunch(server=args.server, ca_cert=args.ca, key=args.key,
                                           node_config=node_config, port=args.port,
                                           max_retries=args.max_retries,
                                           max_wait_time=args.max_wait_time))
    cap = settings["epsilon-cap"]
    print(f"site {settings['site']}: joining {args.server}; data {settings['data-dir']}; state {state}; "
          f"epsilon cap {cap if cap is not None else 'none (the run target applies)'}; allow-list "
          f"{settings['allow-list'] or 'none (every run of the installed medgen)'}; trainer "
          f"{args.trainer}", flush=True)
    print(" ".join(command), flush=True)
    if args.dry_run:
        return 0
    if args.trainer == WARM:
        return run_node(command, node_env(), state)  # node_env: Flower's task poll (deploy/launch.py)
    os.execve(command[0], command, node_env())
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["data", "check"]:
        return data_check(argv[2:])
    if argv[:1] == ["translate"]:
        return translate(argv[1:])
    if argv[:1] == ["restore"]:
        return restore(argv[1:])
    if argv[:1] == ["data"]:
        print("usage: medgen-client data check DIR [--image-size N] [--json]", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return start(args)
    except ClientSetupError as err:
        print(f"medgen-client: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
