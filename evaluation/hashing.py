"""Content hashes of tensors and network weights (cache keys, provenance in reports)."""

from __future__ import annotations

import hashlib

import torch


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """Content hash of loaded tensors (shape, dtype and values): the data part of a cache key."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Hash of a network's weights (names, shapes, dtypes, values), independent of pickling."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + b"\0")
        digest.update(tensors_sha256(tensor).encode())
    return digest.hexdigest()
