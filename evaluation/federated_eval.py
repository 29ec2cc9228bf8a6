"""Federated evaluation at a site: the headline metric (tissue_bands) against the site's own
held-out patients, released under DP, so only noisy scalars leave the hospital.

The site's evaluation patients (data/eval_split.py: reserved by a keyed hash, never
trained on) form two halves. Half A's label maps condition the public global generator;
half B's real images are the reference. Per patient, a histogram on ``FED_BINS`` bins of
each (band, class) cell (the two bands of evaluation/tissue_intensity.py: intensity and the
finest Laplacian band), pooled over the patient's slices and normalised to mass 1:

    patient in A: [ real_A = its real images,  gen_A = G(its maps, site),  0 ]
    patient in B: [ 0,                          0,                          real_B ]

Each block is [2 bands, K classes, FED_BINS]; every cell is scaled by 1/sqrt(4K).

Privacy argument (the unit is the patient, as in training):

1. Each row is a function of ONE patient's record (its images and label maps) and of
   public things only (the global generator, which is itself a DP output, the site id and
   a seed). A patient's row has at most 4K non-empty cells, each of L2 norm <= its L1 norm
   = 1/sqrt(4K), so its L2 norm is <= 1 = ``CLIP_NORM``; the release clips to it anyway.
2. The site releases sum(rows) + N(0, (sigma C)^2 I) once per evaluation
   (privacy/eval_release.py): adding or removing one patient moves the sum by at most C in
   L2, so this is the Gaussian mechanism at noise multiplier sigma = ``federated-eval-
   noise``, the accountant entry (sigma, 1.0, 1) in the site's ledger, composed with its
   DP-SGD history by the same accountant (PRV or RDP, named) and planned into its budget.
3. Halves A and B are disjoint, and their blocks are disjoint coordinates of ONE vector:
   the floor (real A vs real B) comes with the metric in the same release, at no extra
   cost (a patient touches one half only; the sensitivity above already covers it).
4. Everything reported (``scalars``: tissue_bands of gen_A vs real_B, its floor real_A vs
   real_B, and their spread under fresh noise of the same sigma) is computed from the noisy
   sum and the public sigma only: post-processing, no further cost.
5. Evaluation patients never enter training (data/eval_split.py), so a distance to them
   cannot reward memorisation; and nothing but the scalars, epsilon, delta and the site
   index leaves the node (no counts: the noisy masses already estimate them).

Differences from the offline tissue_bands (evaluation/tissue_intensity.py): ``FED_BINS``
coarse bins instead of 512, one region instead of 3 x 3, and every patient weighted
equally per cell instead of by pixel count. Each keeps the noise per bin small against a
cell's mass; docs/evaluation.md gives the noise this leaves at a given site size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medgen.data.site_data import SiteData
from medgen.evaluation.laplacian_swd import laplacian_pyramid
from medgen.evaluation.tissue_intensity import BAND_RANGES, histogram_w1

FED_BINS = 32
CLIP_NORM = 1.0
BLOCKS = ("real_a", "gen_a", "real_b")
MAX_SLICES = 16          # per patient: generating a whole volume's slices buys little
SPREAD_REPLICATES = 200  # fresh-noise replicates for the reported spread


def block_shape(num_classes: int) -> tuple[int, int, int]:
    return (len(BAND_RANGES), num_classes, FED_BINS)


def patient_histogram(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """[2, K, FED_BINS]: per (band, class) the pixels' histogram, normalised to mass 1
    (all-zero where the patient has no pixel of that class)."""
    images = images.detach().to("cpu", torch.float64).clamp(-1, 1)
    classes = labels.detach().cpu().numpy().astype(np.int64).ravel()
    bands = (images[:, 0].numpy().ravel(), laplacian_pyramid(images)[0][:, 0].numpy().ravel())
    out = np.zeros(block_shape(num_classes))
    for k, (values, (low, high)) in enumerate(zip(bands, BAND_RANGES)):
        bins = np.clip(((values - low) / (high - low) * FED_BINS).astype(np.int64), 0, FED_BINS - 1)
        out[k] = np.bincount(classes * FED_BINS + bins, minlength=num_classes * FED_BINS
                             ).reshape(num_classes, FED_BINS)
    totals = out.sum(axis=-1, keepdims=True)
    return np.divide(out, totals, out=np.zeros_like(out), where=totals > 0)


def _slices(data: SiteData, patient: int) -> torch.Tensor:
    rows = torch.nonzero(data.patient_index == patient).flatten()
    if len(rows) > MAX_SLICES:  # evenly spaced, deterministic
        rows = rows[torch.linspace(0, len(rows) - 1, MAX_SLICES).round().long()]
    return rows


def patient_vectors(recipe, model: torch.nn.Module, half_a: SiteData, half_b: SiteData,
                    site_index: int, num_classes: int, seed: int) -> torch.Tensor:
    """One row per evaluation patient (A then B), [n_a + n_b, 3 x 2 x K x FED_BINS]."""
    for name, half in (("A", half_a), ("B", half_b)):
        if half.labels is None or half.num_patients < 1:
            raise ValueError(f"federated evaluation needs labelled patients in half {name}")
    scale = 1.0 / math.sqrt(2 * len(BAND_RANGES) * num_classes)
    generator = torch.Generator().manual_seed(int(seed))
    rows = []
    for patient in range(half_a.num_patients):
        index = _slices(half_a, patient)
        maps = half_a.labels[index]
        with recipe.inference(model) as device:
            sites = recipe.site_ids(site_index, len(maps)).to(device)
            generated = recipe.sample(model, maps.to(device), sites, generator=_on(generator, device))
        generated = torch.nan_to_num(generated.detach().cpu().float(), nan=0.0).clamp(-1, 1)
        rows.append(np.stack([patient_histogram(half_a.images[index], maps, num_classes),
                              patient_histogram(generated, maps, num_classes),
                              np.zeros(block_shape(num_classes))]))
    for patient in range(half_b.num_patients):
        index = _slices(half_b, patient)
        zero = np.zeros(block_shape(num_classes))
        rows.append(np.stack([zero, zero, patient_histogram(half_b.images[index], half_b.labels[index],
                                                             num_classes)]))
    return torch.from_numpy(np.stack(rows).reshape(len(rows), -1) * scale)


def _on(generator: torch.Generator, device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def tissue_bands_of(blocks: np.ndarray) -> tuple[float, float]:
    """(tissue_bands of gen_A vs real_B, floor real_A vs real_B) from pooled blocks
    [3, 2, K, FED_BINS]; negative (noisy) bins count as empty."""
    pooled = np.clip(blocks, 0.0, None)
    real_a, gen_a, real_b = pooled
    widths = [(high - low) / FED_BINS for low, high in BAND_RANGES]
    centres = [low + (np.arange(FED_BINS) + 0.5) * w for (low, _), w in zip(BAND_RANGES, widths)]

    def bands(candidate: np.ndarray) -> float:
        per_band = []
        for k, width in enumerate(widths):
            w1 = histogram_w1(candidate[k], real_b[k], width)
            weights = real_b[k].sum(axis=0)
            total = weights.sum()
            if not np.isfinite(w1).any() or total <= 0:
                return float("nan")
            mean = weights @ centres[k] / total
            sd = float(np.sqrt(weights @ (centres[k] - mean) ** 2 / total)) or 1.0
            per_band.append(float(np.nanmean(w1)) / sd)
        return float(np.mean(per_band))

    return bands(gen_a), bands(real_a)


def scalars(values: torch.Tensor, num_classes: int, noise_multiplier: float, seed: int) -> dict[str, float]:
    """The reported numbers, from the released noisy sum alone (privacy argument, point 4)."""
    blocks = values.detach().cpu().numpy().reshape(len(BLOCKS), *block_shape(num_classes))
    value, floor = tissue_bands_of(blocks)
    rng = np.random.default_rng(seed)
    # spread: the statistic recomputed under fresh noise of the release's std (sigma x C)
    replicates = np.array([tissue_bands_of(blocks + rng.normal(0.0, noise_multiplier * CLIP_NORM,
                                                                blocks.shape))
                           for _ in range(SPREAD_REPLICATES)])
    return {"fed-tissue-bands": value, "fed-tissue-bands-floor": floor,
            "fed-tissue-bands-sd": float(np.nanstd(replicates[:, 0])),
            "fed-tissue-bands-floor-sd": float(np.nanstd(replicates[:, 1])),
            "fed-noise-multiplier": float(noise_multiplier)}
