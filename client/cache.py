"""A cache of preprocessed tensors, keyed by the exact bytes they were made from.

The key (``fingerprint``) hashes, for every file under the given input folders: its path
relative to the site, its size and a hash of its content (files are small; hashing the
bytes is fast and, unlike mtimes, survives copies and catches same-size edits), plus the
preprocessing parameters and ``medgen.__version__``. Any changed, added or removed file
(a bad one too: whether it is skipped depends on its bytes) or parameter gives another
key, hence a miss. Entries are written atomically (medgen.atomic) and loaded with
``weights_only=True`` (plain tensors, strings and numbers only, nothing executable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

import medgen
from medgen.atomic import atomic_torch_save

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(root: Path, folders: tuple[str, ...], params: Mapping[str, Any]) -> str:
    """Hex key over every file under ``root/<folder>`` (recursively) and ``params``.

    ``params`` must be JSON-serialisable (image size, normalisation version, readers).
    Missing folders count as empty (a site without labels/).
    """
    root = Path(root)
    digest = hashlib.sha256()
    header = {"format": CACHE_FORMAT, "medgen": medgen.__version__, "params": dict(params)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for folder in folders:
        base = root / folder
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        digest.update(f"\0folder {folder} {len(files)}".encode())
        for path in files:
            relative = path.relative_to(root).as_posix()
            size = os.stat(path).st_size
            digest.update(f"\0{relative}\0{size}\0{file_digest(path)}".encode())
    return digest.hexdigest()


class TensorCache:
    """``get``/``put`` of dicts of tensors, strings and numbers under a cache directory."""

    def __init__(self, cache_dir: str | os.PathLike, prefix: str = "site"):
        self.cache_dir = Path(cache_dir)
        self.prefix = prefix

    def path_for(self, key: str) -> Path:
        return self.cache_dir / f"{self.prefix}-{key[:32]}.pt"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: rebuild rather than fail
            logger.warning("cache entry %s is unreadable (%s); rebuilding it", path, err)
            return None
        if not isinstance(payload, dict) or payload.get("key") != key:
            logger.warning("cache entry %s does not match its key; rebuilding it", path)
            return None
        return payload["value"]

    def put(self, key: str, value: Mapping[str, Any]) -> Path:
        return atomic_torch_save(self.path_for(key), {"key": key, "value": dict(value)})
