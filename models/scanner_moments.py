"""The scanner-moment release: one Gaussian mechanism per site on per-patient tissue statistics.

A site's scanner is, to first order, a handful of numbers: per tissue class the mean and
the spread of its intensity, plus how sharp and how noisy the image is
(``blocks.tissue_statistics``). Under DP-SGD a network learns these only slowly, through
noisy gradients; released once, directly, they cost little budget and are exact up to the
noise. Recipes use the release as a target (dp-cgan pulls G toward it) or as a starting
point (cddpm initialises its tissue prior from it): post-processing of a DP output.

Privacy: one row per patient, v_i = [1, mean_k a_k, sd_k a_k, a_k (k = the schema's
K classes), sharpness, noise] computed from ONE slice of patient i alone (a_k = class k present).
For images in [-1, 1] every entry is in [0, 1] or [-1, 1] except the two texture terms,
and ``PrivateTraining.gaussian_release`` clips each row to MOMENT_CLIP, so adding or
removing a patient moves the sum by at most MOMENT_CLIP. It adds N(0, (sigma *
MOMENT_CLIP)^2 I) and records the accountant entry (sigma, 1.0, 1), which the recipe
declares in ``one_off_releases`` so the DP-SGD noise is calibrated for the composition.
The release happens once per site (``Recipe.release_once``); later rounds and restarts reuse
it at no cost.
"""

from __future__ import annotations

import torch

from medgen.models.blocks import one_hot_labels, tissue_statistics

# scans' rows have norm about sqrt(1 + 4 + 4 * 0.1 + 4 + ...) < 4 for the brain's 4 classes and
# are never clipped; an extreme image (a +-1 checkerboard has noise 8) is clipped, so the
# sensitivity is MOMENT_CLIP regardless of the class count
MOMENT_CLIP = 4.0


def moment_dim(num_classes: int) -> int:
    """Length of the released per-patient vector: [1, mean_k a_k (K), sd_k a_k (K), a_k (K),
    sharpness, noise] for K = ``num_classes``."""
    return 1 + 3 * num_classes + 2


def stat_dim(num_classes: int) -> int:
    """Length of tissue_statistics' layout (what a release's moments are): 2K + 2."""
    return 2 * num_classes + 2


def patient_moments(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One release row per image [N,1,H,W] with its label map [N,H,W] (one image per patient)."""
    onehot = one_hot_labels(labels, num_classes)
    stats = tissue_statistics(images.float(), onehot)
    present = (onehot.sum(dim=(2, 3)) > 0).to(stats.dtype)
    k = num_classes
    return torch.cat([torch.ones_like(stats[:, :1]), stats[:, :k] * present,
                      stats[:, k:2 * k] * present, present, stats[:, 2 * k:]], dim=1)


def moments_from_release(noisy_sum: torch.Tensor) -> torch.Tensor:
    """Target statistics [2K+2] (tissue_statistics' layout) from a noisy sum of
    ``patient_moments`` rows [3K+3]: post-processing. Counts are floored at 1, values clamped
    to their ranges. K is read off the row's length."""
    k = (noisy_sum.shape[-1] - 3) // 3
    if moment_dim(k) != noisy_sum.shape[-1]:
        raise ValueError(f"a moment release has 3K+3 entries; got {noisy_sum.shape[-1]}")
    total = noisy_sum.float()
    count = total[1 + 2 * k:1 + 3 * k].clamp(min=1.0)
    patients = total[0].clamp(min=1.0)
    return torch.cat([(total[1:1 + k] / count).clamp(-1.0, 1.0),
                      (total[1 + k:1 + 2 * k] / count).clamp(0.0, 1.0),
                      (total[1 + 3 * k:] / patients).clamp(min=0.0)])
