"""A cache of preprocessed tensors, keyed by the exact bytes they were made from.

The key (``folder_key``) hashes the listing of the site's input folders made by the one
walk every reader shares (data/site_folder.py): for every regular file it may read, its
path relative to the site, its size and a hash of its content (files are small; hashing the
bytes is fast and, unlike mtimes, survives copies and catches same-size edits); every
entry it skipped (a link, a FIFO, an unreadable file) with its reason; the preprocessing
parameters and ``medgen.__version__``. So the key covers exactly what the loader may read,
never opens what the loader would not (no link followed, no pipe opened), and an
unreadable file is a skipped entry in the key, not a crash. Any changed, added or removed
file (a bad one too: whether it is skipped depends on its bytes) or parameter gives
another key, hence a miss. Entries are written atomically (medgen.atomic) and loaded with
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
from medgen.data.site_folder import SiteFolder, file_digest

logger = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "TensorCache", "file_digest", "fingerprint", "folder_key"]

CACHE_FORMAT = 2  # 2: keyed on the shared site-folder listing (skipped entries included)


def folder_key(folder: SiteFolder, params: Mapping[str, Any]) -> str:
    """Hex key over the listing ``folder`` and ``params`` (JSON-serialisable)."""
    digest = hashlib.sha256()
    header = {"format": CACHE_FORMAT, "medgen": medgen.__version__, "params": dict(params)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name in folder.folders:
        prefix = "" if name == "." else name + "/"
        files = sorted(r for r in folder.files if name == "." or r.startswith(prefix))
        digest.update(f"\0folder {name} {name in folder.present} {len(files)}".encode())
        for relative in files:
            facts = folder.files[relative]
            digest.update(f"\0{relative}\0{facts.size}\0{facts.digest}".encode())
    for relative, reason in sorted(folder.skipped):
        digest.update(f"\0skipped {relative}\0{reason}".encode())
    return digest.hexdigest()


def fingerprint(root: Path, folders: tuple[str, ...], params: Mapping[str, Any]) -> str:
    """``folder_key`` of a fresh listing of ``root/<folder>`` for each of ``folders``.

    Missing folders count as empty (a site without labels/).
    """
    return folder_key(SiteFolder.scan(root, tuple(folders)), params)


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
