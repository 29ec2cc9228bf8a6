"""Adaptive MedGAN's schedule against site-gan's fixed one, at equal epsilon: convergence.

    python -m bench.adaptive_schedule [--rounds 8] [--local-steps 12] [--subjects 48]
                                      [--image-size 32] [--seeds 0] [--data-root DIR]

Both variants train site-gan through the product's rounds (server/inprocess.py: every
site's real ``train_round``, DP-SGD, ledger, one aggregation pipeline) on the simulated
brain federation (2 sites), with the same target epsilon, rounds, local steps and batch.
The adaptive one (``options.schedule = adaptive``) also makes one Gaussian release per
round (models/adaptive_schedule.py), planned into the SAME budget: its DP-SGD noise is
larger (the JSON records both plans' noise multipliers). The only other difference is how
many (free) G steps each round takes. Each variant also runs as its non-private ceiling
(``<variant>_non_private_ceiling``): the same run at epsilon 1e8 (bench/common.py
``noise_free``: DP-SGD noise ~0, clipping kept), the adaptive one with its per-round
release at noise multiplier CEILING_WD_NOISE instead of 4 (noise off there too).

Convergence is measured after every round on the global generator: the multi-scale
Laplacian SWD (evaluation/laplacian_swd.py) between samples of each site and that site's
held-out test images (never trained on), the site mean. The training sites' own images
against the same test images give the real-vs-real floor. Reported per variant: the SWD
curve, its area (mean over rounds), the best value, and the first round at which it
reaches the fixed schedule's final value ("rounds_to_fixed_final").
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import NOISE_FREE_ARM, noise_free, privacy_record, write_result
from medgen.client.simulated_site import simulated_sites
from medgen.config import RunConfig
from medgen.data.site_data import load_site
from medgen.evaluation.laplacian_swd import describe_patches, swd_statistic
from medgen.models.registry import build_recipe
from medgen.privacy.site_update import specs_of
from medgen.server.aggregation import AggregationPipeline
from medgen.server.inprocess import InProcessRunner
from medgen.sim.config import SimConfig
from medgen.sim.federation import build_federation

SITES = "A,B"
CEILING_WD_NOISE = 0.05  # the adaptive ceiling's release: ~0 noise on a +-2 bounded mean
VARIANTS = {"fixed": ({"schedule": "fixed"}, False), "adaptive": ({"schedule": "adaptive"}, False),
            f"fixed_{NOISE_FREE_ARM}": ({"schedule": "fixed"}, True),
            f"adaptive_{NOISE_FREE_ARM}": ({"schedule": "adaptive", "wd-noise": CEILING_WD_NOISE}, True)}


def swd(generated: torch.Tensor, real: torch.Tensor) -> float:
    a, b = describe_patches(generated.float()), describe_patches(real.float())
    return float(swd_statistic(a, b)(np.arange(generated.shape[0]), np.arange(real.shape[0]))["swd"])


def images_of(folder: Path, size: int, root: Path) -> torch.Tensor:
    return load_site(folder, size, need_labels=False, root=root).images.float()


def train_variant(config: RunConfig, tests: list[torch.Tensor]) -> dict:
    """One run; after every round the SWD of the global G's samples against each site's test set."""
    recipe = build_recipe(config)
    model = recipe.build()
    initial = {k: v.detach().cpu().numpy() for k, v in recipe.shared_state(model).items()}
    pipeline = AggregationPipeline.for_run(config, specs_of(initial), recipe.site_indexed_keys, None,
                                           resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key="adaptive-bench")
    curve: list[float] = []

    def evaluate(server_round: int, shared: dict[str, np.ndarray]) -> None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in shared.items()}, strict=False)
        values = []
        for index, test in enumerate(tests):
            blank = torch.zeros(test.shape[0], config.image_size, config.image_size, dtype=torch.long)
            samples = recipe.sample(model, blank, index, torch.Generator().manual_seed(1000 + index))
            values.append(swd(samples, test))
        curve.append(float(np.mean(values)))
        site_metrics = runner.results[-1].per_site
        print(f"  round {server_round}: swd {curve[-1]:.3f} " + " ".join(
            f"{s}: W {m.get('wd_estimate', float('nan')):.2f} g/d {m.get('gen_per_disc', float('nan')):.2f}"
            for s, m in site_metrics.items()), flush=True)

    start = time.perf_counter()
    runner.run(initial, config.num_rounds, on_round_end=evaluate)
    per_round = [{"round": r.round, "epsilon": r.metrics.get("epsilon"),
                  "per_site": {s: {k: m[k] for k in ("wd_estimate", "wd_real_mean", "gen_per_disc",
                                                      "gen_steps", "disc_steps", "epsilon") if k in m}
                               for s, m in r.per_site.items()}} for r in runner.results]
    return {"seconds": time.perf_counter() - start, "swd_curve": curve, "rounds": per_round,
            "max_epsilon": max(r.metrics.get("epsilon", 0.0) for r in runner.results)}


def summary(results: dict, floor: float) -> dict:
    fixed_final = results["fixed"]["swd_curve"][-1]
    out = {"real_vs_real_floor": floor, "fixed_final_swd": fixed_final}
    for name, result in results.items():
        curve = result["swd_curve"]
        reached = [i + 1 for i, v in enumerate(curve) if v <= fixed_final]
        out[name] = {"swd_area": float(np.mean(curve)), "swd_best": float(min(curve)),
                     "swd_final": curve[-1], "rounds_to_fixed_final": reached[0] if reached else None}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--subjects", type=int, default=48, help="patients per site")
    parser.add_argument("--heldout", type=int, default=32, help="held-out test images")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds")
    parser.add_argument("--data-root", type=Path, help="reuse a built brain federation")
    parser.add_argument("--name", default="adaptive_schedule")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # what each simulated client gets

    work = Path(tempfile.mkdtemp(prefix="medgen-adaptive-bench-"))
    try:
        root = args.data_root or work / "federation"
        if args.data_root is None:
            build_federation(SimConfig(seed=0, sites=SITES, subjects_per_site=args.subjects, public_size=4,
                                       heldout_fit=0, heldout_test=args.heldout, image_size=args.image_size), root)
        root = root.resolve()
        sites = SITES.split(",")
        tests = [images_of(root / "heldout" / "test" / s, args.image_size, root) for s in sites]
        floor = float(np.mean([swd(images_of(root / "sites" / s, args.image_size, root), t)
                               for s, t in zip(sites, tests)]))
        runs = {}
        for seed in [int(s) for s in args.seeds.split(",")]:
            base = RunConfig.from_run_config({
                "recipe": "site-gan", "sites": SITES, "data-root": str(root), "image-size": args.image_size,
                "num-rounds": args.rounds, "local-steps": args.local_steps, "batch-size": 8, "seed": seed,
                "target-epsilon": args.epsilon, "accountant": "rdp", "eval-every": 0})
            results = {}
            for name, (options, ceiling) in VARIANTS.items():
                print(f"seed {seed}, {name}: training", flush=True)
                config = base.replace(state_root=str(work / f"{seed}-{name}" / "state"),
                                      run_dir=str(work / f"{seed}-{name}" / "run"),
                                      options={**base.options, **options})
                results[name] = train_variant(noise_free(config) if ceiling else config, tests)
                ledgers = sorted((work / f"{seed}-{name}" / "state").rglob("privacy_ledger.json"))
                results[name]["plan_site_A"] = json.loads(ledgers[0].read_text()).get("plan") if ledgers else None
                results[name]["privacy"] = privacy_record(work / f"{seed}-{name}" / "state")
            runs[str(seed)] = {"results": results, "summary": summary(results, floor)}
        payload = {"config": {k: v for k, v in base.to_run_config().items() if k != "data-root"},
                   "federation": {"kind": "brain (default simulator)", "sites": SITES,
                                  "subjects_per_site": args.subjects, "heldout_test": args.heldout},
                   "measure": "multi-scale Laplacian SWD, generated vs held-out test, site mean (lower is better)",
                   "runs": runs}
        write_result(args.name, payload)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
