"""Tiny on-disk fixtures for the site-data tests: real NIfTI and PNG files in tmp_path.

Helpers reach the tests through the ``files`` fixture, never ``from conftest import``:
several conftest.py modules exist under tests/ and that import picks whichever was
loaded last.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    zooms = (tuple(spacing) + (1.0,) * 4)[: array.ndim]
    image = nibabel.Nifti1Image(array, np.diag(list((zooms + (1.0, 1.0))[:3]) + [1.0]))
    image.header.set_zooms(zooms)
    nibabel.save(image, str(path))
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def phantom(size: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A disc phantom: (image uint16 scanner values, tissue labels 0..3), both (size, size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    labels = np.select([radius < 0.3, radius < 0.6, radius < 0.9], [1, 2, 3], 0).astype(np.uint8)
    image = np.array([0, 300, 600, 900])[labels] + rng.integers(0, 50, labels.shape)
    return image.astype(np.uint16), labels


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """sha256, size and mtime (ns) of every file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = os.stat(path)
            out[path.relative_to(root).as_posix()] = (
                hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns)
    return out


class SiteFiles:
    """The helpers above, as one fixture object."""

    write_nifti = staticmethod(write_nifti)
    write_png = staticmethod(write_png)
    phantom = staticmethod(phantom)
    snapshot = staticmethod(snapshot)


@pytest.fixture
def files() -> SiteFiles:
    return SiteFiles()


@pytest.fixture
def good_site(tmp_path: Path) -> Path:
    """Two 2D NIfTI patients, one PNG patient, one 3D NIfTI patient of 3 slices; all labelled."""
    site = tmp_path / "site"
    for index in range(2):
        image, labels = phantom(20, seed=index)
        write_nifti(site / "images" / f"p{index}.nii.gz", image)
        write_nifti(site / "labels" / f"p{index}.nii.gz", labels)
    image, labels = phantom(24, seed=7)
    write_png(site / "images" / "png0.png", image)
    write_png(site / "labels" / "png0.png", labels)
    stack = [phantom(20, seed=10 + s) for s in range(3)]
    write_nifti(site / "images" / "vol.nii.gz", np.stack([s[0] for s in stack], -1).astype(np.int16))
    write_nifti(site / "labels" / "vol.nii.gz", np.stack([s[1] for s in stack], -1))
    return site
