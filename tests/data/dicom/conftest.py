"""Shared fixtures: the DICOM test corpus (real voxels, synthetic headers), built once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from medgen.sim.dicom_export import build_test_corpus

torch.set_num_threads(1)


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under root (to prove nothing was modified)."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                             p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_corpus")
    return root, build_test_corpus(root)
