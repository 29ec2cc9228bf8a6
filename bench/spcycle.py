"""Learned cross-site translation under DP: spcycle-gan, its ablation (the plain private
CycleGAN, structure-weight 0) and icycle-gan, beside identity, histogram matching,
inverted histogram matching and the non-private centralised SPCycle-GAN ceiling, on the
brain federation (site-to-site harmonisation) or the head-CT federation (MR->CT from the
MR site M, CT site-to-site, CT->MR), every ordered site pair, over several seeds.

    python -m bench.spcycle --work W --federation brain|head-ct [--sites A,B --subjects 24
        --seeds 0,1,2 --rounds 2 --local-steps 5 --batch-size 8 --image-size 32 --width 8
        --epsilon 10 --seg-steps 200 --target-seg-steps 150]

The federation is built (or reused) under W/<federation> by the product's
``medgen.server.simulate.prepare_federation`` (as ``medgen-server simulate --federation``).
S (spcycle-gan's frozen structure segmenter) is pretrained ONCE on public renderings
(``medgen pretrain-segmenter``'s code) and shipped to the spcycle arms as ``options.seg-init``.
Each private arm runs the product's rounds in one process (``InProcessRunner``: every
site's real ``train_round``, node ledger, Poisson sampling, per-patient clipping, noise
calibrated for the schedule at ``--epsilon``, the server's aggregation pipeline). The
ceiling is ``CycleObjective.central_step`` on pooled images of every site, no DP, as many
steps as all sites' private steps together. Scores: evaluation/translation_truth.py
(SSIM/PSNR/MAE in the head/brain box, MAE in HU inside the head for CT targets, Dice of
target-site segmenters trained on real held-out fit images). Results are merged into
bench/results/spcycle.json under the federation (the command and settings beside them).
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

from bench.common import RESULTS, write_result
from medgen.client.simulated_site import simulated_sites
from medgen.config import RunConfig
from medgen.data.heldout_data import load_heldout
from medgen.data.site_data import load_site
from medgen.evaluation.translation import classical_baselines
from medgen.evaluation.translation_truth import evaluate_pairs, hu_windows, target_segmenters
from medgen.models.registry import build_recipe
from medgen.models.segmenter import SegmenterSettings
from medgen.models.segmenter_pretrain import pretrain
from medgen.privacy.ledger import PrivacyLedger
from medgen.privacy.site_update import specs_of
from medgen.server.aggregation import AggregationPipeline
from medgen.server.inprocess import InProcessRunner
from medgen.server.run_log import RunDir
from medgen.server.simulate import prepare_federation

ARMS = {"spcycle-dp": ("spcycle-gan", {"structure-weight": 1.0}),
        "cyclegan-dp": ("spcycle-gan", {"structure-weight": 0.0}),  # the ablation of the structure loss
        "icycle-dp": ("icycle-gan", {})}
CEILING = "spcycle-central"
ORDER = ("identity", "hist-match", "inv-hist-match", *ARMS, CEILING)
METRICS = ("ssim", "psnr", "mae", "mae_hu", "dice", "dice_fraction")


def train_private(base: RunConfig, recipe_name: str, options: dict, run_dir: Path):
    """One private arm through the product's in-process rounds; returns (recipe, model, epsilon)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = base.replace(recipe=recipe_name, options={**base.options, **options}, run_dir=str(run_dir),
                          state_root=str((run_dir / "state").resolve()))
    recipe = build_recipe(config)
    model = recipe.build()
    recipe.initialise(model)
    current = {k: v.detach().numpy() for k, v in recipe.shared_state(model).items()}
    pipeline = AggregationPipeline.for_run(config, specs_of(current), recipe.site_indexed_keys, RunDir(run_dir),
                                           resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key=uuid.uuid4().hex)
    final = runner.run(current, config.num_rounds)
    model.load_state_dict({**model.state_dict(), **{k: torch.from_numpy(np.asarray(v)) for k, v in final.items()}})
    epsilon = {s: PrivacyLedger.open(run_dir / "state" / s / "privacy_ledger.json", site=s).summary()["epsilon"]
               for s in config.site_names}
    return recipe, model.eval(), epsilon


def train_central(base: RunConfig, seg_init: Path) -> tuple:
    """The ceiling: spcycle-gan's objective, no DP, on pooled images of every site."""
    config = base.replace(recipe="spcycle-gan", options={**base.options, "seg-init": str(seg_init),
                                                          "seg-pretrain-steps": 0})
    recipe = build_recipe(config)
    model = recipe.build()
    recipe.initialise(model)
    sites = [load_site(Path(config.data_root) / "sites" / s, config.image_size) for s in config.site_names]
    images = torch.cat([s.images for s in sites]).float()
    labels = torch.cat([s.labels for s in sites]).long()
    source = torch.cat([torch.full((s.images.shape[0],), k) for k, s in enumerate(sites)])
    opt, twin, rng = recipe.optimizer(model), recipe.disc_twin(model), torch.Generator().manual_seed(config.seed)
    model.train()
    model.seg.eval()
    for _ in range(config.num_rounds * config.local_steps * len(sites)):
        pick = torch.randint(0, images.shape[0], (config.batch_size,), generator=rng)
        recipe.objective.central_step(model.cycle, opt, twin, model.seg, images[pick], labels[pick], source[pick], rng)
    return recipe, model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spcycle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--federation", choices=("brain", "head-ct"), default="brain")
    parser.add_argument("--sites", default="A,B", help="brain: A-D; head-ct: A-D (CT) and M (MR)")
    parser.add_argument("--subjects", type=int, default=24, help="subjects per site when building")
    parser.add_argument("--heldout", type=int, default=16, help="held-out fit and test subjects")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--seg-steps", type=int, default=200, help="S's public pretraining steps")
    parser.add_argument("--target-seg-steps", type=int, default=150, help="the evaluation segmenters' steps")
    parser.add_argument("--table", action="store_true", help="print the stored federation's table, train nothing")
    parser.add_argument("--key", help="store under this key (default: the federation), e.g. one seed per process")
    parser.add_argument("--merge", help="comma-separated stored keys (runs of one federation, other seeds) to "
                                        "merge into the federation's entry; trains nothing")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads((RESULTS / "spcycle.json").read_text())["runs"][args.federation]))
        return 0
    if args.merge:
        runs = json.loads((RESULTS / "spcycle.json").read_text())["runs"]
        write_result("spcycle", {"runs": {**runs, args.federation: merge([runs[k] for k in args.merge.split(",")])}})
        return 0
    torch.set_num_threads(1)
    command = "python -m bench.spcycle " + shlex.join(sys.argv[1:] if argv is None else argv)
    start, data_root = time.perf_counter(), args.work / args.federation
    base = RunConfig(image_size=args.image_size, batch_size=args.batch_size, local_steps=args.local_steps,
                     num_rounds=args.rounds, target_epsilon=args.epsilon, accountant="rdp", sites=args.sites,
                     eval_every=0, options={"gen-width": args.width, "disc-width": args.width})
    base = prepare_federation(base, data_root, num_sites=None, subjects_per_site=args.subjects,
                              federation=args.federation, public_size=64, heldout_fit=args.heldout,
                              heldout_test=args.heldout)
    names = list(base.site_names)
    seg_init = args.work / f"S-{args.federation}.pt"
    record = seg_init.with_name(seg_init.name + ".json")  # pretrain's provenance: reuse an identical S
    if not (record.is_file() and json.loads(record.read_text()).get("steps") == args.seg_steps):
        pretrain(data_root / "public", seg_init, args.seg_steps, args.image_size, 0)
    fit, test = (load_heldout(data_root, split, args.image_size) for split in ("fit", "test"))
    segmenters = target_segmenters(fit, base.num_classes, SegmenterSettings(steps=args.target_seg_steps,
                                                                            channels=(8, 16, 32)))
    windows = hu_windows(data_root, names)
    baselines = evaluate_pairs(test, classical_baselines(fit), segmenters, base.num_classes, windows)
    per_seed, epsilon, seconds = {}, {}, {}
    for seed in (int(s) for s in args.seeds.split(",")):
        config = base.replace(seed=seed)
        translators = {}
        for arm, (recipe_name, options) in ARMS.items():
            tic = time.perf_counter()
            if recipe_name == "spcycle-gan":
                options = {**options, "seg-init": str(seg_init.resolve()), "seg-pretrain-steps": 0}
            recipe, model, epsilon[f"{arm}@{seed}"] = train_private(config, recipe_name, options,
                                                                    args.work / f"{args.federation}-{arm}-{seed}")
            translators[arm] = _translator(recipe, model, names)
            seconds[f"{arm}@{seed}"] = time.perf_counter() - tic
            print(f"seed {seed} {arm}: {seconds[f'{arm}@{seed}']:.0f} s", flush=True)
        tic = time.perf_counter()
        translators[CEILING] = _translator(*train_central(config, seg_init), names)
        seconds[f"{CEILING}@{seed}"] = time.perf_counter() - tic
        per_seed[seed] = evaluate_pairs(test, translators, segmenters, base.num_classes, windows)["pairs"]
    pairs = {pair: {**baselines["pairs"][pair], **_mean_over_seeds([per_seed[s][pair] for s in per_seed])}
             for pair in baselines["pairs"]}
    result = {"command": command, "settings": vars(args) | {"work": str(args.work)}, "sites": names,
              "unit": "patient (one slice per simulated subject)", "accountant": "rdp", "delta": base.delta,
              "epsilon": epsilon, "seconds": seconds, "seeds": list(per_seed), "pairs": pairs,
              "per_seed": {str(s): v for s, v in per_seed.items()}, "reference_dice": baselines["reference_dice"],
              "hu_window": {s: None if w is None else [w.lo, w.hi] for s, w in windows.items()},
              "n_test_per_site": baselines["n"], "total_seconds": time.perf_counter() - start}
    previous = RESULTS / "spcycle.json"
    runs = json.loads(previous.read_text()).get("runs", {}) if previous.is_file() else {}
    write_result("spcycle", {"runs": {**runs, args.key or args.federation: result}})
    for pair, row in pairs.items():
        for method, m in row.items():
            print(f"{pair:6s} {method:16s} " + "  ".join(f"{k} {m[k]:.3f}" for k in METRICS if k in m), flush=True)
    return 0


def markdown(result: dict) -> str:
    """One federation's table: a row per method, a column per ordered pair; a cell is
    SSIM / PSNR / Dice (mean over seeds), led by MAE in HU for a CT target."""
    pairs = list(result["pairs"])
    lines = ["| method | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    for method in ORDER:
        cells = []
        for pair in pairs:
            m = result["pairs"][pair][method]
            hu = f"**{m['mae_hu']:.0f} HU** · " if "mae_hu" in m else ""
            cells.append(f"{hu}{m['ssim']:.3f} · {m['psnr']:.1f} · {m['dice']:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(parts: list[dict]) -> dict:
    """Runs of one federation with the same settings but other seeds, as one entry."""
    per_seed = {seed: rows for part in parts for seed, rows in part["per_seed"].items()}
    first = parts[0]
    pairs = {pair: {**{m: first["pairs"][pair][m] for m in first["pairs"][pair] if m not in (*ARMS, CEILING)},
                    **_mean_over_seeds([per_seed[s][pair] for s in per_seed])} for pair in first["pairs"]}
    return {**first, "command": [p["command"] for p in parts], "seeds": [int(s) for s in per_seed], "pairs": pairs,
            "per_seed": per_seed, "epsilon": {k: v for p in parts for k, v in p["epsilon"].items()},
            "seconds": {k: v for p in parts for k, v in p["seconds"].items()},
            "total_seconds": sum(p["total_seconds"] for p in parts)}


def _mean_over_seeds(rows: list[dict]) -> dict:
    """{method: {metric: mean, metric_sd: sd over seeds}}."""
    out = {}
    for method in rows[0]:
        values = {k: [r[method][k] for r in rows] for k in METRICS if k in rows[0][method]}
        out[method] = {k: float(np.mean(v)) for k, v in values.items()}
        out[method].update({f"{k}_sd": float(np.std(v)) for k, v in values.items()})
        out[method]["seeds"] = len(rows)
    return out


def _translator(recipe, model, names):
    return lambda x, s, t: recipe.translate_images(model, x, names.index(s), names.index(t)).detach().cpu()


if __name__ == "__main__":
    sys.exit(main())
