"""unistable's claim (survey [7]): high-contrast synthetic images improve tissue segmentation.

    .venv/bin/python -m bench.unistable          # ~5 CPU-minutes at the defaults

1. Build a brain federation (every brain site A-D, 32 px) with ``medgen sim build``'s
   builder; only its public bank and its held-out test images are used.
2. Pretrain S with ``medgen pretrain-segmenter``'s ``pretrain`` twice per seed, the same
   steps, seeds and architecture: plain (random-contrast renderings only) and with
   ``--high-contrast F`` (a fraction F of each batch high-contrast). Public data only:
   epsilon 0 for both arms.
3. Dice per tissue of each S on every site's held-out REAL test images (never trained on).

The non-private ceiling: both arms are public-only (epsilon 0), so the recipe's noise-free
version is the recipe itself. The ceiling recorded (arm ``real_pairs_non_private``) is what
privacy forbids: S trained with the same settings, steps and seeds on the sites' REAL
(image, label) pairs pooled centrally (``--subjects`` per site; no DP, no federation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import write_result
from medgen.data.heldout_data import load_heldout
from medgen.data.site_data import load_site
from medgen.evaluation.image_metrics import dice_per_class
from medgen.models.segmenter import SegmenterSettings, build_segmenter, predict_labels, train_on_images
from medgen.models.segmenter_pretrain import pretrain
from medgen.sim.config import SimConfig
from medgen.sim.federation import build_federation

NAME = "unistable"
CEILING = "real_pairs_non_private"  # S on the sites' pooled real pairs (module docstring)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=20)
    parser.add_argument("--subjects", type=int, default=24, help="real pairs per site for the ceiling arm")
    parser.add_argument("--root", default="")
    parser.add_argument("--name", default=NAME, help="bench/results/NAME.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = args.image_size
    work = Path(args.root or tempfile.mkdtemp(prefix="bench-unistable-"))
    sim = SimConfig(seed=0, sites="A,B,C,D", subjects_per_site=args.subjects, public_size=120, heldout_fit=0,
                    heldout_test=args.heldout, image_size=size)
    manifest = build_federation(sim, work / "data", workers=1)
    test = load_heldout(work / "data", "test", size)
    settings = SegmenterSettings(steps=args.steps, batch_size=16, channels=(8, 16, 32))
    arms = {"plain": 0.0, "high_contrast": args.fraction, CEILING: None}
    real = [load_site(manifest.site_dir(s), size) for s in sim.site_names]
    real_images, real_labels = torch.cat([r.images for r in real]), torch.cat([r.labels for r in real]).long()
    result = {"federation": sim.to_dict(), "settings": {"steps": args.steps, "batch_size": 16,
              "channels": [8, 16, 32], "fraction": args.fraction, "seeds": args.seeds},
              "test_images_per_site": {s: int(h.images.shape[0]) for s, h in test.items()},
              "epsilon": 0.0, "real_pairs_for_ceiling": int(real_images.shape[0]), "command": "python -m bench.unistable " + " ".join(sys.argv[1:] if argv is None else argv),
              "arms": {}}
    for arm, fraction in arms.items():
        runs, seconds = [], []
        for seed in range(args.seeds):
            if fraction is None:  # the ceiling: the same S trained on real pairs, no privacy
                start = time.process_time()
                net = train_on_images(real_images, real_labels, settings, seed=seed, num_classes=k).eval()
                seconds.append(time.process_time() - start)
            else:
                out = work / f"{arm}-{seed}.pt"
                record = pretrain(manifest.public_dir, out, args.steps, size, seed=seed, high_contrast=fraction,
                                  settings=settings)
                seconds.append(record["seconds"])
                k = len(record["label_names"]) if record["label_names"] else None
                net = build_segmenter(settings, num_classes=k)
                net.load_state_dict(torch.load(out, weights_only=True))
                net.eval()
            per_site = {}
            for site, held in test.items():
                dice = dice_per_class(predict_labels(net, held.images), held.labels, num_classes=k)
                per_site[site] = {str(c): round(float(v), 4) for c, v in dice.items()}
            runs.append(per_site)
            print(arm, seed, {s: round(float(np.mean(list(d.values()))), 3) for s, d in per_site.items()}, flush=True)
        sites = list(test)
        mean_site = {s: round(float(np.mean([np.mean(list(r[s].values())) for r in runs])), 4) for s in sites}
        result["arms"][arm] = {
            "high_contrast": fraction, "mean_tissue_dice_per_site": mean_site,
            "mean_tissue_dice": round(float(np.mean(list(mean_site.values()))), 4),
            "mean_tissue_dice_per_seed": [round(float(np.mean([np.mean(list(r[s].values())) for s in sites])), 4)
                                          for r in runs],
            "per_seed_per_site_per_class": runs, "train_seconds": [round(s, 1) for s in seconds]}
    result["gain"] = round(result["arms"]["high_contrast"]["mean_tissue_dice"]
                           - result["arms"]["plain"]["mean_tissue_dice"], 4)
    print({a: r["mean_tissue_dice"] for a, r in result["arms"].items()}, "gain", result["gain"])
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
