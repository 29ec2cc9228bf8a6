"""Paired image metrics: PSNR, SSIM, MAE inside a mask, Dice per tissue class.

For paired translation scores (EVALUATION.md item 3) the comparison is restricted to the
brain box: whole-image scores are dominated by background noise (DATA.md). Every
function takes single images [H, W] or batches [N, 1, H, W] / [N, H, W] and an optional
boolean mask of the same spatial shape; batch results are means over images.

SSIM uses MONAI's kernel (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03), whose map
covers the "valid" region only; with a mask, the map is averaged over the mask pixels
inside that region. Without a mask it equals scikit-image's
``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
Dice uses MONAI's ``DiceMetric``.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.networks.utils import one_hot

from medgen.config import RunConfig

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _batch(name: str, x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Images as float64 [N, 1, H, W]."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    t = t.detach().to("cpu", torch.float64)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"{name} must be [H,W], [N,H,W] or [N,1,H,W], got {tuple(t.shape)}")
    return t


def _mask(mask: torch.Tensor | np.ndarray | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    m = _batch("mask", mask).bool()
    if m.shape[0] == 1 and like.shape[0] > 1:
        m = m.expand(like.shape[0], -1, -1, -1)
    if m.shape != like.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match images {tuple(like.shape)}")
    if not m.flatten(1).any(dim=1).all():
        raise ValueError("mask is empty for at least one image; nothing to compare")
    return m


def _pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = _batch("pred", pred), _batch("target", target)
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    return p, t


def mae(pred, target, mask=None) -> float:
    """Mean absolute error over the mask pixels (whole image without a mask)."""
    p, t = _pair(pred, target)
    m = _mask(mask, p)
    per_image = [(p[i][m[i]] - t[i][m[i]]).abs().mean() for i in range(p.shape[0])]
    return float(torch.stack(per_image).mean())


def psnr(pred, target, data_range: float, mask=None) -> float:
    """PSNR in dB, 10 log10(range^2 / MSE), MSE over the mask; mean over images."""
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    p, t = _pair(pred, target)
    m = _mask(mask, p)
    values = []
    for i in range(p.shape[0]):
        mse = ((p[i][m[i]] - t[i][m[i]]) ** 2).mean()
        values.append(torch.tensor(float("inf")) if mse == 0 else 10 * torch.log10(data_range ** 2 / mse))
    return float(torch.stack(values).mean())


def ssim(pred, target, data_range: float, mask=None) -> float:
    """Mean SSIM over the mask (MONAI kernel; see the module docstring)."""
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    p, t = _pair(pred, target)
    if min(p.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"images must be at least {SSIM_WINDOW} px for SSIM, got {tuple(p.shape[-2:])}")
    ssim_map, _ = compute_ssim_and_cs(p, t, spatial_dims=2, kernel_size=(SSIM_WINDOW,) * 2,
                                      kernel_sigma=(SSIM_SIGMA,) * 2, data_range=data_range)
    ssim_map = ssim_map.double()
    pad = (SSIM_WINDOW - 1) // 2
    m = _batch("mask", torch.ones_like(p[:, 0]) if mask is None else mask).bool()
    m = m.expand(p.shape[0], -1, -1, -1) if m.shape[0] == 1 else m
    m = m[..., pad:p.shape[-2] - pad, pad:p.shape[-1] - pad]
    if not m.flatten(1).any(dim=1).all():
        raise ValueError("mask has no pixel inside the SSIM valid region for some image")
    return float(torch.stack([ssim_map[i][m[i]].mean() for i in range(p.shape[0])]).mean())


def dice_per_class(pred_labels, true_labels, num_classes: int | None = None,
                   include_background: bool = False) -> dict[int, float]:
    """Dice per label value over a batch of integer label maps (MONAI DiceMetric).

    ``num_classes``: the run's label schema (``RunConfig.num_classes``); None means the run
    config's default schema.

    Classes absent from both prediction and truth in every image give NaN (nothing to
    score); the mean over images ignores images where the class is absent from the truth.
    """
    num_classes = RunConfig().num_classes if num_classes is None else num_classes
    pred = _batch("pred_labels", pred_labels).long()
    true = _batch("true_labels", true_labels).long()
    if pred.shape != true.shape:
        raise ValueError(f"label maps differ in shape: {tuple(pred.shape)} vs {tuple(true.shape)}")
    for name, lab in (("pred_labels", pred), ("true_labels", true)):
        if lab.min() < 0 or lab.max() >= num_classes:
            raise ValueError(f"{name} has values outside 0..{num_classes - 1}")
    metric = DiceMetric(include_background=include_background, reduction="mean_batch",
                        ignore_empty=True)
    metric(one_hot(pred, num_classes), one_hot(true, num_classes))
    scores = metric.aggregate().reshape(-1)  # mean over images, NaN (absent) entries left out
    first = 0 if include_background else 1
    return {first + i: float(v) for i, v in enumerate(scores)}
