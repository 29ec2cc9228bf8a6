"""Wall time of a federated simulation (Flower's engine) vs the same local steps in one process.

    python -m bench.federated_vs_central [--rounds 3] [--local-steps 10] [--subjects 60] [--skip-flower]

"Central" runs the product's in-process runner (server/inprocess.py): the ClientApp's own
`train_round` for every site, one after the other, in this process, aggregated by the
server's one pipeline (server/aggregation.py), and no Flower transport:
the difference between the two is the engine's overhead (Ray start-up, a ClientApp call per
message, serialisation). Both use the same data, seeds, privacy plan and local steps.
Also used to tune recipes quickly: `--eval` scores the final generator with the Evaluator.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import write_result
from medgen.client.simulated_site import simulated_sites
from medgen.config import RunConfig, parse_overrides
from medgen.evaluation.evaluator import Evaluator
from medgen.models.registry import build_recipe
from medgen.privacy.site_update import specs_of
from medgen.server.aggregation import AggregationPipeline
from medgen.server.inprocess import InProcessRunner
from medgen.server.simulate import run_simulation
from medgen.sim.config import SimConfig
from medgen.sim.federation import build_federation


def run_inprocess(config: RunConfig, evaluate: bool = False, site_rows: bool = True) -> dict:
    """The product's rounds in one process (server/inprocess.py): every site's real
    ``train_round`` and the server's one aggregation pipeline; returns timings (and eval)."""
    recipe = build_recipe(config)
    model = recipe.build()
    initial = {k: v.detach().cpu().numpy() for k, v in recipe.shared_state(model).items()}
    # the ablation: plain FedAvg on the site-indexed rows too (the pipeline without its row stage)
    keys = recipe.site_indexed_keys if site_rows else ()
    pipeline = AggregationPipeline.for_run(config, specs_of(initial), keys, None, resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key="bench")
    per_round, marks = [], [time.perf_counter()]

    def round_end(server_round: int, current: dict) -> None:
        per_round.append(time.perf_counter() - marks[-1])
        marks.append(time.perf_counter())
        epsilon = runner.results[-1].metrics.get("epsilon", float("nan"))
        print(f"central round {server_round}/{config.num_rounds}: {per_round[-1]:.1f} s, max eps {epsilon:.2f}")

    start = time.perf_counter()
    shared = runner.run(initial, config.num_rounds, on_round_end=round_end)
    epsilon = max(r.metrics.get("epsilon", 0.0) for r in runner.results)
    result = {"seconds": time.perf_counter() - start, "round_seconds": per_round, "max_epsilon": epsilon}
    if evaluate:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in shared.items()}, strict=False)
        evaluator = Evaluator.prepare(config, Path(config.data_root) / "heldout",
                                      Path(config.data_root) / "cache" / "evaluator")
        result["eval"] = evaluator.evaluate(recipe, model, config.num_rounds)
        if config.run_dir:
            evaluator.write_sample_grid(recipe, model, config.num_rounds, Path(config.run_dir) / "central.png")
    return result


def run_flower(config: RunConfig, work: Path) -> dict:
    start = time.perf_counter()
    run_simulation(config, work / "flower", progress=print)
    return {"seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--subjects", type=int, default=60, help="patients per site")
    parser.add_argument("--data-root", type=Path, help="reuse a built federation")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--eval", action="store_true", help="score the central run's final generator")
    parser.add_argument("--name", default="federated_vs_central")
    parser.add_argument("--no-site-rows", action="store_true",
                        help="plain FedAvg on site-indexed rows too (ablation)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="medgen-bench-"))
    try:
        data_root = args.data_root or work / "federation"
        if args.data_root is None:
            build_federation(SimConfig(subjects_per_site=args.subjects, public_size=100,
                                       heldout_fit=24, heldout_test=24), data_root)
        base = RunConfig.from_run_config({"num-rounds": args.rounds, "local-steps": args.local_steps,
                                          "eval-every": 0, **parse_overrides(args.overrides)})
        torch.set_num_threads(1)  # what each simulated client gets (client-resources-num-cpus=1)
        central_config = base.replace(data_root=str(data_root.resolve()), state_root=str(work / "central-state"),
                                      run_dir=str(work / "central-run"))
        central = run_inprocess(central_config, evaluate=args.eval, site_rows=not args.no_site_rows)
        payload = {"config": central_config.to_run_config(), "central_one_process": central}
        if not args.skip_flower:
            flower_config = base.replace(data_root=str(data_root.resolve()), state_root=str(work / "flower-state"),
                                         run_dir=str(work / "flower-run"))
            flower = run_flower(flower_config, work)
            payload["flower_simulation"] = flower
            payload["ratio_flower_over_central"] = flower["seconds"] / central["seconds"]
        write_result(args.name, payload)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
