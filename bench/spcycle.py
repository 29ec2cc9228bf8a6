"""spcycle-gan: private SPCycle-GAN vs the private plain CycleGAN (structure-weight 0) vs the
non-private centralised ceiling, on the simulated brain federation's paired held-out set.

    python -m bench.spcycle --work W [--build 40] [--rounds 4 --local-steps 10 --image-size 32
                            --epsilon 10 --seg-steps 600 --seed 0]

``--build N`` writes a fresh simulated federation (N subjects per site) under W/data; else
W/data must hold one. S (the frozen structure segmenter) is pretrained ONCE on public
renderings (``medgen.models.segmenter_pretrain.pretrain``, as ``medgen pretrain-segmenter``)
and shipped to every arm as ``options.seg-init``. Each private arm runs the product's rounds
in one process (``medgen.server.inprocess.InProcessRunner``: every site's real
``train_round`` with its node ledger, Poisson sampling, per-patient clipping, noise
calibrated for the schedule at ``--epsilon``, and the server's aggregation pipeline). The
ceiling is ``CycleObjective.central_step`` on pooled images of every site, no DP, the same
number of steps as one site's schedule times the number of sites. Evaluation is
evaluation/translation.py (SSIM/PSNR/MAE in the brain box against the target's clean
rendering; Dice by segmenters trained on each target's real held-out/fit images) beside its
classical baselines. Result: bench/results/spcycle.json (the command and every setting in it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from bench.common import write_result
from medgen.config import RunConfig
from medgen.models.registry import build_recipe

ARMS = {"spcycle-dp": 1.0, "cyclegan-dp": 0.0}  # structure-weight of each private arm


def train_private(args, data_root: Path, seg_init: Path, structure_weight: float, run_dir: Path):
    """One private arm through the product's in-process rounds; returns (recipe, model, epsilon)."""
    from medgen.client.simulated_site import simulated_sites
    from medgen.privacy.ledger import PrivacyLedger
    from medgen.privacy.site_update import specs_of
    from medgen.server.aggregation import AggregationPipeline
    from medgen.server.inprocess import InProcessRunner
    from medgen.server.run_log import RunDir

    run_dir.mkdir(parents=True, exist_ok=True)
    config = RunConfig(recipe="spcycle-gan", image_size=args.image_size, batch_size=args.batch_size,
                       local_steps=args.local_steps, num_rounds=args.rounds, seed=args.seed,
                       target_epsilon=args.epsilon, accountant="rdp", sites=args.sites, run_dir=str(run_dir),
                       data_root=str(data_root.resolve()), state_root=str((run_dir / "state").resolve()),
                       eval_every=0, options={**_options(args), "structure-weight": structure_weight,
                                              "seg-init": str(seg_init.resolve())})
    recipe = build_recipe(config)
    model = recipe.build()
    recipe.initialise(model)
    current = {k: v.numpy() for k, v in recipe.shared_state(model).items()}
    pipeline = AggregationPipeline.for_run(config, specs_of(current), recipe.site_indexed_keys, RunDir(run_dir),
                                           resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key=uuid.uuid4().hex)
    final = runner.run(current, config.num_rounds)
    model.load_state_dict({**model.state_dict(), **{k: torch.from_numpy(np.asarray(v)) for k, v in final.items()}})
    epsilon = {s: PrivacyLedger.open(run_dir / "state" / s / "privacy_ledger.json", site=s).summary()["epsilon"]
               for s in config.site_names}
    return recipe, model.eval(), epsilon


def train_central(args, data_root: Path, seg_init: Path) -> tuple:
    """The ceiling: the same objective, no DP, on pooled images of every site."""
    from medgen.data.site_data import load_site

    config = RunConfig(recipe="spcycle-gan", image_size=args.image_size, batch_size=args.batch_size,
                       seed=args.seed, sites=args.sites, options={**_options(args), "seg-init": str(seg_init)})
    recipe = build_recipe(config)
    model = recipe.build()
    recipe.initialise(model)
    sites = [load_site(data_root / "sites" / s, args.image_size) for s in config.site_names]
    images = torch.cat([s.images for s in sites]).float()
    labels = torch.cat([s.labels for s in sites]).long()
    source = torch.cat([torch.full((s.images.shape[0],), k) for k, s in enumerate(sites)])
    opt, twin, rng = recipe.optimizer(model), recipe.disc_twin(model), torch.Generator().manual_seed(args.seed)
    model.train()
    model.seg.eval()
    for _ in range(args.rounds * args.local_steps * len(sites)):
        pick = torch.randint(0, images.shape[0], (args.batch_size,), generator=rng)
        recipe.objective.central_step(model.cycle, opt, twin, recipe.public_nets(model), images[pick], labels[pick],
                                      source[pick], rng)
    return recipe, model.eval()


def _options(args) -> dict:
    return {"gen-width": args.width, "disc-width": args.width, "seg-pretrain-steps": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spcycle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--build", type=int, default=0, help="build a federation with N subjects per site")
    parser.add_argument("--sites", default="A,B,C,D")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--seg-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from medgen.data.site_data import load_heldout
    from medgen.evaluation.translation import classical_baselines, evaluate_translation, train_target_segmenters
    from medgen.models.segmenter_pretrain import pretrain
    from medgen.sim.config import SimConfig
    from medgen.sim.federation import build_federation

    torch.set_num_threads(1)
    command = "python -m bench.spcycle " + shlex.join(sys.argv[1:] if argv is None else argv)
    data_root, start = args.work / "data", time.perf_counter()
    if args.build:
        build_federation(SimConfig(seed=args.seed, sites=args.sites, subjects_per_site=args.build, public_size=64,
                                   heldout_fit=24, heldout_test=16, image_size=args.image_size), data_root)
    seg_init = args.work / "S.pt"
    pretrain(data_root / "public", seg_init, args.seg_steps, args.image_size, args.seed)
    fit = load_heldout(data_root, "fit", args.image_size)
    test = load_heldout(data_root, "test", args.image_size)
    translators, epsilon, seconds = dict(classical_baselines(fit)), {}, {}
    names = args.sites.split(",")
    for arm, weight in ARMS.items():
        tic = time.perf_counter()
        recipe, model, epsilon[arm] = train_private(args, data_root, seg_init, weight, args.work / arm)
        translators[arm] = _translator(recipe, model, names)
        seconds[arm] = time.perf_counter() - tic
    tic = time.perf_counter()
    translators["spcycle-central"] = _translator(*train_central(args, data_root, seg_init), names)
    seconds["spcycle-central"] = time.perf_counter() - tic
    results = evaluate_translation(test, translators, train_target_segmenters(fit, seed=args.seed))
    methods = list(translators)
    means = {m: {k: float(np.mean([row[m][k] for row in results["pairs"].values()]))
                 for k in ("ssim", "psnr", "mae", "dice", "dice_fraction")} for m in methods}
    write_result("spcycle", {"command": command, "settings": vars(args) | {"work": str(args.work)},
                             "unit": "patient", "accountant": "rdp", "delta": RunConfig().delta,
                             "epsilon": epsilon, "seconds": seconds, "mean_over_pairs": means,
                             "pairs": results["pairs"], "reference_dice": results["reference_dice"],
                             "n_test_per_site": results["n"], "total_seconds": time.perf_counter() - start})
    for m in methods:
        print(f"{m:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in means[m].items()), flush=True)
    return 0


def _translator(recipe, model, names):
    return lambda x, s, t: recipe.translate_images(model, x, names.index(s), names.index(t)).cpu()


if __name__ == "__main__":
    sys.exit(main())
