"""Node-local state between rounds, and replay safety. Nothing here ever leaves the node.

``LocalState``: the recipe's non-shared weights (e.g. the GAN discriminator, which stays
at the hospital) and its ``local_state`` dict (optimizer states), tied to one run key: a
new training run starts from fresh local state.

Replay safety (``ReplyStore``): a request is identified by (run key, absolute round,
sha256 of the incoming global weights). After a reply is built, it is stored under that
id. If the SAME request arrives again (the coordinator restarted and replays the round),
the stored reply is sent back without training: no new noise is drawn on real records,
nothing new is released, so nothing is charged again. The ledger's idempotency key is the
same request id, so a retried commit is also free. A request with the same round but
different weights is a different request: it trains and is charged.

Order in the client: ledger commit -> local state -> stored reply. A crash between the
commit and storing the reply makes the retried request train again and be charged
again (conservative: the ledger never under-reports).

Files are written atomically (medgen.atomic) and read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from medgen.atomic import atomic_torch_save

KEEP_REPLIES = 3  # only the most recent replies can be replayed; older ones are deleted


def request_id(run_key: str, server_round: int, arrays: ArrayRecord) -> str:
    digest = hashlib.sha256(f"{run_key}\x00{int(server_round)}".encode())
    for key in sorted(arrays.keys()):
        array = arrays[key]
        digest.update(f"\x00{key}\x00{array.dtype}\x00{tuple(array.shape)}\x00".encode())
        digest.update(array.data)
    return digest.hexdigest()[:32]


@dataclass
class LocalState:
    run_key: str
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    recipe_state: dict[str, Any] = field(default_factory=dict)


def load_local_state(path: Path, run_key: str) -> LocalState:
    """The stored state for ``run_key``; an empty one for a new run or a first round."""
    if not path.exists():
        return LocalState(run_key)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if stored.get("run_key") != run_key:
        return LocalState(run_key)
    return LocalState(run_key, dict(stored["weights"]), dict(stored["recipe_state"]))


def save_local_state(path: Path, state: LocalState) -> None:
    atomic_torch_save(path, {"run_key": state.run_key,
                             "weights": {k: v.detach().cpu() for k, v in state.weights.items()},
                             "recipe_state": _to_cpu(state.recipe_state)})


@dataclass(frozen=True)
class StoredReply:
    arrays: dict[str, torch.Tensor]
    metrics: dict[str, float | int]


class ReplyStore:
    """The last few replies by request id (replay without retraining)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _path(self, request: str) -> Path:
        return self.directory / f"{request}.pt"

    def load(self, request: str) -> StoredReply | None:
        path = self._path(request)
        if not path.exists():
            return None
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return StoredReply(dict(stored["arrays"]), dict(stored["metrics"]))

    def save(self, request: str, reply: StoredReply) -> None:
        atomic_torch_save(self._path(request), {"arrays": {k: v.detach().cpu() for k, v in reply.arrays.items()},
                                                "metrics": dict(reply.metrics)})
        stored = sorted(self.directory.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        for old in stored[:-KEEP_REPLIES]:
            old.unlink(missing_ok=True)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
