"""Two-stage generation's claim on the simulated federation: synthetic pairs whose label
maps come from the DP label-map GAN (stage 1) train a segmenter as well as pairs drawn on
the public bank's maps (TSTR; docs/recipes/two-stage.md).

    .venv/bin/python -m bench.two_stage          # ~5 CPU-minutes at the defaults

1. Build a brain federation (32 px, sites A,B).
2. Train two-stage (stage2-maps generated) through the product's in-process rounds at
   epsilon 10 per site (RDP): M, E, G and D all learn, E and D DP-trained jointly.
3. TSTR: a segmenter trained ONLY on synthetic pairs for site A, (a) maps from M
   (``sample_pairs``: noise alone) and (b) the same G on public-bank maps, both with the
   same trained model; Dice per tissue on site A's held-out test images (real, never used
   in training). Two ceilings: the recipe's non-private ceiling (the same run at epsilon 1e8,
   bench/common.py ``noise_free``: noise ~0, clipping kept; TSTR of both map sources) and
   the real-data ceiling (the segmenter trained on site A's real pairs).
   Each arm's segmenter is trained with ``--seg-seeds`` seeds (mean and each).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import NOISE_FREE_ARM, noise_free, write_result
from bench.redgan import train
from medgen.config import RunConfig
from medgen.data.heldout_data import load_heldout
from medgen.data.site_data import load_public_bank, load_site
from medgen.evaluation.image_metrics import dice_per_class
from medgen.models.segmenter import SegmenterSettings, predict_labels, train_on_images
from medgen.sim.config import SimConfig
from medgen.sim.federation import build_federation

NAME = "two_stage"


def class_fractions(maps: torch.Tensor, k: int) -> list[float]:
    return [round(float((maps == c).float().mean()), 4) for c in range(k)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--subjects", type=int, default=30)
    parser.add_argument("--synthetic", type=int, default=120)
    parser.add_argument("--seg-steps", type=int, default=200)
    parser.add_argument("--seg-seeds", type=int, default=2)
    parser.add_argument("--root", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-two-stage-")) / "data"
    sim = SimConfig(seed=0, sites="A,B", subjects_per_site=args.subjects, public_size=120, heldout_fit=0,
                    heldout_test=40, image_size=32)
    manifest = build_federation(sim, root, workers=1)
    site = load_site(manifest.site_dir("A"), 32)
    names = ",".join(site.schema.names)
    k = len(site.schema.names)
    config = RunConfig(recipe="two-stage", data_root=str(root), sites="A,B", label_names=names, image_size=32,
                       batch_size=8, num_rounds=args.rounds, local_steps=args.local_steps, target_epsilon=10.0,
                       accountant="rdp", eval_every=0, run_dir=str(root.parent / "run"),
                       state_root=str(root.parent / "run" / "state"), options={"stage2-maps": "generated"})
    test = load_heldout(root, "test", 32)["A"]
    public = load_public_bank(manifest.public_dir, 32).label_maps.long()
    settings = SegmenterSettings(steps=args.seg_steps, batch_size=16, channels=(8, 16, 32))

    def tstr(images: torch.Tensor, labels: torch.Tensor) -> dict:
        runs = []
        for seed in range(args.seg_seeds):
            net = train_on_images(images, labels, settings, seed=seed, num_classes=k)
            runs.append(dice_per_class(predict_labels(net, test.images), test.labels, num_classes=k))
        per_class = {names.split(",")[c]: float(np.mean([r[c] for r in runs])) for c in runs[0]}
        return {"mean_tissue_dice": float(np.mean(list(per_class.values()))), "per_class": per_class,
                "mean_tissue_dice_per_seed": [float(np.mean(list(r.values()))) for r in runs]}

    def synthetic(config: RunConfig) -> tuple:
        recipe, model, facts = train(config)
        gen = torch.Generator().manual_seed(1)
        fake_gen, maps_gen = recipe.sample_pairs(model, args.synthetic, 0, gen)
        maps_pub = public[torch.randint(0, public.shape[0], (args.synthetic,), generator=gen)]
        return facts, fake_gen.cpu(), maps_gen, recipe.sample(model, maps_pub, 0, gen).cpu(), maps_pub

    facts, fake_gen, maps_gen, fake_pub, maps_pub = synthetic(config)
    result = {"federation": sim.to_dict(), "site": "A", "real_pairs": int(site.images.shape[0]),
              "test_images": int(test.images.shape[0]), "synthetic_pairs": args.synthetic,
              "training": facts, "seg_steps": args.seg_steps, "seg_seeds": args.seg_seeds,
              "class_fractions": {"real_site_A": class_fractions(site.labels, k), "public": class_fractions(public, k),
                                  "stage1_generated": class_fractions(maps_gen, k)},
              "command": "python -m bench.two_stage " + " ".join(sys.argv[1:] if argv is None else argv),
              "arms": {}}
    result["arms"]["tstr_generated_maps"] = tstr(fake_gen, maps_gen)
    print("generated", result["arms"]["tstr_generated_maps"], flush=True)
    result["arms"]["tstr_public_maps"] = tstr(fake_pub, maps_pub)
    print("public", result["arms"]["tstr_public_maps"], flush=True)
    ceiling = noise_free(config.replace(run_dir=str(root.parent / "ceiling"),
                                        state_root=str(root.parent / "ceiling" / "state")))
    facts_c, fake_gen, maps_gen, fake_pub, maps_pub = synthetic(ceiling)
    result["arms"][NOISE_FREE_ARM] = {
        "training": facts_c, "class_fraction_stage1_generated": class_fractions(maps_gen, k),
        "tstr_generated_maps": tstr(fake_gen, maps_gen), "tstr_public_maps": tstr(fake_pub, maps_pub)}
    print(NOISE_FREE_ARM, result["arms"][NOISE_FREE_ARM], flush=True)
    result["arms"]["real_ceiling_non_private"] = tstr(site.images, site.labels)
    print(result["arms"])
    write_result(NAME, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
