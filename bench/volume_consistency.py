"""Through-plane consistency of volume-gan against its 2D-only baseline, at equal epsilon.

    python -m bench.volume_consistency [--rounds 4] [--local-steps 25] [--subjects 20]
                                       [--image-size 32] [--depth 16] [--data-root DIR]

Both variants train through the product's rounds (server/inprocess.py: every site's real
``train_round``, DP-SGD, ledger, the server's one aggregation pipeline) on the head
federation built as volumes (dims = 3; CT sites A and B, HU through one window), with
the same privacy plan (target epsilon, rounds, steps, batch: the same noise). The only
difference is the option ``volume-disc`` (3D critic on, or off: the same generator and
slice critic alone). ``--ceilings`` (default volume-gan) also runs those variants as their
non-private ceiling (``<variant>_non_private_ceiling``): the same run at epsilon 1e8
(bench/common.py ``noise_free``: DP-SGD noise ~0, clipping kept). Generated volumes are compared with the held-out test volumes of
each site (never trained on); a second real set (the sites' training volumes) gives the
real-vs-real floor of every distance.

Measures, per volume [1, D, S, S] in [-1, 1]:
- ``adjacent_mad``: mean |slice k+1 - slice k| (through-plane intensity continuity); the
  number to match is the real one (``_gap``: |generated - real|);
- ``through_plane_swd``: sliced Wasserstein distance between 4x4x4 patch sets of
  generated and real volumes projected on fixed random directions whose through-plane
  part is centred (each direction compares a voxel with its slice neighbours: a 3D
  statistic that a stack of unrelated good slices fails);
- ``in_plane_swd``: the same on 1x4x4 patches (slice quality alone), the control.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import NOISE_FREE_ARM, noise_free, privacy_record, write_result
from medgen.client.simulated_site import simulated_sites
from medgen.config import RunConfig
from medgen.data.site_data import load_site
from medgen.models.registry import build_recipe
from medgen.privacy.site_update import specs_of
from medgen.server.aggregation import AggregationPipeline
from medgen.server.inprocess import InProcessRunner
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import build_head_federation

SITES = "A,B"
PROJECTIONS = 128


# -- the measures ------------------------------------------------------------------------
def adjacent_mad(volumes: torch.Tensor) -> float:
    return float((volumes[:, :, 1:] - volumes[:, :, :-1]).abs().mean())


def patches(volumes: torch.Tensor, depth: int, side: int = 4) -> torch.Tensor:
    """Every (depth x side x side) patch, stride 2 in-plane and 1 through-plane: [P, depth*side^2]."""
    x = volumes[:, 0].unfold(1, depth, 1).unfold(2, side, 2).unfold(3, side, 2)
    return x.reshape(-1, depth * side * side)


def directions(depth: int, side: int = 4, seed: int = 0) -> torch.Tensor:
    """Fixed random unit directions; for depth > 1 the through-plane mean of each in-plane
    position is removed, so a projection reads differences between neighbouring slices."""
    d = torch.randn(PROJECTIONS, depth, side * side, generator=torch.Generator().manual_seed(seed))
    if depth > 1:
        d = d - d.mean(dim=1, keepdim=True)
    d = d.reshape(PROJECTIONS, -1)
    return d / d.norm(dim=1, keepdim=True)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, dirs: torch.Tensor, count: int = 4096) -> float:
    """Mean over directions of W1 between the projected sets (quantiles at ``count`` levels)."""
    q = torch.linspace(0, 1, count)
    pa, pb = a @ dirs.T, b @ dirs.T
    return float((torch.quantile(pa, q, dim=0) - torch.quantile(pb, q, dim=0)).abs().mean())


def measures(generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    out = {"adjacent_mad": adjacent_mad(generated), "adjacent_mad_real": adjacent_mad(real)}
    out["adjacent_mad_gap"] = abs(out["adjacent_mad"] - out["adjacent_mad_real"])
    for name, depth in (("through_plane_swd", 4), ("in_plane_swd", 1)):
        dirs = directions(depth)
        out[name] = sliced_wasserstein(_subsample(patches(generated, depth)), _subsample(patches(real, depth)), dirs)
    return out


def _subsample(rows: torch.Tensor, limit: int = 20000) -> torch.Tensor:
    if rows.shape[0] <= limit:
        return rows
    return rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:limit]]


# -- one variant through the product's rounds ----------------------------------------------
def train_variant(config: RunConfig) -> tuple[torch.nn.Module, dict]:
    recipe = build_recipe(config)
    model = recipe.build()
    initial = {k: v.detach().cpu().numpy() for k, v in recipe.shared_state(model).items()}
    pipeline = AggregationPipeline.for_run(config, specs_of(initial), recipe.site_indexed_keys, None,
                                           resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key="volume-bench")
    start = time.perf_counter()
    shared = runner.run(initial, config.num_rounds, on_round_end=lambda r, _: print(
        f"  round {r}/{config.num_rounds}: max eps {runner.results[-1].metrics.get('epsilon', 0):.2f}",
        flush=True))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in shared.items()}, strict=False)
    epsilon = max(r.metrics.get("epsilon", 0.0) for r in runner.results)
    return model, {"seconds": time.perf_counter() - start, "max_epsilon": epsilon,
                   "sites_trained": [len(r.metrics) > 0 for r in runner.results],
                   "privacy": privacy_record(config.state_root)}


def real_volumes(folder: Path, size: int, depth: int, root: Path) -> torch.Tensor:
    data = load_site(folder, size, consumes="volumes", depth=depth, root=root)
    return data.images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=25)
    parser.add_argument("--subjects", type=int, default=20, help="patients (volumes) per site")
    parser.add_argument("--heldout", type=int, default=10, help="held-out test volumes per site")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--data-root", type=Path, help="reuse a built 3D head federation")
    parser.add_argument("--ceilings", default="volume-gan",
                        help="comma-separated variants also run as their non-private ceiling ('' for none)")
    parser.add_argument("--name", default="volume_consistency")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # what each simulated client gets

    work = Path(tempfile.mkdtemp(prefix="medgen-volume-bench-"))
    try:
        root = args.data_root or work / "federation"
        if args.data_root is None:
            start = time.perf_counter()
            build_head_federation(HeadSimConfig(seed=0, sites=SITES, subjects_per_site=args.subjects,
                                                public_size=2, heldout_fit=0, heldout_test=args.heldout,
                                                image_size=args.image_size, dims=3), root)
            print(f"built the 3D federation in {time.perf_counter() - start:.0f} s", flush=True)
        root = root.resolve()
        base = RunConfig.from_run_config({
            "recipe": "volume-gan", "sites": SITES, "data-root": str(root), "image-size": args.image_size,
            "num-rounds": args.rounds, "local-steps": args.local_steps, "batch-size": 8,
            "target-epsilon": args.epsilon, "accountant": "rdp", "eval-every": 0,
            "options.depth": args.depth})
        results, variants = {}, {"volume-gan": (True, False), "2d-only": (False, False)}
        for name in filter(None, args.ceilings.split(",")):
            variants[f"{name}_{NOISE_FREE_ARM}"] = (variants[name][0], True)
        for name, (volume_disc, ceiling) in variants.items():
            print(f"{name}: training", flush=True)
            config = base.replace(state_root=str(work / name / "state"), run_dir=str(work / name / "run"),
                                  options={**base.options, "volume-disc": volume_disc})
            model, info = train_variant(noise_free(config) if ceiling else config)
            recipe, per_site = build_recipe(config), {}
            for index, site in enumerate(config.site_names):
                test = real_volumes(root / "heldout" / "test" / site, args.image_size, args.depth, root)
                train = real_volumes(root / "sites" / site, args.image_size, args.depth, root)
                generated = recipe.sample_volumes(model, test.shape[0], index,
                                                  torch.Generator().manual_seed(100 + index))
                per_site[site] = {"generated": measures(generated, test),
                                  "floor_real_train_vs_test": measures(train, test)}
            results[name] = {**info, "per_site": per_site}
        payload = {"config": {k: v for k, v in base.to_run_config().items() if k not in ("data-root",)},
                   "federation": {"kind": "head-ct, dims=3", "sites": SITES, "subjects_per_site": args.subjects,
                                  "heldout_test_per_site": args.heldout, "volume": [args.depth, args.image_size,
                                                                                    args.image_size]},
                   "results": results,
                   "summary": _summary(results)}
        write_result(args.name, payload)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _summary(results: dict) -> dict:
    """Site means of each measure per variant, and the real-vs-real floor."""
    out = {}
    for name, result in results.items():
        sites = list(result["per_site"].values())
        keys = sites[0]["generated"]
        out[name] = {k: float(np.mean([s["generated"][k] for s in sites])) for k in keys}
        out["floor"] = {k: float(np.mean([s["floor_real_train_vs_test"][k] for s in sites])) for k in keys}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
