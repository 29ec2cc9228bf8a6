"""The region where translation quality is scored: the brain, dilated a little.

Whole-image SSIM and PSNR are dominated by the background (zero anatomy, pure scanner
noise), so every paired metric of the simulated federation is computed inside this mask
(DATA.md, EVALUATION.md).
"""

from __future__ import annotations

import numpy as np

DILATION_PX = 2


def brain_box(labels: np.ndarray, dilation: int = DILATION_PX) -> np.ndarray:
    """Boolean mask of ``labels > 0`` dilated by ``dilation`` pixels (square neighbourhood).

    labels: integer tissue map [H, W] (or [N, H, W]; each map is dilated on its own).
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"brain_box expects a label map [H, W] or [N, H, W], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"brain_box expects integer tissue labels, got dtype {labels.dtype}")
    mask = labels > 0
    if dilation <= 0:
        return mask
    structure = np.ones((3, 3), bool)
    if labels.ndim == 3:
        structure = structure[None] & np.array([False, True, False])[:, None, None]
    return ndimage.binary_dilation(mask, structure=structure, iterations=dilation)
