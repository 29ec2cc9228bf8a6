"""Ground-truth scores of cross-site translation for any label schema, CT targets in HU.

evaluation/translation.py scores the brain federation (its segmenters and Dice use the run
config's default brain schema). This module scores any paired held-out federation
(data/heldout_data.py: row i of every site is the same subject) with the schema passed in,
so the head-CT federation (7 classes, CT sites in HU, the MR site M) is scored the same
way as the brain. Per ordered pair (source -> target) and translator, on ``heldout/test``:

- ``ssim``, ``psnr``, ``mae``: inside the head/brain box (medgen.sim.brain_box: labels > 0
  dilated) against the target site's noise-free rendering of the same subject, on the
  [-1, 1] scale (data range 2);
- ``mae_hu`` (targets whose intensity policy is a fixed HU window, i.e. CT sites): mean
  absolute error in Hounsfield units inside the head (labels > 0, no dilation), after
  mapping both images back through the window (medgen.data.intensity.WindowMap.inverse);
- ``dice``: mean foreground Dice of a segmenter trained on the TARGET site's real
  ``heldout/fit`` images (an untranslated image scores low on it), and ``dice_fraction``:
  that Dice over the same segmenter's Dice on the real target scans.

A translator is ``f(images [N,1,H,W] in [-1,1], source, target) -> images`` (as in
evaluation/translation.py, whose ``classical_baselines`` it takes unchanged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from medgen.data.intensity import WindowMap
from medgen.data.manifest import load_manifest
from medgen.evaluation.image_metrics import dice_per_class, mae, psnr, ssim
from medgen.models.segmenter import SegmenterSettings, predict_labels, train_on_images
from medgen.sim.brain_box import brain_box

DATA_RANGE = 2.0
Translator = Callable[[torch.Tensor, str, str], torch.Tensor]


def hu_windows(data_root: str | Path, sites: list[str]) -> dict[str, WindowMap | None]:
    """Each held-out site's HU window (a CT site) or None (percentile-normalised, e.g. MR)."""
    root = Path(data_root)
    out = {}
    for site in sites:
        policy = load_manifest(root / "heldout" / "test" / site, root=root).intensity
        out[site] = (WindowMap(*policy.window, units=policy.units)
                     if policy.normalisation == "window" and policy.units == "HU" else None)
    return out


def target_segmenters(fit: Mapping[str, Any], num_classes: int, settings: SegmenterSettings,
                      seed: int = 0) -> dict[str, torch.nn.Module]:
    """One segmenter per site on that site's REAL ``heldout/fit`` images, with the schema."""
    return {site: train_on_images(h.images, h.labels, settings, seed=seed + 17 * k, num_classes=num_classes)
            for k, (site, h) in enumerate(sorted(fit.items()))}


def foreground_dice(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> float:
    scores = [v for v in dice_per_class(pred, truth, num_classes=num_classes).values() if not np.isnan(v)]
    return float(np.mean(scores)) if scores else float("nan")


def score(translated: torch.Tensor, target: Any, segmenter: torch.nn.Module | None, num_classes: int,
          window: WindowMap | None, reference_dice: float | None) -> dict[str, float]:
    """Scores of translated images [N,1,H,W] against the target's clean renderings."""
    if translated.shape != target.clean.shape or not torch.isfinite(translated).all():
        raise ValueError(f"translated images must be finite, shape {tuple(target.clean.shape)}; got "
                         f"{tuple(translated.shape)}")
    box = torch.from_numpy(brain_box(target.labels.numpy().astype(np.int64)))
    out = {"ssim": ssim(translated, target.clean, DATA_RANGE, box),
           "psnr": psnr(translated, target.clean, DATA_RANGE, box),
           "mae": mae(translated, target.clean, box), "n": int(translated.shape[0])}
    if window is not None:
        head = (target.labels > 0).numpy()[:, None]
        error = np.abs(window.inverse(translated.numpy()) - window.inverse(target.clean.numpy()))
        out["mae_hu"] = float(error[head].mean())
    if segmenter is not None:
        out["dice"] = foreground_dice(predict_labels(segmenter, translated.clamp(-1, 1)), target.labels, num_classes)
        out["dice_fraction"] = out["dice"] / reference_dice if reference_dice else float("nan")
    return out


def evaluate_pairs(test: Mapping[str, Any], translators: Mapping[str, Translator],
                   segmenters: Mapping[str, torch.nn.Module], num_classes: int,
                   windows: Mapping[str, WindowMap | None], pairs: list[tuple[str, str]] | None = None) -> dict:
    """{"pairs": {"A->B": {method: scores}}, "reference_dice": {site: Dice on real}, "n": N}."""
    sites = sorted(test)
    pairs = pairs or [(s, t) for s in sites for t in sites if s != t]
    for s, t in pairs:
        if test[s].subjects != test[t].subjects:
            raise ValueError(f"held-out sites {s} and {t} do not hold the same subjects in the same order; "
                             "paired evaluation needs heldout/<split>/<site> of one build")
    reference = {t: foreground_dice(predict_labels(segmenters[t], test[t].images), test[t].labels, num_classes)
                 for t in sorted({t for _, t in pairs}) if t in segmenters}
    table = {f"{s}->{t}": {name: score(fn(test[s].images.clone(), s, t).float(), test[t], segmenters.get(t),
                                       num_classes, windows.get(t), reference.get(t))
                           for name, fn in translators.items()}
             for s, t in pairs}
    return {"pairs": table, "reference_dice": reference, "n": int(test[sites[0]].images.shape[0])}
