"""The coordinator's checkpoint: global shared weights after the last completed round.

Written atomically (medgen.atomic) before round 1 (round 0: the initial weights and the
run key, so a crash in round 1 resumes with the same key and sites replay instead of
training twice) and after every round that TRAINED: a round in which no site's update was
aggregated keeps the previous weights and writes nothing, so ``server_round`` is always the
last round that trained (server/app.py ``RoundEnd``). A crash at any moment leaves the last
good checkpoint. ``checkpoint.pt`` holds the weights and the metadata (it is the
source of truth); ``checkpoint.json`` is a human-readable sidecar with the same metadata
and the sha256 of the .pt file, written after it.

Resume rule: a checkpoint is reused only if its config hash matches the run's. The hash
covers what defines the trained model and its privacy plan (recipe, options, image size,
sites, batch size, local steps, DP parameters, seed) but NOT num-rounds: extending a run
by more rounds is exactly what resuming is for (the site ledgers still cap epsilon).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import medgen
from medgen.atomic import atomic_write_bytes, atomic_write_json
from medgen.config import RunConfig

CHECKPOINT_FILE = "checkpoint.pt"
SIDECAR_FILE = "checkpoint.json"

# fields that do not change what a checkpoint means (where things are, how long, eval)
_NOT_HASHED = {"num-rounds", "run-dir", "resume", "data-root", "state-root", "eval-every",
               "eval-samples", "round-timeout", "device", "min-sites", "coordinator-id",
               "simulate-actors"}  # how many sites train at once changes no result


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message says why and what to do."""


def config_hash(config: RunConfig) -> str:
    relevant = {k: v for k, v in sorted(config.to_run_config().items()) if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    shared_state: dict[str, torch.Tensor]
    server_round: int          # absolute round these weights are the result of
    config_hash: str
    run_key: str               # stable id of the training run across restarts
    medgen_version: str


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    payload = {
        "shared_state": {k: v.detach().cpu().clone() for k, v in checkpoint.shared_state.items()},
        "server_round": checkpoint.server_round,
        "config_hash": checkpoint.config_hash,
        "run_key": checkpoint.run_key,
        "medgen_version": checkpoint.medgen_version,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path = atomic_write_bytes(Path(run_dir) / CHECKPOINT_FILE, data)
    atomic_write_json(Path(run_dir) / SIDECAR_FILE, {
        "server_round": checkpoint.server_round, "config_hash": checkpoint.config_hash,
        "run_key": checkpoint.run_key, "medgen_version": checkpoint.medgen_version,
        "sha256": hashlib.sha256(data).hexdigest(), "num_tensors": len(payload["shared_state"]),
    })
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint in ``run_dir``, or None if there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        # weights_only: a checkpoint is data, never code
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(shared_state=dict(payload["shared_state"]),
                          server_round=int(payload["server_round"]),
                          config_hash=str(payload["config_hash"]),
                          run_key=str(payload["run_key"]),
                          medgen_version=str(payload["medgen_version"]))
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                              "move it away to start fresh, or set resume=false") from err


def checkpoint_for_resume(run_dir: Path, config: RunConfig) -> Checkpoint | None:
    """The checkpoint to resume from (None: start fresh); refuses a mismatching one."""
    if not config.resume:
        return None
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        return None
    expected = config_hash(config)
    if checkpoint.config_hash != expected:
        raise CheckpointError(
            f"checkpoint {Path(run_dir) / CHECKPOINT_FILE} was written for a different "
            f"configuration (config hash {checkpoint.config_hash}, this run {expected}); "
            "use another run-dir, or set resume=false to overwrite it")
    return checkpoint


def new_checkpoint(shared_state: dict[str, torch.Tensor], server_round: int, config: RunConfig,
                   run_key: str) -> Checkpoint:
    return Checkpoint(shared_state=shared_state, server_round=server_round,
                      config_hash=config_hash(config), run_key=run_key,
                      medgen_version=medgen.__version__)


def set_aside_checkpoint(run_dir: Path) -> Path | None:
    """Rename an existing checkpoint to checkpoint.replaced-<time>.pt (and its sidecar), so
    a run that starts over (resume = false) never destroys trained weights; returns the
    new path, or None if there was no checkpoint."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"checkpoint.replaced-{stamp}.pt")
    sidecar = Path(run_dir) / SIDECAR_FILE
    if sidecar.exists():
        sidecar.rename(target.with_suffix(".json"))
    path.rename(target)
    return target
