"""A site's look (``SiteStyle``), its DP release, and translation through the label map.

Translation of an image x from site s to site t, done locally by whoever holds x:

    p = S(x)                                 soft tissue probabilities (contrast-agnostic S)
    m_s = per-tissue means of x under p      (x's own statistics: never leave the caller)
    r = x - sum_k p_k m_s[k]                 x's within-tissue texture and partial volume,
                                             smoothed 0.7 px (noise) and detrended at 4 px (bias)
    y = sum_k p_k M_t[k] + g * r             target contrast, source texture carried over
    y = blur(y, sqrt(b_t^2 - b_s^2))         target resolution

where M_t, b_t (tissue means and blur of site t) and b_s are the SiteStyle of each site
and g is the least-squares slope of the target tissue means on the source tissue means
(the first-order map of a within-tissue deviation: negative for T1 -> T2, so texture and
partial volume flip with the contrast).

The style release (bridge-translate's privacy argument, point 4). Per patient i (one
dataset item = one patient) the vector v_i = [1, m_ik w_ik (k = 0..K-1), w_ik (k = 0..K-1),
b_i / 3] for the K classes of the run's label schema (``patient_style_statistics``: m_ik its mean intensity in tissue k, w_ik =
min(1, n_ik / r_k) with n_ik the pixels of tissue k in its label map and r_k the median
area of tissue k over the PUBLIC maps (``style_reference_counts``: public constants,
identical at every site; with quantile 0, w_ik = 1 if tissue k occurs), b_i the BLUR_GRID
blur best fitting its own image) is computed from patient i's record alone. Images are in
[-1, 1] and w_ik in [0, 1], so ||v_i|| <= sqrt(2K+2) = style_clip(K); v_i is clipped to
it anyway, so adding or removing one patient moves S = sum_i v_i by at most style_clip(K)
(L2 sensitivity). Released: S + N(0, (sigma_style style_clip(K))^2 I), the
Gaussian mechanism (privacy/releases.py), accounted as (sigma_style, 1.0, 1) in the
site's one accountant (PRV at q = 1 is exactly the Gaussian mechanism's privacy-loss
distribution; RDP has its closed form). Everything after it is post-processing
(``style_from_statistics``). ``style_from_images`` measures a style on labelled images
centrally: on generated samples (free) or, in evaluation only, the non-private ceiling.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medgen.models.segmenter import predict_probs
from medgen.sim.random_contrast import gaussian_blur

BLUR_GRID = tuple(0.25 * i for i in range(13))  # candidate blur sigmas (px) for SiteStyle
MIN_TISSUE_MASS = 4.0  # pixels of probability mass below which a per-image mean is unreliable


def style_stat_dim(num_classes: int) -> int:
    """Length of the released per-patient statistic: [1, mean_k * present_k (K),
    present_k (K), blur / 3] for K = ``num_classes``."""
    return 2 * num_classes + 2


def style_clip(num_classes: int) -> float:
    """The release's clip norm: every in-range vector has norm <= sqrt(2K+2), never clipped."""
    return math.sqrt(style_stat_dim(num_classes))


@dataclass(frozen=True)
class SiteStyle:
    """A site's look on the [-1, 1] scale: mean intensity of each class of the label schema
    (index = label value) and the Gaussian blur (px) that best maps a flat tissue rendering
    onto its images."""

    tissue_means: tuple[float, ...]
    blur_px: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def style_from_images(images: torch.Tensor, labels: torch.Tensor,
                      num_classes: int | None = None) -> SiteStyle:
    """Measure a SiteStyle on images [N,1,H,W] with their label maps [N,H,W]; every class of
    the schema (``num_classes``; by default the largest label present + 1) must occur."""
    if images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not pair")
    x = images[:, 0].float()
    means = []
    for k in range(int(labels.max()) + 1 if num_classes is None else num_classes):
        inside = labels == k
        means.append(float(x[inside].mean()) if inside.any() else float("nan"))
    if any(math.isnan(m) for m in means):
        raise ValueError("every tissue class must occur in the label maps to measure a style")
    flat = torch.tensor(means)[labels.long()][:, None]
    errors = [float(((gaussian_blur(flat, torch.full((x.shape[0],), s)) - images.float()) ** 2).mean())
              for s in BLUR_GRID]
    return SiteStyle(tuple(means), BLUR_GRID[min(range(len(errors)), key=errors.__getitem__)])


def patient_style_statistics(images: torch.Tensor, labels: torch.Tensor,
                             reference_counts: torch.Tensor | None = None, *,
                             num_classes: int) -> torch.Tensor:
    """One statistic vector per patient (one row per image [N,1,H,W] with label map [N,H,W]):

        [1, m_0 w_0, ..., m_{K-1} w_{K-1}, w_0, ..., w_{K-1}, b / 3]   (K = num_classes)

    m_k = the image's mean intensity in tissue class k (0 if absent), w_k its weight: 1 if
    class k occurs in its label map, or with ``reference_counts`` [K] (public constants)
    min(1, n_k / reference_counts[k]) for a class covering n_k pixels, so a patient whose
    tissue is a thin, partial-volume-dominated sliver counts less (the released mean moves
    toward the pixel-pooled mean; see ``style_reference_counts``). b = the blur of
    BLUR_GRID (0..3 px) minimising the MSE between the image and its own flat tissue
    rendering blurred by b. Computed from that patient's image and labels alone; w_k is in
    [0, 1] and images are in [-1, 1], so its L2 norm is <= sqrt(2K+2) = style_clip(K). float64."""
    if images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not pair")
    n = images.shape[0]
    x = images[:, 0].double()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"label values must lie in 0..{num_classes - 1} (the run's label-names)")
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).double()
    count = onehot.sum(dim=(2, 3))
    weight = (count > 0).double()
    if reference_counts is not None:
        weight = (count / reference_counts.double().clamp(min=1.0)).clamp(max=1.0)
    means = (onehot * x[:, None]).sum(dim=(2, 3)) / count.clamp(min=1.0)
    flat = (onehot * means[:, :, None, None]).sum(dim=1, keepdim=True).float()
    errors = torch.stack([((gaussian_blur(flat, torch.full((n,), s)) - images.float()) ** 2).mean(dim=(1, 2, 3))
                          for s in BLUR_GRID], dim=1)
    best = torch.tensor(BLUR_GRID, dtype=torch.float64)[errors.argmin(dim=1)]
    return torch.cat([torch.ones(n, 1, dtype=torch.float64), means * weight, weight,
                      (best / BLUR_GRID[-1])[:, None]], dim=1)


def style_reference_counts(public_label_maps: torch.Tensor, quantile: float, num_classes: int) -> torch.Tensor:
    """Per tissue class, the ``quantile`` of its pixel count over the PUBLIC label maps: the
    area above which a patient's tissue mean counts fully in the style release. Public data
    only, identical at every site, so it costs no privacy and changes no sensitivity."""
    counts = torch.nn.functional.one_hot(public_label_maps.long(), num_classes).sum(dim=(1, 2)).double()
    return torch.quantile(counts, quantile, dim=0)


def style_from_statistics(total: torch.Tensor) -> SiteStyle:
    """A SiteStyle from a (noisy) sum of ``patient_style_statistics`` rows: post-processing.

    Tissue mean k = weighted sum of per-patient means / sum of their weights; blur = mean
    per-patient best blur. Noisy counts are floored at 1, means clamped to [-1, 1],
    the blur to the grid's range. K is read off the length (2K+2)."""
    t = [float(v) for v in total]
    k = (len(t) - 2) // 2
    if k < 1 or len(t) != style_stat_dim(k):
        raise ValueError(f"style statistics have {len(t)} entries, expected 2K+2 for K classes")
    means = tuple(min(1.0, max(-1.0, t[1 + c] / max(t[1 + k + c], 1.0))) for c in range(k))
    blur = min(BLUR_GRID[-1], max(0.0, t[-1] / max(t[0], 1.0) * BLUR_GRID[-1]))
    return SiteStyle(means, blur)


def translate(seg: nn.Module, images: torch.Tensor, source: SiteStyle, target: SiteStyle,
              carry_texture: bool = True, texture_smooth_px: float = 0.7,
              texture_detrend_px: float = 4.0) -> torch.Tensor:
    """Translate images [N,1,H,W] in [-1,1] from ``source``'s style to ``target``'s (see the
    module docstring). The input tensor is not modified.

    ``texture_smooth_px`` > 0 low-passes the carried residual (the source's scanner noise is
    not anatomy); ``texture_detrend_px`` > 0 removes its slowly varying part (the source's
    bias field)."""
    p = predict_probs(seg, images)  # [N,K,H,W]
    x = images.float()
    mass = p.sum(dim=(2, 3))  # [N,K]
    own = (p * x).sum(dim=(2, 3)) / mass.clamp(min=1e-6)
    fallback = torch.tensor(source.tissue_means).expand_as(own)
    m_src = torch.where(mass >= MIN_TISSUE_MASS, own, fallback)
    m_tgt = torch.tensor(target.tissue_means, dtype=x.dtype)
    y = (p * m_tgt[None, :, None, None]).sum(dim=1, keepdim=True)
    if carry_texture:
        residual = x - (p * m_src[:, :, None, None]).sum(dim=1, keepdim=True)
        n = residual.shape[0]
        if texture_detrend_px > 0:
            residual = residual - gaussian_blur(residual, torch.full((n,), texture_detrend_px))
        if texture_smooth_px > 0:
            residual = gaussian_blur(residual, torch.full((n,), texture_smooth_px))
        s, t = m_src[:, 1:], m_tgt[1:].expand_as(m_src[:, 1:])
        sc, tc = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
        gain = (sc * tc).sum(1) / (sc ** 2).sum(1).clamp(min=1e-6)
        y = y + gain.clamp(-3.0, 3.0)[:, None, None, None] * residual
    extra = math.sqrt(max(0.0, target.blur_px ** 2 - source.blur_px ** 2))
    if extra > 0.05:
        y = gaussian_blur(y, torch.full((y.shape[0],), extra))
    return y.clamp(-1.0, 1.0)
