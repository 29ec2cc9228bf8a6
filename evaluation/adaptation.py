"""Downstream domain adaptation: does translation help a segmenter trained at one site?

A MONAI UNet tissue segmenter (models/segmenter.py) is trained on the labelled images of
one source site (site A's training folder) and tested, by mean tissue Dice (CSF, GM, WM),
on ``heldout/test`` of every site, under these conditions:

- ``no-adaptation``: the source segmenter on the real target images;
- ``translated-inputs``: the same segmenter on target images translated target -> source
  (the hospital translates its own scans locally, then segments them);
- ``translated-training``: per target site, a segmenter trained on the source's labelled
  images translated source -> target (the source's labels kept: structure is preserved by
  construction), tested on the target's real images; ``translated-training+jitter`` adds a
  random bias field and noise to those training images (sim/random_contrast.py
  ``acquisition_jitter``: the usual acquisition augmentation, tissue contrast untouched),
  since a translation carries the source scan's own bias field, not the target's;
- ``augmentation-only``: a segmenter trained on the source images under heavy,
  label-free intensity augmentation (a random intensity curve, possible inversion, gamma,
  bias field, blur and noise), no translation;
- ``in-domain``: a segmenter trained on the target site's own labelled training images
  (the ceiling adaptation tries to reach);
- optionally ``contrast-agnostic``: the bridge's S itself (public data only).

``recovery`` per site = (adapted - none) / (in-domain - none): the fraction of the domain
gap closed (the acceptance asks >= 0.5 on C and D, and adapted > augmentation-only).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from medgen.evaluation.translation import mean_tissue_dice
from medgen.models.segmenter import SegmenterSettings, predict_labels, train_on_images
from medgen.sim.random_contrast import acquisition_jitter, gaussian_blur

Translate = Callable[[torch.Tensor, str, str], torch.Tensor]


def heavy_intensity_augmentation(images: torch.Tensor, labels: torch.Tensor,
                                 gen: torch.Generator) -> torch.Tensor:
    """Label-free intensity augmentation of images [B,1,H,W] in [-1,1] (labels unused)."""
    n = images.shape[0]
    x = (images.float() + 1) / 2  # [0, 1]
    # a random smooth intensity curve through 6 knots: monotone or not (contrast flips)
    knots = torch.rand(n, 6, generator=gen)
    knots[:, 0] = 0.1 * torch.rand(n, generator=gen)  # background stays dark
    index = (x.clamp(0, 1) * 5).clamp(max=4.999)
    lo = index.floor().long()
    frac = index - lo
    k = knots[:, None, None, None, :].expand(*x.shape, 6)
    y = torch.gather(k, -1, lo[..., None])[..., 0] * (1 - frac) + torch.gather(k, -1, (lo + 1)[..., None])[..., 0] * frac
    gamma = torch.exp(0.5 * torch.randn(n, generator=gen))[:, None, None, None]
    y = y.clamp(min=1e-4) ** gamma
    bias = 0.3 * (torch.rand(n, generator=gen) * 2 - 1)[:, None, None, None]
    field = F.interpolate(torch.randn(n, 1, 3, 3, generator=gen), size=x.shape[-2:], mode="bicubic",
                          align_corners=True)
    y = y * torch.exp(bias * field)
    y = gaussian_blur(y, 1.2 * torch.rand(n, generator=gen))
    y = y + 0.05 * torch.rand(n, generator=gen)[:, None, None, None] * torch.randn(y.shape, generator=gen)
    lo_q = torch.quantile(y.flatten(1), 0.005, dim=1)[:, None, None, None]
    hi_q = torch.quantile(y.flatten(1), 0.995, dim=1)[:, None, None, None]
    return ((y - lo_q) / (hi_q - lo_q).clamp(min=1e-6)).clamp(0, 1) * 2 - 1


def _jitter(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return acquisition_jitter(images, gen)


def dice_by_site(segmenter: torch.nn.Module, test: Mapping[str, Any],
                 transform: Callable[[torch.Tensor, str], torch.Tensor] | None = None) -> dict[str, float]:
    out = {}
    for site, h in sorted(test.items()):
        images = transform(h.images.clone(), site) if transform is not None else h.images
        out[site] = mean_tissue_dice(predict_labels(segmenter, images), h.labels)
    return out


def evaluate_adaptation(source: str, train_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                        test: Mapping[str, Any], translate: Translate | None, settings=None,
                        seed: int = 0, contrast_agnostic: torch.nn.Module | None = None) -> dict[str, Any]:
    """Dice per condition and site; ``train_sets``: site -> (images [N,1,H,W], labels [N,H,W])
    of that site's labelled TRAINING images (``source`` must be among them)."""
    if source not in train_sets:
        raise ValueError(f"no training images for source site {source}; have {sorted(train_sets)}")
    settings = settings or SegmenterSettings(steps=400, channels=(8, 16, 32, 64))
    images, labels = train_sets[source]
    base = train_on_images(images, labels, settings, seed)
    augmented = train_on_images(images, labels, settings, seed, augment=heavy_intensity_augmentation)
    results: dict[str, dict[str, float]] = {
        "no-adaptation": dice_by_site(base, test),
        "augmentation-only": dice_by_site(augmented, test)}
    if translate is not None:
        results["translated-inputs"] = dice_by_site(
            base, test, lambda x, site: x if site == source else translate(x, site, source))
        plain, jittered = {source: results["no-adaptation"][source]}, {}
        for k, site in enumerate(sorted(test)):
            if site == source:
                continue
            moved = translate(images.clone(), source, site)
            net = train_on_images(moved, labels, settings, seed + 17 * (k + 1))
            plain[site] = dice_by_site(net, {site: test[site]})[site]
            net = train_on_images(moved, labels, settings, seed + 17 * (k + 1), augment=_jitter)
            jittered[site] = dice_by_site(net, {site: test[site]})[site]
        jittered[source] = dice_by_site(
            train_on_images(images, labels, settings, seed, augment=_jitter), {source: test[source]})[source]
        results["translated-training"] = plain
        results["translated-training+jitter"] = jittered
    if contrast_agnostic is not None:
        results["contrast-agnostic"] = dice_by_site(contrast_agnostic, test)
    in_domain = {}
    for k, (site, (x, y)) in enumerate(sorted(train_sets.items())):
        net = base if site == source else train_on_images(x, y, settings, seed + 31 * (k + 1))
        in_domain[site] = dice_by_site(net, {site: test[site]})[site]
    results["in-domain"] = in_domain
    return {"source": source, "dice": results, "recovery": recovery(results),
            "n_test": {s: int(h.images.shape[0]) for s, h in test.items()},
            "n_train": {s: int(v[0].shape[0]) for s, v in train_sets.items()},
            "settings": {"steps": settings.steps, "channels": list(settings.channels), "seed": seed}}


def recovery(results: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """(condition - none) / (in-domain - none) per site, for every adapted condition."""
    none, ceiling = results["no-adaptation"], results["in-domain"]
    out: dict[str, dict[str, float]] = {}
    for condition, row in results.items():
        if condition in ("no-adaptation", "in-domain"):
            continue
        out[condition] = {site: (row[site] - none[site]) / (ceiling[site] - none[site])
                          for site in row if site in ceiling and abs(ceiling[site] - none[site]) > 1e-6}
    return out
