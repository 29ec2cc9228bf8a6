"""DICOM SEG label maps, aligned with the image series they segment.

A SEG stores one binary (or fractional) frame per segment per slice, each frame with its
own ImagePositionPatient (PS3.3 C.8.20). Alignment is by geometry: a SEG frame lands on
the image slice whose position along the normal is the same (within half a slice), never
by frame order. Segment numbers become label values, so a site's SEG must number its
segments as the brain default schema (1 CSF, 2 GM, 3 WM); overlapping segments: the higher
number wins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgen.data.dicom.headers import DicomHeader
from medgen.data.dicom.pixels import PixelDecodeError, read_frames
from medgen.data.dicom.series import Series, _normal


def seg_label_map(root: Path, seg: DicomHeader, image: Series) -> np.ndarray:
    """An int64 (rows, columns, slices) label map of ``seg`` on ``image``'s slice grid."""
    if image.orientation is None or any(ref.offset_mm is None for ref in image.slices):
        raise PixelDecodeError(f"{seg.relpath}: the image series has no slice geometry to "
                               "align a segmentation with")
    if (seg.rows, seg.columns) != (image.rows, image.columns):
        raise PixelDecodeError(f"{seg.relpath}: segmentation frames are {seg.rows}x{seg.columns} "
                               f"but the images are {image.rows}x{image.columns}")
    ds, frames = read_frames(root / seg.relpath, seg.relpath)
    fractional = str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL"
    threshold = float(ds.get("MaximumFractionalValue") or 255) / 2 if fractional else 0.5
    normal = _normal(image.orientation)
    offsets = np.array([ref.offset_mm for ref in image.slices])
    step = image.spacing[2] if image.spacing and np.isfinite(image.spacing[2]) else 1.0
    labels = np.zeros((image.rows, image.columns, len(image.slices)), dtype=np.int64)
    for k, info in enumerate(seg.frames):
        if info.position is None or info.segment is None:
            raise PixelDecodeError(f"{seg.relpath}: frame {k + 1} lacks its position or segment number")
        offset = float(np.dot(normal, info.position))
        index = int(np.argmin(np.abs(offsets - offset)))
        if abs(offsets[index] - offset) > step / 2:
            raise PixelDecodeError(f"{seg.relpath}: frame {k + 1} at {offset:.2f} mm matches no "
                                   "slice of the image series")
        mask = frames[k] > threshold
        labels[:, :, index] = np.where(mask, np.maximum(labels[:, :, index], info.segment),
                                       labels[:, :, index])
    return labels
