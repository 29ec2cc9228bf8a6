"""Validation and preprocessing of one record: the checks training applies, and the scaling.

Shared by sites, the public bank, held-out data and translation, so every "[-1, 1]" means
the same thing (NORMALISATION_VERSION is in every cache key):
- ``check_image``: refuse non-finite voxels and constant images;
- ``volume_scaling``: the manifest's intensity policy (data/intensity.py) for one patient's
  volume: CT through the one fixed window, MR by the percentiles of the whole volume (not
  per slice), the map kept (``ImageScaling.intensity``) so it can be inverted; a constant
  slice (a blank end slice of a volume) is dropped;
- ``robust_scaling``: the legacy per-slice 0.5th..99.5th percentile range (translate and
  held-out data of data without a manifest; identical to ``volume_scaling`` for 2D images);
- ``check_labels``: a label map matches its image voxel for voxel and holds only values of
  the label schema (``dataset.toml`` [labels]; the brain default without one); returns the
  class indices 0..K-1;
- ``square_resize``: each slice is padded to a square in PHYSICAL extent (in-plane spacing
  when known, so anisotropic pixels do not stretch anatomy) with -1 (images) or 0
  (labels), then resized: area averaging when shrinking, bilinear when enlarging,
  nearest neighbour for labels.
Arrays are used in stored voxel order; the third axis is the slice axis (data contract).
Every refusal is a ReaderError saying what is wrong; the caller names the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medgen.data.errors import LabelValueError
from medgen.data.intensity import IntensityMap, intensity_map
from medgen.data.label_schema import LabelSchema
from medgen.data.manifest import DatasetManifest, IntensityPolicy
from medgen.data.readers import Reader, ReaderError

__all__ = ["ImageScaling", "NORMALISATION_VERSION", "LOW_PERCENTILE", "HIGH_PERCENTILE",
           "cache_params", "check_image", "robust_scaling", "volume_scaling", "normalise", "check_labels",
           "square_resize"]


@dataclass(frozen=True)
class ImageScaling:
    """The per-slice mapping used for one image (reused for its clean twin)."""

    keep: np.ndarray  # [S] bool: slices kept (not constant)
    low: np.ndarray   # [S] float: value mapped to -1
    high: np.ndarray  # [S] float: value mapped to +1
    intensity: IntensityMap | None = None  # the volume's map (None: legacy per-slice scaling)


NORMALISATION_VERSION = 2  # 2: the manifest's map per volume (window / volume percentiles)
BRAIN_SCHEMA = DatasetManifest.default_brain().labels
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


def check_image(array: np.ndarray) -> None:
    """Raise ReaderError saying why the voxels cannot be used as an image."""
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ReaderError(f"contains {bad} non-finite voxels (NaN or inf)")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise ReaderError(f"is constant (every voxel = {low:g}); nothing to learn from it")


def robust_scaling(array: np.ndarray) -> ImageScaling:
    """Per-slice 0.5..99.5 percentile range of a (H, W, S) image."""
    check_image(array)
    low, high = np.percentile(array, [LOW_PERCENTILE, HIGH_PERCENTILE], axis=(0, 1))
    narrow = high <= low
    low = np.where(narrow, array.min(axis=(0, 1)), low)
    high = np.where(narrow, array.max(axis=(0, 1)), high)
    keep = high > low
    if not keep.any():
        raise ReaderError(f"every slice is constant; nothing to learn from it")
    return ImageScaling(keep=keep, low=low.astype(np.float64), high=high.astype(np.float64))


def volume_scaling(array: np.ndarray, policy: IntensityPolicy) -> ImageScaling:
    """One map for the whole (H, W, S) volume under ``policy``; constant slices dropped."""
    check_image(array)
    flat = array.reshape(-1, array.shape[-1])
    keep = flat.max(axis=0) > flat.min(axis=0)
    if not keep.any():
        raise ReaderError("every slice is constant; nothing to learn from it")
    try:
        imap = intensity_map(policy, array[..., keep])
    except ValueError as err:
        raise ReaderError(f"cannot be normalised ({err})") from None
    slices = array.shape[-1]
    return ImageScaling(keep=keep, low=np.full(slices, imap.lo, np.float64),
                        high=np.full(slices, imap.hi, np.float64), intensity=imap)


def normalise(array: np.ndarray, scaling: ImageScaling) -> np.ndarray:
    """Kept slices of ``array`` mapped to [-1, 1] by ``scaling`` and clipped."""
    kept = array[..., scaling.keep].astype(np.float64)
    low, high = scaling.low[scaling.keep], scaling.high[scaling.keep]
    scaled = 2.0 * (kept - low) / (high - low) - 1.0
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


def check_labels(labels: np.ndarray, image_shape: tuple[int, ...] | None, label_name: str,
                 schema: LabelSchema | None = None) -> np.ndarray:
    """The class indices (int64) of a label map; ReaderError naming the file and value if it
    does not match the image or holds a value outside ``schema`` (default: the brain's)."""
    labels = np.asarray(labels)
    schema = schema if schema is not None else BRAIN_SCHEMA
    if image_shape is not None and tuple(labels.shape) != tuple(image_shape):
        raise ReaderError(f"label map {label_name} has shape {tuple(labels.shape)} but the image "
                          f"has shape {tuple(image_shape)}; they must match voxel for voxel")
    try:
        return schema.to_indices(labels, source=f"label map {label_name}")
    except LabelValueError as err:
        raise ReaderError(str(err)) from None


def square_resize(slices: np.ndarray, size: int, spacing: tuple[float, float, float] | None,
                  kind: str) -> torch.Tensor:
    """(H, W, S) -> [S, size, size]; ``kind`` is "image" (float32) or "label" (int64)."""
    tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(slices, -1, 0)))
    tensor = tensor.to(torch.float32).unsqueeze(1)  # [S, 1, H, W]
    height, width = tensor.shape[-2:]
    row_mm, col_mm = (spacing[0], spacing[1]) if spacing and min(spacing[:2]) > 0 else (1.0, 1.0)
    side_mm = max(height * row_mm, width * col_mm)
    target_h, target_w = max(height, round(side_mm / row_mm)), max(width, round(side_mm / col_mm))
    top, left = (target_h - height) // 2, (target_w - width) // 2
    fill = -1.0 if kind == "image" else 0.0
    tensor = F.pad(tensor, (left, target_w - width - left, top, target_h - height - top),
                   value=fill)
    if kind == "label":
        out = F.interpolate(tensor, size=(size, size), mode="nearest-exact")
        return out[:, 0].round().to(torch.int64)
    if min(target_h, target_w) >= size:
        out = F.interpolate(tensor, size=(size, size), mode="area")
    else:
        out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)
    return out[:, 0].clamp_(-1.0, 1.0)


def cache_params(image_size: int, readers: Sequence[Reader], kind: str, **extra) -> dict:
    """Everything besides the input bytes that decides the tensors (part of a cache key)."""
    return {"kind": kind, "image_size": int(image_size), "normalisation": NORMALISATION_VERSION,
            "percentiles": [LOW_PERCENTILE, HIGH_PERCENTILE],
            "readers": [getattr(r, "cache_token", r.name) for r in readers], **extra}
