"""The local channel between the per-message ClientApp and the hospital's warm trainer.

A Unix socket, ``<state dir>/trainer.sock``, created 0600 inside the 0700 state dir by
the trainer (client/worker.py). Each end checks the other's user id (``SO_PEERCRED``):
the trainer refuses a ClientApp of another user, the ClientApp refuses a listener of
another user (a socket planted in its place). Nothing on it is executable: one request and one reply per connection,
each a length-prefixed JSON header followed by Flower's own protobuf encoding of a
``RecordDict`` (``flwr.common.serde``); no pickle.

    request: {"verb": "train"|"evaluate", "run-config": {...}, "node-config": {...}} + content
    reply:   {"ok": true} + content            |  {"error": [code, reason]}

What crosses it is what Flower already delivered to this node (the global weights and the
round's config) and the reply the ClientApp then sends (shared weights and scalar metrics,
or a path-free error): the same content, one hop earlier, on the same machine.

``ask`` forwards one round. If the trainer is not there yet (starting, or restarted by
medgen-client after a crash) it waits for it; if the connection breaks before a reply
(the trainer died mid-round) it asks once more, once the supervisor has restarted it.
That retry is safe: the round is keyed by its request id, a reply already stored is
replayed without training, and a ledger commit is idempotent (client/local_state.py). A
second failure answers the round with a clean, path-free refusal.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Error, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

SOCKET_NAME = "trainer.sock"
PID_NAME = "trainer.pid"
TRAINER_KEY = "trainer"          # node-config: "warm" forwards to the trainer, else in-process
WARM = "warm"
READY_TIMEOUT = 180.0            # a (re)started trainer imports torch first: minutes on a busy host
MAX_HEADER = 1 << 20
_LENGTHS = struct.Struct("!IQ")  # header bytes, body bytes


class TrainerUnavailable(ConnectionError):
    """The warm trainer did not answer (not running, or it died before replying)."""


def uses_warm_trainer(node_config: Mapping[str, Any]) -> bool:
    return node_config.get(TRAINER_KEY) == WARM


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


# -- framing (both ends) --------------------------------------------------------------
def send_frame(sock: socket.socket, header: Mapping[str, Any], content: RecordDict | None = None) -> None:
    head = json.dumps(header).encode()
    body = recorddict_to_proto(content).SerializeToString() if content is not None else b""
    sock.sendall(_LENGTHS.pack(len(head), len(body)) + head + body)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], RecordDict | None]:
    head_len, body_len = _LENGTHS.unpack(_recv_exactly(sock, _LENGTHS.size))
    if head_len > MAX_HEADER:
        raise TrainerUnavailable(f"a {head_len}-byte header on the trainer socket: not a medgen peer")
    header = json.loads(_recv_exactly(sock, head_len))
    if not body_len:
        return header, None
    proto = ProtoRecordDict()
    proto.ParseFromString(_recv_exactly(sock, body_len))
    return header, recorddict_from_proto(proto)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise TrainerUnavailable("the trainer closed the connection before its reply")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- the ClientApp's side ---------------------------------------------------------------
def ask(state_dir: Path, verb: str, run_config: Mapping[str, Any], node_config: Mapping[str, Any],
        content: RecordDict, *, site: str, failed_code: int,
        ready_timeout: float = READY_TIMEOUT) -> RecordDict | Error:
    """The trainer's answer to one round: its reply content or its clean ``Error``; an
    ``Error(failed_code, ...)`` when it could not answer twice (see the module docstring)."""
    path = socket_path(state_dir)
    header = {"verb": verb, "run-config": dict(run_config), "node-config": dict(node_config)}
    for attempt in (1, 2):
        try:
            return _exchange(path, header, content, ready_timeout)
        except (TrainerUnavailable, OSError, ValueError, DecodeError) as err:
            log.warning("site %s: the warm trainer did not answer the %s request (attempt %d of 2): %s",
                        site, verb, attempt, err)
    noun = "training" if verb == "train" else "evaluation"
    return Error(failed_code, f"site {site}: {noun} failed: the local trainer stopped during the "
                 "round twice (details in the node log)")


def _exchange(path: Path, header: Mapping[str, Any], content: RecordDict, ready_timeout: float
              ) -> RecordDict | Error:
    with _connect(path, ready_timeout) as sock:
        send_frame(sock, header, content)
        reply, body = recv_frame(sock)
    if "error" in reply:
        code, reason = reply["error"]
        return Error(int(code), str(reason))
    return body if body is not None else RecordDict()


def _connect(path: Path, timeout: float) -> socket.socket:
    """A connection to the trainer, waiting up to ``timeout`` s for it to (re)start."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            if time.monotonic() > deadline:
                raise TrainerUnavailable(f"no trainer listening after {timeout:.0f} s") from err
            time.sleep(0.2)
            continue
        uid = peer_uid(sock)
        if uid is not None and uid != os.getuid():  # a socket planted by another user
            sock.close()
            raise TrainerUnavailable(f"the process on {path} runs as user id {uid}, not this node's")
        return sock


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end (Linux ``SO_PEERCRED``); None elsewhere."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return uid
