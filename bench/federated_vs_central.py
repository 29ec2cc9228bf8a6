"""Wall time of a federated simulation (Flower's engine) vs the same local steps in one process.

    python -m bench.federated_vs_central [--rounds 3] [--local-steps 10] [--subjects 60] [--skip-flower]

"Central" runs exactly the ClientApp's own `train_round` for every site, one after the
other, in this process, with the same FedAvg arithmetic (server/strategy.py) and no Flower:
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
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from bench.common import write_result
from medgen.client.app import train_round
from medgen.client.node import resolve_node
from medgen.config import RunConfig, parse_overrides
from medgen.models.registry import build_recipe
from medgen.server.strategy import AcceptedReply, site_rows_from_own_site, specs_of, weighted_average


def run_inprocess(config: RunConfig, evaluate: bool = False, site_rows: bool = True) -> dict:
    """FedAvg over `train_round` calls in one process; returns timings (and eval metrics)."""
    recipe = build_recipe(config)
    model = recipe.build()
    shared = {k: v.detach().cpu().numpy() for k, v in recipe.shared_state(model).items()}
    sites = config.site_names
    per_round = []
    start = time.perf_counter()
    for server_round in range(1, config.num_rounds + 1):
        t0 = time.perf_counter()
        replies = []
        for index, _ in enumerate(sites):
            node = resolve_node(config, {"partition-id": index, "num-partitions": len(sites)})
            content = RecordDict({
                "arrays": ArrayRecord({k: Array(v) for k, v in shared.items()}),
                "config": ConfigRecord({"run-key": "bench", "absolute-round": server_round}),
            })
            reply = train_round(config, node, content)
            replies.append(({k: a.numpy() for k, a in reply["arrays"].items()},
                            float(reply["metrics"]["num-examples"]), dict(reply["metrics"])))
        # the server's own arithmetic: FedAvg, then site-indexed rows from their own site
        accepted = [AcceptedReply(site=sites[int(m["site-index"])], num_examples=w, arrays=arrays,
                                  metrics={}) for arrays, w, m in replies]
        specs = specs_of(ArrayRecord({k: Array(v) for k, v in shared.items()}))
        averaged = weighted_average(accepted, specs)
        if recipe.site_indexed_keys and site_rows:
            averaged = site_rows_from_own_site(averaged, accepted, shared, recipe.site_indexed_keys, sites)
        shared = averaged
        epsilon = max(m["epsilon"] for _, _, m in replies)
        per_round.append(time.perf_counter() - t0)
        print(f"central round {server_round}/{config.num_rounds}: {per_round[-1]:.1f} s, max eps {epsilon:.2f}")
    result = {"seconds": time.perf_counter() - start, "round_seconds": per_round, "max_epsilon": epsilon}
    if evaluate:
        from medgen.evaluation.evaluator import Evaluator

        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in shared.items()}, strict=False)
        evaluator = Evaluator.prepare(config, Path(config.data_root) / "heldout",
                                      Path(config.data_root) / "cache" / "evaluator")
        result["eval"] = evaluator.evaluate(recipe, model, config.num_rounds)
        if config.run_dir:
            evaluator.write_sample_grid(recipe, model, config.num_rounds, Path(config.run_dir) / "central.png")
    return result


def run_flower(config: RunConfig, work: Path) -> dict:
    from medgen.server.simulate import run_simulation

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

    from medgen.sim.config import SimConfig
    from medgen.sim.federation import build_federation

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
