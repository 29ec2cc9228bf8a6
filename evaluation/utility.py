"""Utility of labelled synthetic data: train on synthetic, test on real (TSTR).

For each site k, three tissue segmenters (the MONAI UNet of models/segmenter.py, 4
classes, same steps and settings) are trained on
  - "synthetic":      n generated pairs (G(public map, site k), that public map);
  - "real":           n real pairs of site k from ``heldout/fit`` (the coordinator's
                      evaluation data; no site trains on those subjects);
  - "real+synthetic": both sets together (2n pairs);
and each is scored on site k's real ``heldout/test`` images: Dice per tissue class
(MONAI DiceMetric via evaluation.image_metrics.dice_per_class), then the mean over CSF,
GM and WM. ``ratio`` = synthetic / real Dice per site (the acceptance bar is >= 0.8).

Privacy: the synthetic pairs are post-processing of the DP-trained generator and public
label maps (models/cddpm.py, models/dp_cgan.py), so the "synthetic" segmenter costs
nothing. The "real" baseline reads the coordinator's own held-out data, not any site's.
No model is selected on heldout/test: settings are fixed in advance.

Command line (after a run; writes <run-dir>/utility.json, which the report can read):

    .venv/bin/python -m medgen.evaluation.utility RUN_DIR [--per-site 48] [--steps 300] [--augment]

``--augment`` trains all three arms with a random bias field and noise on their training
images (the usual acquisition augmentation; tissue contrast untouched) and writes
utility-augmented.json: synthetic data then has to get a site's contrast and anatomy right,
not also reproduce each scan's bias field, which a DP generator learns last.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from medgen.atomic import atomic_write_json
from medgen.data.site_data import load_heldout, load_public_bank
from medgen.config import RunConfig
from medgen.evaluation.image_metrics import dice_per_class
from medgen.models.registry import build_recipe
from medgen.models.segmenter import SegmenterSettings, build_segmenter, fit_segmenter, image_batches
from medgen.server.checkpoint import load_checkpoint
from medgen.sim.random_contrast import acquisition_jitter

Pairs = tuple[torch.Tensor, torch.Tensor]  # (images [N,1,H,W] in [-1,1], labels [N,H,W] int64)
UTILITY_FILE = "utility.json"
ARMS = ("synthetic", "real", "real+synthetic")


@dataclass(frozen=True)
class UtilitySettings:
    """Everything that changes a TSTR number (written into utility.json)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    channels: tuple[int, ...] = (16, 32, 64)
    # every arm's training images get a random bias field and noise (sim/random_contrast.py
    # ``acquisition_jitter``): how a segmenter is trained in practice; the tissue contrast
    # (the site's style, what synthetic data must get right) is never altered
    augment: bool = False

    @property
    def result_file(self) -> str:
        return "utility-augmented.json" if self.augment else UTILITY_FILE

    def segmenter(self) -> SegmenterSettings:
        return SegmenterSettings(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                                 channels=self.channels)


def _check_pairs(name: str, pairs: Pairs) -> None:
    images, labels = pairs
    if images.dim() != 4 or images.shape[1] != 1 or labels.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"{name}: need images [N,1,H,W] and labels [N,H,W], got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if images.shape[0] < 1:
        raise ValueError(f"{name}: no pairs")


def mean_tissue_dice(net: torch.nn.Module, pairs: Pairs, batch: int = 64) -> float:
    """Mean Dice over CSF, GM, WM (background excluded) of ``net`` on ``pairs``."""
    images, labels = pairs
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(images[i:i + batch].float()).argmax(1) for i in range(0, len(images), batch)])
    scores = [v for v in dice_per_class(pred, labels).values() if not math.isnan(v)]
    return float(sum(scores) / len(scores)) if scores else float("nan")


def _jitter(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return acquisition_jitter(images, gen)


def train_and_score(train: Pairs, test: Pairs, settings: UtilitySettings, seed: int) -> float:
    net = build_segmenter(settings.segmenter(), seed=seed)
    batches = image_batches(train[0], train[1], settings.batch_size,
                            augment=_jitter if settings.augment else None)
    fit_segmenter(net, batches, settings.segmenter(), seed)
    return mean_tissue_dice(net, test)


def tstr(synth_pairs: Mapping[str, Pairs], real_pairs: Mapping[str, Pairs],
         test_sets: Mapping[str, Pairs], settings: UtilitySettings = UtilitySettings(),
         seed: int = 0) -> dict[str, Any]:
    """Dice per site for synthetic-only, real-only (same count) and real+synthetic training.

    Every mapping is keyed by site name; ``real_pairs[k]`` must hold as many pairs as
    ``synth_pairs[k]`` (the comparison is at equal data), ``test_sets[k]`` is site k's
    real test data. Returns {"dice": {arm: {site: d}}, "ratio": {site: synth/real},
    "counts": {...}, "settings": {...}, "seconds": t}.
    """
    missing = [s for s in synth_pairs if s not in real_pairs or s not in test_sets]
    if missing:
        raise ValueError(f"sites {missing} have synthetic pairs but no real pairs or test set")
    start = time.perf_counter()
    dice: dict[str, dict[str, float]] = {arm: {} for arm in ARMS}
    counts: dict[str, dict[str, int]] = {}
    for i, site in enumerate(synth_pairs):
        synth, real, test = synth_pairs[site], real_pairs[site], test_sets[site]
        for name, pairs in (("synthetic", synth), ("real", real), ("test", test)):
            _check_pairs(f"{name} pairs of site {site}", pairs)
        if len(synth[0]) != len(real[0]):
            raise ValueError(f"site {site}: {len(synth[0])} synthetic vs {len(real[0])} real pairs; "
                             "TSTR compares equal counts")
        both = (torch.cat([real[0], synth[0].to(real[0].dtype)]), torch.cat([real[1], synth[1]]))
        for arm, train in (("synthetic", synth), ("real", real), ("real+synthetic", both)):
            dice[arm][site] = train_and_score(train, test, settings, seed + 101 * i)
        counts[site] = {"synthetic": len(synth[0]), "real": len(real[0]), "test": len(test[0])}
    ratio = {s: dice["synthetic"][s] / dice["real"][s] if dice["real"][s] > 0 else float("nan")
             for s in dice["real"]}
    return {"dice": dice, "ratio": ratio, "min_ratio": min(ratio.values()), "counts": counts,
            "settings": asdict(settings), "seed": seed, "seconds": time.perf_counter() - start,
            "metric": "mean Dice over CSF/GM/WM (MONAI DiceMetric), on heldout/test"}


def synthetic_pairs(recipe: Any, model: torch.nn.Module, label_maps: torch.Tensor, site_index: int,
                    seed: int) -> Pairs:
    """(recipe.sample(model, maps, site), maps): labelled pairs in one site's style."""
    generator = torch.Generator().manual_seed(seed)
    images = recipe.sample(model, label_maps, torch.full((len(label_maps),), site_index, dtype=torch.long),
                           generator)
    return images.detach().cpu().float(), label_maps.long()


# -- after a run: checkpoint + public bank + held-out data -> utility.json -------------
def run_utility(run_dir: Path, per_site: int | None = None, settings: UtilitySettings = UtilitySettings(),
                seed: int = 0) -> dict[str, Any]:
    """TSTR for a finished run (its checkpoint and config.toml); writes run_dir/utility.json
    (utility-augmented.json with ``settings.augment``)."""
    return run_utilities(run_dir, per_site, (settings,), seed)[0]


def run_utilities(run_dir: Path, per_site: int | None, settings: Sequence[UtilitySettings],
                  seed: int = 0) -> list[dict[str, Any]]:
    """``run_utility`` for several settings on ONE set of synthetic pairs: the sampling (the
    slow part for a diffusion model) is done once; each result is written to its own file."""
    run_dir = Path(run_dir)
    config = RunConfig.from_toml(run_dir / "config.toml")
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint.pt; run the federation first")
    if not config.data_root:
        raise ValueError(f"{run_dir / 'config.toml'}: data-root is empty; cannot find the public "
                         "bank and held-out data")
    recipe = build_recipe(config)
    model = recipe.build()
    model.load_state_dict({**model.state_dict(), **checkpoint.shared_state})
    root = Path(config.data_root)
    public = load_public_bank(root / "public", config.image_size)
    fit = load_heldout(root, "fit", config.image_size)
    test = load_heldout(root, "test", config.image_size)
    start = time.perf_counter()
    synth, real, tests = {}, {}, {}
    for k, site in enumerate(config.site_names):
        n = min(per_site or len(fit[site].images), len(fit[site].images), len(public.label_maps))
        maps = public.label_maps[torch.randperm(len(public.label_maps),
                                                generator=torch.Generator().manual_seed(seed + k))[:n]]
        synth[site] = synthetic_pairs(recipe, model, maps, k, seed=seed * 7919 + k)
        real[site] = (fit[site].images[:n], fit[site].labels[:n])
        tests[site] = (test[site].images, test[site].labels)
    sampling_seconds = time.perf_counter() - start
    n_images = sum(len(p[0]) for p in synth.values())
    results = []
    for one in settings:
        result = tstr(synth, real, tests, one, seed)
        result.update({"recipe": config.recipe, "server_round": checkpoint.server_round,
                       "synthetic_images": n_images, "sampling_seconds": sampling_seconds,
                       "sampling_images_per_s": n_images / sampling_seconds,
                       "real_source": "heldout/fit", "test_source": "heldout/test",
                       "synthetic_source": "public anatomy bank label maps"})
        atomic_write_json(run_dir / one.result_file, result)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="TSTR utility of a finished run -> RUN_DIR/utility.json")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--per-site", type=int, default=None, help="pairs per site (default: all heldout/fit)")
    parser.add_argument("--steps", type=int, default=UtilitySettings.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", action="store_true",
                        help="random bias field + noise on every arm's training images "
                             "(writes utility-augmented.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run_utility(args.run_dir, args.per_site,
                         UtilitySettings(steps=args.steps, augment=args.augment), args.seed)
    print(json.dumps({k: result[k] for k in ("dice", "ratio", "min_ratio", "counts")}, indent=2))


if __name__ == "__main__":
    main()
