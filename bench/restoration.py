"""restore-diffusion at epsilon <= 10 against the classical restorers, per site, on the simulator's truth.

    python -m bench.restoration [--federation brain|head-ct] [--tasks denoise,sr2]
                                [--rounds 3] [--local-steps 6] [--subjects 100] [--no-ceiling]

For each task: the federation trains the recipe through the product's own rounds
(server/inprocess.py: every site's real ``train_round``, its ledger and DP-SGD, the server's
one aggregation pipeline) at ``--epsilon``; the non-private ceiling is the SAME run at
epsilon 1e3 with the RDP accountant (noise multiplier ~0.08 against ~0.8 at epsilon 10:
clipping and steps unchanged, noise negligible; Opacus' PRV calibration does not return at
such epsilons).
Then evaluation/restoration.py degrades every held-out clean rendering with ``--seeds``
fixed seeds and scores each method on the same measurements (BM3D, ~2.5 s an image on one
CPU core, on the first seed only). The learned rows: ``dp`` (DDIM with the recipe's
sample-steps) and ``dp_1step`` (one DDIM step: the x0 prediction, the posterior mean, which
PSNR favours). Results: bench/results/restoration.json, merged per federation and task.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, write_result
from medgen.client.simulated_site import simulated_sites
from medgen.config import RunConfig, parse_overrides
from medgen.data.heldout_data import load_heldout
from medgen.data.manifest import load_manifest
from medgen.evaluation.restoration import evaluate_site, learned_restorer, mean_over_seeds
from medgen.models.registry import build_recipe
from medgen.privacy.site_update import specs_of
from medgen.server.aggregation import AggregationPipeline
from medgen.server.inprocess import InProcessRunner
from medgen.server.simulate import prepare_federation

CEILING_EPSILON = 1e3  # with CEILING_ACCOUNTANT: the non-private ceiling (module docstring)
CEILING_ACCOUNTANT = "rdp"
NAME = "restoration"


def train(config: RunConfig) -> tuple[object, torch.nn.Module, dict]:
    """The product's rounds in one process; returns (recipe, trained model, run facts)."""
    recipe = build_recipe(config)
    model = recipe.build()
    initial = {k: v.detach().cpu().numpy() for k, v in recipe.shared_state(model).items()}
    pipeline = AggregationPipeline.for_run(config, specs_of(initial), recipe.site_indexed_keys, None, resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key="bench-restoration")
    start = time.perf_counter()

    def round_end(server_round: int, _current: dict) -> None:
        eps = runner.results[-1].metrics.get("epsilon", float("nan"))
        print(f"  round {server_round}/{config.num_rounds}: {time.perf_counter() - start:.0f} s, max eps {eps:.3g}",
              flush=True)

    shared = runner.run(initial, config.num_rounds, on_round_end=round_end)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in shared.items()}, strict=False)
    facts = {"seconds": time.perf_counter() - start,
             "max_epsilon": max(r.metrics.get("epsilon", 0.0) for r in runner.results),
             "accepted_rounds": sum(bool(r.accepted) for r in runner.results)}
    return recipe, model, facts


def evaluate(models: dict[str, tuple], config: RunConfig, seeds: int, images: int) -> dict:
    """Per site: every baseline and every learned model on the same degraded held-out images."""
    root = Path(config.data_root) / "heldout"
    heldout = load_heldout(root, "test", config.image_size)
    recipe = next(iter(models.values()))[0]
    sample_steps = recipe.options.sample_steps
    per_site = {}
    for k, site in enumerate(config.site_names):
        intensity = load_manifest(root / "test" / site, root=root.parent).intensity
        units = (intensity.window[1] - intensity.window[0]) / 2.0 if intensity.normalisation == "window" else None
        degradation = recipe.degradation(intensity)
        clean = heldout[site].clean[:images]
        runs = []
        for seed in range(seeds):
            restorers = {}
            for name, (r, model) in models.items():
                restorers[name] = learned_restorer(r, model, k, seed, steps=sample_steps)
                restorers[f"{name}_1step"] = learned_restorer(r, model, k, seed, steps=1)
            skip = () if seed == 0 else ("bm3d",)  # BM3D: first seed only (cost)
            runs.append(evaluate_site(degradation, clean, restorers, seed, units, skip=skip))
        per_site[site] = {"units": intensity.units if units else "normalised [-1, 1]",
                          "noise": vars(degradation.noise), "methods": mean_over_seeds(runs)}
        best = {m: v["psnr"] for m, v in per_site[site]["methods"].items()}
        print(f"  site {site}: " + ", ".join(f"{m} {v:.2f}" for m, v in best.items()), flush=True)
    return per_site


def summary(per_site: dict, learned: str) -> dict:
    """Per site: the best classical method by PSNR and by SSIM, and whether ``learned`` beats both."""
    out = {}
    for site, row in per_site.items():
        methods = row["methods"]
        classical = {m: v for m, v in methods.items() if not m.startswith(("dp", "ceiling"))}
        best_psnr = max(classical, key=lambda m: classical[m]["psnr"])
        best_ssim = max(classical, key=lambda m: classical[m]["ssim"])
        out[site] = {"best_classical_psnr": best_psnr, "best_classical_ssim": best_ssim,
                     "learned": learned,
                     "psnr_gain_db": methods[learned]["psnr"] - classical[best_psnr]["psnr"],
                     "ssim_gain": methods[learned]["ssim"] - classical[best_ssim]["ssim"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--federation", default="brain", choices=("brain", "head-ct"))
    parser.add_argument("--tasks", default="denoise,sr2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--subjects", type=int, default=100, help="patients per site")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--heldout", type=int, default=16, help="held-out test images per site")
    parser.add_argument("--seeds", type=int, default=3, help="degradation/sampling seeds")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the non-private ceiling run")
    parser.add_argument("--data-root", type=Path, help="reuse a built federation")
    parser.add_argument("--label", default="", help="store as <task>@<label> (another budget beside it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # what each simulated client gets (client-resources-num-cpus=1)
    work = Path(tempfile.mkdtemp(prefix="medgen-bench-restoration-"))
    try:
        base = RunConfig.from_run_config({
            "recipe": "restore-diffusion", "num-rounds": args.rounds, "local-steps": args.local_steps,
            "image-size": args.image_size, "batch-size": args.batch_size, "target-epsilon": args.epsilon,
            "eval-every": 0, **parse_overrides(args.overrides)})
        data_root = args.data_root or work / "federation"
        base = prepare_federation(base, data_root, num_sites=None, subjects_per_site=args.subjects,
                                  reuse_any=args.data_root is not None, federation=args.federation,
                                  public_size=8, heldout_fit=4, heldout_test=args.heldout)
        results = {}
        for task in args.tasks.split(","):
            variants = {"dp": args.epsilon} | ({} if args.no_ceiling else {"ceiling": CEILING_EPSILON})
            models, runs = {}, {}
            for name, epsilon in variants.items():
                print(f"{args.federation} {task} {name}: training at epsilon {epsilon:g}", flush=True)
                accountant = CEILING_ACCOUNTANT if name == "ceiling" else base.accountant
                config = base.replace(options={**base.options, "task": task}, target_epsilon=epsilon,
                                      accountant=accountant,
                                      state_root=str(work / f"state-{task}-{name}"),
                                      run_dir=str(work / f"run-{task}-{name}"))
                recipe, model, runs[name] = train(config)
                models[name] = (recipe, model)
            print(f"{args.federation} {task}: evaluating", flush=True)
            per_site = evaluate(models, config, args.seeds, args.heldout)
            results[f"{task}@{args.label}" if args.label else task] = {"config": config.replace(target_epsilon=args.epsilon,
                                                      accountant=base.accountant).to_run_config(),
                             "training": runs, "per_site": per_site,
                             "vs_best_classical": {name: summary(per_site, name) for name in models}}
        previous = RESULTS / f"{NAME}.json"
        merged = json.loads(previous.read_text()).get("runs", {}) if previous.is_file() else {}
        merged.setdefault(args.federation, {}).update(results)
        write_result(NAME, {"command": "python -m bench.restoration " + " ".join(sys.argv[1:] if argv is None else argv),
                            "runs": merged,
                            "unit": "one patient (one slice per simulated subject)", "accountant": base.accountant})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
