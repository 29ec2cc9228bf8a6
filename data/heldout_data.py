"""Held-out evaluation data: the same subjects rendered at every site, paired row by row.

``<data_root>/heldout/<split>/<site>/{images,clean,labels}`` -> one ``HeldoutSite`` per
site. The folders are listed by the same walk as a training site (data/site_folder.py:
no links followed, regular files only, unreadable files skipped and named) and keyed by
subject name; a subject missing its image, clean rendering or labels is skipped at that
site, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medgen.data.cache import TensorCache, folder_key
from medgen.data.intensity import PercentileMap
from medgen.data.manifest import DatasetManifest, load_manifest
from medgen.data.preprocess import (HIGH_PERCENTILE, cache_params, check_labels, normalise,
                                      square_resize, volume_scaling)
from medgen.data.readers import Reader, ReaderError, SkippedFile, default_readers
from medgen.data.site_folder import SiteFolder
from medgen.data.site_records import SiteDataError, SkipLog, keyed_entries, read_single

logger = logging.getLogger(__name__)

__all__ = ["HeldoutSite", "load_heldout"]

FOLDERS = ("images", "clean", "labels")


@dataclass(frozen=True)
class HeldoutSite:
    """Paired held-out data of one site; row i of every site is the same subject slice."""

    images: torch.Tensor      # [N,1,H,W] float32, normalised like site images
    clean: torch.Tensor       # [N,1,H,W] float32, on the SAME scale as its noisy image
    labels: torch.Tensor      # [N,H,W] int64
    subjects: tuple[str, ...]  # subject name per row (synthetic held-out names; for pairing)
    skipped: list[SkippedFile]


def load_heldout(data_root: str | Path, split: str, image_size: int,
                 cache_dir: str | Path | None = None,
                 readers: Sequence[Reader] | None = None) -> dict[str, HeldoutSite]:
    """``<data_root>/heldout/<split>/<site>/{images,clean,labels}`` -> one HeldoutSite per site.

    ``data_root`` may also be the ``heldout`` folder itself. The clean rendering is mapped
    with its noisy image's scaling, not its own: noise and bias widen the noisy image's
    percentile range, so scaling each by its own range would shift and shrink the clean
    target relative to the image a model sees, and a perfect translation would score
    below perfect. One mapping keeps clean = expected noisy on one scale (clipped alike).
    This needs clean/ stored in the SAME units as images/ (noise-free and unquantised, so
    float); a mismatch (e.g. clean in [0, 1], images as 12-bit integers) is logged.
    """
    root = Path(data_root)
    split_dir = root / "heldout" / split if (root / "heldout").is_dir() else root / split
    if not split_dir.is_dir():
        raise SiteDataError(f"{split_dir}: no held-out split '{split}'; expected "
                            f"<data-root>/heldout/{split}/<site>/images|clean|labels")
    readers = list(readers) if readers is not None else default_readers()
    sites = {d.name: _heldout_site(d, image_size, readers, cache_dir,
                                   load_manifest(d, root=root if split_dir.parent.parent == root else None))
             for d in sorted(split_dir.iterdir())
             if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")}
    if not sites:
        raise SiteDataError(f"{split_dir}: holds no site folders")
    subject_lists = {name: site.subjects for name, site in sites.items()}
    if len(set(subject_lists.values())) > 1:
        logger.warning("held-out sites in %s do not hold the same subjects (%s); paired "
                       "metrics must match rows by subject name", split_dir,
                       ", ".join(f"{k}: {len(v)}" for k, v in subject_lists.items()))
    return sites


def _heldout_site(site_dir: Path, size: int, readers: Sequence[Reader],
                  cache_dir: str | Path | None, manifest: DatasetManifest) -> HeldoutSite:
    """One held-out site, normalised and labelled as its manifest says (as a training site)."""
    folder = SiteFolder.scan(site_dir, FOLDERS)
    key = folder_key(folder, cache_params(size, readers, "heldout",
                                          manifest=manifest.to_tables()))
    cache = TensorCache(cache_dir, prefix="heldout") if cache_dir is not None else None
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return HeldoutSite(cached["images"], cached["clean"], cached["labels"],
                           tuple(cached["subjects"]),
                           [SkippedFile(site_dir / rel, reason) for rel, reason in cached["skipped"]])
    skips = SkipLog(site_dir)
    for rel, reason in folder.skipped:
        skips.add(site_dir / rel, reason)
    keyed = {name: keyed_entries(folder, name, readers, skips) for name in FOLDERS}
    images, clean, labels, subjects = [], [], [], []
    unit_ratios: list[float] = []  # clean's robust top / image's: ~1 when units agree
    for item, (rel, reader) in keyed["images"].items():
        try:
            missing = [f for f in ("clean", "labels") if item not in keyed[f]]
            if missing:
                raise ReaderError(f"no {' or '.join(missing)} file of the same name")
            volume = read_single(site_dir / rel, reader)
            scaling = volume_scaling(volume.array, manifest.intensity)
            clean_rel, clean_reader = keyed["clean"][item]
            twin = _read_twin(site_dir, clean_rel, clean_reader, "clean rendering")
            if twin.shape != volume.array.shape or not np.isfinite(twin).all():
                raise ReaderError(f"clean rendering has shape {twin.shape} or non-finite values; "
                                  f"expected finite values of shape {volume.array.shape}")
            label_rel, label_reader = keyed["labels"][item]
            label_map = _read_twin(site_dir, label_rel, label_reader, "label map")
            label_map = check_labels(label_map, volume.array.shape, label_rel, manifest.labels)
        except ReaderError as err:
            skips.add(site_dir / rel, str(err))
            continue
        images.append(square_resize(normalise(volume.array, scaling), size, volume.spacing, "image"))
        clean.append(square_resize(normalise(twin, scaling), size, volume.spacing, "image"))
        labels.append(square_resize(label_map[..., scaling.keep], size, volume.spacing, "label"))
        subjects.extend([item] * int(scaling.keep.sum()))
        if isinstance(scaling.intensity, PercentileMap):  # a fixed window has no such scale
            unit_ratios.append(float(np.percentile(twin, HIGH_PERCENTILE)) /
                               max(float(scaling.high.max()), 1e-12))
    if not images:
        reasons = "\n  ".join(s.reason for s in skips.items) or "images/ holds no files"
        raise SiteDataError(f"{site_dir}: no usable held-out subjects; reasons:\n  {reasons}")
    _warn_on_unit_mismatch(site_dir, unit_ratios)
    site = HeldoutSite(torch.cat(images).unsqueeze(1), torch.cat(clean).unsqueeze(1),
                       torch.cat(labels), tuple(subjects), skips.items)
    if cache is not None:
        cache.put(key, {"images": site.images, "clean": site.clean, "labels": site.labels,
                        "subjects": list(site.subjects),
                        "skipped": [[skips.relative(s.path), s.reason] for s in skips.items]})
    return site


def _read_twin(site_dir: Path, rel: str, reader: Reader, what: str) -> np.ndarray:
    try:
        return read_single(site_dir / rel, reader).array
    except ReaderError as err:
        raise ReaderError(f"{what} {rel}: {err}") from None


def _warn_on_unit_mismatch(site_dir: Path, unit_ratios: list[float]) -> None:
    if not unit_ratios:
        return
    ratio = float(np.median(unit_ratios))
    if not 0.25 <= ratio <= 4.0:
        logger.warning("%s: clean renderings look like they are in other units than images/ "
                       "(median ratio of their 99.5th percentiles %.3g); the contract is clean "
                       "in the same units as its image (noise-free, unquantised), otherwise "
                       "paired metrics are meaningless", site_dir, ratio)
