"""Degradations of REAL images: the failures a generator can plausibly produce.

The metric sanity suite (bench/metric_sanity.py, tests/evaluation/test_metric_sanity.py)
applies each to the conditioning half of real held-out images and requires every headline
metric to score the result outside the real-vs-real floor's interval. Each one is a
failure seen in, or expected of, the recipes here, at a severity a reader notices side
by side but that is not absurd:

    blur            Gaussian, sigma 1 px (3 mm at 64 px over a 200 mm field): the
                    over-smoothed look of a generator trained with a pixel loss or DP noise
    noise           additive Gaussian, sigma 0.06 of the [-1, 1] range (3 %): grainy output
    texture_removal every label region replaced by its mean intensity: right contrast and
                    anatomy, no texture, no noise ("cartoon" images)
    bias_field      one smooth multiplicative field, +-20 % across the field of view, on
                    every image: a learned shading (MR bias field; for CT, cupping-like)
    intensity_remap gamma 0.7 on the [0, 1] intensity: tissue contrast subtly wrong
    collapse_one    every image replaced by the first: total mode collapse
    collapse_few    four images, repeated: partial mode collapse
    duplicates      every second image a copy of the one before: half the samples repeat
    wrong_site      another site's image of the same subject: right anatomy, wrong scanner
                    style (chosen by the caller: the most similar other site is the hard case)

Images are [N,1,H,W] in [-1, 1], labels [N,H,W]; each function returns new tensors
(images, labels). Labels always stay the *conditioning* maps of the rows, as for a
generated set, whose only label maps are the ones it was asked to render: a collapsed
or duplicating conditional generator returns an image of other anatomy for a map, and a
per-tissue metric is entitled to see that.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

Degradation = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]
BLUR_SIGMA_PX = 1.0
NOISE_SIGMA = 0.06
BIAS_AMPLITUDE = 0.2
REMAP_GAMMA = 0.7
FEW_IMAGES = 4


def blur(images, labels, rng, sigma: float = BLUR_SIGMA_PX):
    array = gaussian_filter(images.double().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest")
    return torch.from_numpy(array).to(images.dtype), labels


def noise(images, labels, rng, sigma: float = NOISE_SIGMA):
    added = torch.from_numpy(rng.normal(0.0, sigma, images.shape)).to(images.dtype)
    return (images + added).clamp(-1, 1), labels


def texture_removal(images, labels, rng):
    out = images.clone()
    for n in range(len(images)):
        for c in labels[n].unique():
            region = labels[n] == c
            out[n, 0][region] = images[n, 0][region].mean()
    return out, labels


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images + 1) / 2


def _signed(unit: torch.Tensor) -> torch.Tensor:
    return (unit * 2 - 1).clamp(-1, 1)


def bias_field(images, labels, rng, amplitude: float = BIAS_AMPLITUDE):
    """Multiplies the [0, 1] intensity by ONE smooth field (ramp plus bowl, range +-amplitude).

    One field for every image: a generator that learned a shading draws it everywhere,
    while real scans carry a different random field each (the simulated sites already
    do, up to +-35 %), so random per-image fields would be no failure at all.
    """
    _, _, h, w = images.shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    angle = rng.uniform(0, 2 * np.pi)
    log_field = np.cos(angle) * xx + np.sin(angle) * yy + 0.5 * ((xx ** 2 + yy ** 2) / 2 - 0.5)
    log_field = log_field / np.abs(log_field).max() * np.log1p(amplitude)
    field = torch.from_numpy(np.exp(log_field)[None, None]).to(images.dtype)
    return _signed(_unit(images) * field), labels


def intensity_remap(images, labels, rng, gamma: float = REMAP_GAMMA):
    return _signed(_unit(images).clamp(0, 1) ** gamma), labels


def collapse_one(images, labels, rng):
    return images[:1].repeat(len(images), 1, 1, 1), labels


def collapse_few(images, labels, rng, distinct: int = FEW_IMAGES):
    return images[torch.arange(len(images)) % distinct].clone(), labels


def duplicates(images, labels, rng):
    """Every odd row a copy of the row before it: half the samples are repeats."""
    return images[torch.arange(len(images)) // 2 * 2].clone(), labels


DEGRADATIONS: dict[str, Degradation] = {
    "blur": blur, "noise": noise, "texture_removal": texture_removal, "bias_field": bias_field,
    "intensity_remap": intensity_remap, "collapse_one": collapse_one,
    "collapse_few": collapse_few, "duplicates": duplicates,
}
"""Degradations of one set alone; ``wrong_site`` needs another site's paired images."""


def most_similar_site(site: str, paired_images: dict[str, torch.Tensor]) -> str:
    """The other site whose images of the same subjects differ least (mean absolute
    difference): the hardest wrong-style test."""
    others = [s for s in paired_images if s != site]
    if not others:
        raise ValueError("a wrong-site degradation needs at least two sites")
    return min(others, key=lambda s: float((paired_images[s] - paired_images[site]).abs().mean()))
