"""The warm trainer: one long-lived process per hospital that answers the node's rounds.

    python -m medgen.client.worker --state /var/lib/medgen/A      # medgen-client starts it

Flower runs a fresh ``flwr-clientapp`` process for every message (its issue #3670, a
non-ephemeral ClientApp, is open; its ``--isolation process`` mode also runs one task per
``flwr-clientapp`` process). Importing torch, MONAI, Opacus and a recipe there cost more
than the round itself (bench/results/deployment_overhead.json). This process pays it once:
it stays up beside the SuperNode, keeps them imported (and the site's tensor cache in the
page cache), and runs each round the ClientApp forwards to it with the SAME function the
in-process path runs (client/rounds.py ``answer``). Flower still carries every message;
the ClientApp still checks the allow-list before forwarding and still audits what leaves.

The channel (client/worker_channel.py): ``<state dir>/trainer.sock``, bound under umask
0177 (so it is born 0600) inside the state dir, which medgen-client creates 0700; a peer
whose user id differs from this process's is refused (``SO_PEERCRED``). A request must
name this node's own site and folders (those in ``<state dir>/node-config.toml``, which the
SuperNode was started with): the trainer never reads another folder on request.

One request at a time, in arrival order: the ledger, the local state and the reply store
see one writer. A crash mid-round leaves no partial commit (the privacy round commits
atomically); medgen-client restarts the process and the ClientApp asks again
(client/worker_supervisor.py). The process exits when its parent (medgen-client) is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Error
from flwr.supercore.app_utils import start_parent_process_monitor
from google.protobuf.message import DecodeError

from medgen.client.codes import EVALUATION_FAILED, TRAINING_FAILED
from medgen.client.node import DEPLOYMENT_KEYS, resolve_node
from medgen.client.rounds import answer
from medgen.client.worker_channel import TrainerUnavailable, peer_uid, recv_frame, send_frame, socket_path
from medgen.config import RunConfig

log = logging.getLogger("medgen.client.worker")

NODE_CONFIG = "node-config.toml"
VERBS = ("train", "evaluate")
REQUEST_READ_S = 120.0


class TrainerSetupError(RuntimeError):
    """The trainer cannot serve this state dir; the message says what to fix."""


def own_node_config(state_dir: Path) -> dict[str, Any]:
    """The node-config medgen-client wrote for the SuperNode (client/cli.py)."""
    path = Path(state_dir) / NODE_CONFIG
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise TrainerSetupError(f"cannot read {path} ({err}); start the node with medgen-client, "
                                "which writes it") from None


def bind(path: Path) -> socket.socket:
    """Listen on ``path``, created 0600; a stale socket (no one answers) is replaced, a live
    one means another trainer serves this state dir and is refused."""
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise TrainerSetupError(f"another trainer already listens on {path}; stop it first")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        finally:
            probe.close()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(8)
    return server


def handle(header: Mapping[str, Any], content, own: Mapping[str, Any]):
    """One forwarded round -> its reply content or a clean Error (never raises)."""
    verb = header.get("verb")
    failed = TRAINING_FAILED if verb == "train" else EVALUATION_FAILED
    site = str(own.get("site", "unknown"))
    node_config = dict(header.get("node-config") or {})
    if verb not in VERBS or content is None:
        return Error(failed, f"site {site}: the trainer got a malformed request (see the node log)")
    differs = [k for k in DEPLOYMENT_KEYS if node_config.get(k) != own.get(k)]
    if differs:
        log.error("site %s: a request named other node settings (%s) than this trainer's %s; "
                  "restart medgen-client", site, ", ".join(differs), NODE_CONFIG)
        return Error(failed, f"site {site}: refused: the request's node settings differ from the "
                     "trainer's (see the node log)")
    try:
        config = RunConfig.from_run_config(header.get("run-config") or {})
        node = resolve_node(config, node_config)
    except Exception as err:  # noqa: BLE001 - a clean refusal, details in the log
        log.error("site %s: %s request refused: %s", site, verb, err)
        return Error(failed, f"site {site}: {verb} refused with {type(err).__name__} "
                     "(details in the node log)")
    log.info("site %s: %s request received (round %s)", site, verb,
             content.config_records["config"].get("absolute-round") if "config" in content.config_records
             else "?")
    return answer(verb, config, node, content)


def serve(state_dir: Path) -> None:
    """Answer forwarded rounds on ``<state_dir>/trainer.sock`` until stopped."""
    state_dir = Path(state_dir).resolve()
    own = own_node_config(state_dir)
    path = socket_path(state_dir)
    server = bind(path)
    log.info("site %s: warm trainer ready (pid %d)", own.get("site"), os.getpid())
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                uid = peer_uid(conn)
                if uid is not None and uid != os.getuid():
                    log.warning("refused a connection from user id %d on the trainer socket", uid)
                    continue
                conn.settimeout(REQUEST_READ_S)  # a peer that sends nothing must not hold the trainer
                try:
                    header, content = recv_frame(conn)
                except (TrainerUnavailable, ValueError, OSError, DecodeError) as err:
                    log.warning("a request on the trainer socket was unreadable: %s", err)
                    continue
                conn.settimeout(None)
                result = handle(header, content, own)
                try:
                    if isinstance(result, Error):
                        send_frame(conn, {"error": [int(result.code), str(result.reason)]})
                    else:
                        send_frame(conn, {"ok": True}, result)
                except OSError as err:  # the ClientApp went away; its retry finds the stored reply
                    log.warning("site %s: the ClientApp left before the reply: %s", own.get("site"), err)
    finally:
        server.close()
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medgen.client.worker",
                                description="The hospital's warm trainer (medgen-client starts it).")
    p.add_argument("--state", type=Path, required=True, metavar="DIR", help="the node's state dir")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s trainer %(levelname)s %(message)s",
                        force=True)  # importing Flower has already configured the root logger
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unlink the socket on the way out
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    try:
        serve(args.state)
    except TrainerSetupError as err:
        print(f"medgen trainer: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
