"""Red-GAN's claim on the simulated federation: rebalancing a rare class (lesion) with
synthetic pairs improves that class's Dice (docs/recipes/red-gan.md).

    .venv/bin/python -m bench.redgan            # ~10 CPU-minutes at the defaults

1. Build a brain federation with lesions (32 px, sites A,B, --lesion-rate 0.2, lesions
   25-45 mm across: 4-7 pixels at 6.25 mm/pixel, so the rare class is measurable at this
   size; 80 held-out test images at site A).
2. Train red-gan (and the ablation, seg-weight 0 = dp-cgan) through the product's
   in-process rounds at epsilon 10 per site (RDP), rare-class lesion; and red-gan's
   non-private ceiling: the same run at epsilon 1e8 (bench/common.py ``noise_free``: noise
   multiplier ~5e-4, per-patient clipping kept; each arm records its ledgers' plans).
3. A downstream segmenter trained on site A's real pairs, against one trained on them plus
   synthetic pairs G(lesion-holding public maps, site A); lesion Dice on site A's held-out
   test images (real, never used in training or selection), pooled over the test set;
   each arm's downstream segmenter is trained with ``--seg-seeds`` seeds (mean and each).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import NOISE_FREE_ARM, noise_free, privacy_record, write_result
from medgen.client.simulated_site import simulated_sites
from medgen.config import RunConfig
from medgen.data.heldout_data import load_heldout
from medgen.data.site_data import load_public_bank, load_site
from medgen.models.registry import build_recipe
from medgen.models.segmenter import SegmenterSettings, predict_labels, train_on_images
from medgen.privacy.site_update import specs_of
from medgen.server.aggregation import AggregationPipeline
from medgen.server.inprocess import InProcessRunner
from medgen.sim.config import SimConfig
from medgen.sim.federation import build_federation

NAME = "redgan"


def train(config: RunConfig) -> tuple[object, torch.nn.Module, dict]:
    """The product's rounds in one process; returns (recipe, trained model, run facts)."""
    recipe = build_recipe(config)
    model = recipe.build()
    initial = {k: v.detach().cpu().numpy() for k, v in recipe.shared_state(model).items()}
    pipeline = AggregationPipeline.for_run(config, specs_of(initial), recipe.site_indexed_keys, None, resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key=f"bench-{NAME}")
    start = time.perf_counter()
    shared = runner.run(initial, config.num_rounds)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in shared.items()}, strict=False)
    return recipe, model, {"seconds": time.perf_counter() - start,
                           "max_epsilon": max(r.metrics.get("epsilon", 0.0) for r in runner.results),
                           "privacy": privacy_record(config.state_root)}


def class_dice(pred: torch.Tensor, truth: torch.Tensor, index: int) -> float:
    """Dice of one class pooled over every pixel of the set."""
    p, t = pred == index, truth == index
    return float(2 * (p & t).sum() / max(int(p.sum() + t.sum()), 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=15)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--synthetic", type=int, default=80)
    parser.add_argument("--seg-steps", type=int, default=300)
    parser.add_argument("--lesion-rate", type=float, default=0.2)
    parser.add_argument("--lesion-size", type=float, nargs=2, default=(25.0, 45.0), metavar=("MIN", "MAX"))
    parser.add_argument("--heldout-test", type=int, default=80)
    parser.add_argument("--seg-seeds", type=int, default=2)
    parser.add_argument("--root", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-redgan-")) / "data"
    sim = SimConfig(seed=0, sites="A,B", subjects_per_site=args.subjects, public_size=120, heldout_fit=0,
                    heldout_test=args.heldout_test, image_size=32, lesion_rate=args.lesion_rate,
                    lesion_size_mm=tuple(args.lesion_size))
    manifest = build_federation(sim, root, workers=1)
    names = ",".join(load_site(manifest.site_dir("A"), 32).schema.names)
    lesion = names.split(",").index("lesion")
    base = RunConfig(recipe="red-gan", data_root=str(root), sites="A,B", label_names=names, image_size=32,
                     batch_size=8, num_rounds=args.rounds, local_steps=args.local_steps, target_epsilon=10.0,
                     accountant="rdp", eval_every=0,
                     options={"rare-class": "lesion", "rare-fraction": 0.5, "seg-pretrain-steps": 150})
    site = load_site(manifest.site_dir("A"), 32)
    test = load_heldout(root, "test", 32)["A"]
    public = load_public_bank(manifest.public_dir, 32).label_maps.long()
    lesion_maps = public[(public == lesion).flatten(1).any(dim=1)]
    settings = SegmenterSettings(steps=args.seg_steps, batch_size=16, channels=(8, 16, 32))
    k = len(names.split(","))

    def lesion_dice(images, labels) -> dict:
        per_seed = [class_dice(predict_labels(train_on_images(images, labels, settings, seed=seed, num_classes=k),
                                              test.images), test.labels, lesion) for seed in range(args.seg_seeds)]
        return {"lesion_dice": float(np.mean(per_seed)), "lesion_dice_per_seed": per_seed}

    result = {"federation": sim.to_dict(), "site": "A", "real_pairs": int(site.images.shape[0]),
              "real_lesion_patients": int((site.labels == lesion).flatten(1).any(dim=1).sum()),
              "public_lesion_maps": int(lesion_maps.shape[0]), "test_images": int(test.images.shape[0]),
              "test_lesion_pixels": int((test.labels == lesion).sum()),
              "test_lesion_images": int((test.labels == lesion).flatten(1).any(dim=1).sum()),
              "seg_steps": args.seg_steps, "seg_seeds": args.seg_seeds,
              "command": "python -m bench.redgan " + " ".join(sys.argv[1:] if argv is None else argv), "arms": {}}
    result["arms"]["real_only"] = lesion_dice(site.images, site.labels)
    print("real_only", result["arms"]["real_only"], flush=True)
    arms = (("red_gan", {}, False), ("dp_cgan_ablation", {"seg-weight": 0.0}, False),
            (f"red_gan_{NOISE_FREE_ARM}", {}, True))
    for arm, options, ceiling in arms:
        config = base.replace(options={**base.options, **options}, run_dir=str(root.parent / arm), state_root=str(root.parent / arm / "state"))
        config = noise_free(config) if ceiling else config
        recipe, model, facts = train(config)
        gen = torch.Generator().manual_seed(1)
        maps = lesion_maps[torch.randint(0, lesion_maps.shape[0], (args.synthetic,), generator=gen)]
        fake = recipe.sample(model, maps, 0, gen).cpu()
        dice = lesion_dice(torch.cat([site.images, fake]), torch.cat([site.labels, maps]))
        result["arms"][arm] = {**dice, **facts}
        print(arm, result["arms"][arm], flush=True)
    print(result["arms"])
    write_result(NAME, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
