"""Byzantine table: attack x aggregation rule x norm screen on/off, measured through the
product's round code (the in-process runner: each site's real ``train_round``, the server's
one ``AggregationPipeline``), never a loop of its own.

Federation: 4 simulated sites (A-D, 32 px, dp-cgan with its scanner-moment release rows);
site D is the attacker, its attack wrapping its REAL reply (the attack code lives here,
not in the product). Every cell runs 2 rounds from the same initial model: round 1 honest
(the nodes get bound to their sites), the attack in round 2 (duplicate index: in round 1,
before any binding, by an extra node). Damage = ||final - honest final|| / ||honest round-2
step|| over every shared floating-point array (site rows included), so 1.0 is one honest
step; ``undefended`` is the same damage for a plain FedAvg of the round's raw replies
(declared weights, no validation), the reference the pipeline is measured against.

    python -m bench.byzantine --work /tmp/byz        # writes bench/results/byzantine.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from bench.common import write_result
from medgen.client.simulated_site import simulated_sites
from medgen.config import RunConfig
from medgen.models.registry import build_recipe
from medgen.privacy.site_update import specs_of
from medgen.server.aggregation import AggregationPipeline
from medgen.server.inprocess import InProcessRunner, SiteTrainer
from medgen.sim.config import SimConfig
from medgen.sim.federation import build_federation

SITES = "A,B,C,D"
ATTACKER = 3
ATTACK_ROUND = 2
RULES = ("mean", "median", "trimmed-mean")
SCREENS = {"on": 3.0, "off": 0.0}
Reply = Callable[[RecordDict, RecordDict], RecordDict]   # (request, real reply) -> what is sent


def _with(reply: RecordDict, arrays: dict | None = None, **metrics) -> RecordDict:
    values = {k: a.numpy() for k, a in reply["arrays"].items()} if arrays is None else arrays
    return RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()}),
                       "metrics": MetricRecord({**dict(reply["metrics"]), **metrics})})


def _scaled(request: RecordDict, reply: RecordDict, factor: float) -> dict:
    before, after = request["arrays"], reply["arrays"]
    return {k: (before[k].numpy() + factor * (after[k].numpy() - before[k].numpy())).astype(after[k].numpy().dtype)
            if after[k].numpy().dtype.kind == "f" else after[k].numpy() for k in after.keys()}


def _poisoned_rows(reply: RecordDict, keys: tuple[str, ...]) -> dict:
    out = {k: a.numpy().copy() for k, a in reply["arrays"].items()}
    for key in keys:
        out[key][:] = 1e6  # its own row AND every other site's
    return out


def attacks(row_keys: tuple[str, ...]) -> dict[str, Reply]:
    return {
        "none": lambda q, r: r,
        "scaled-x100": lambda q, r: _with(r, _scaled(q, r, 100.0)),
        "sign-flip-1e12-examples": lambda q, r: _with(r, _scaled(q, r, -1.0), **{"num-examples": 10 ** 12}),
        "impersonation-x100": lambda q, r: _with(r, _scaled(q, r, 100.0), **{"site-index": 0}),
        "duplicate-index": lambda q, r: r,  # an extra node copies D's reply in round 1 (cell())
        "non-finite": lambda q, r: _with(r, {k: np.full_like(a.numpy(), np.nan) if a.numpy().dtype.kind == "f"
                                             else a.numpy() for k, a in r["arrays"].items()}),
        "fake-epsilon": lambda q, r: _with(r, epsilon=1e300),
        "row-poisoning": lambda q, r: _with(r, _poisoned_rows(r, row_keys)),
    }


def attacked(site: SiteTrainer, attack: Reply, rounds: tuple[int, ...]) -> SiteTrainer:
    def trainer(request: RecordDict) -> RecordDict:
        reply = site(request)
        return attack(request, reply) if int(request["config"]["absolute-round"]) in rounds else reply
    return trainer


def undefended(request: RecordDict, replies: list[RecordDict]) -> dict[str, np.ndarray]:
    """Plain FedAvg of the raw replies with their declared weights: no defence at all."""
    weights = np.asarray([float(r["metrics"]["num-examples"]) for r in replies])
    keys = list(request["arrays"].keys())
    with np.errstate(all="ignore"):
        return {k: sum(w / weights.sum() * r["arrays"][k].numpy().astype(np.float64)
                       for w, r in zip(weights, replies)) for k in keys}


def cell(config: RunConfig, rule: str, mads: float, attack_name: str, attack: Reply, initial: dict,
         state_root: Path) -> tuple[dict, list, dict]:
    """Two rounds; returns (final weights, round results, undefended round-2 weights)."""
    config = config.replace(aggregation=rule, norm_outlier_mads=mads,
                            state_root=str(state_root / rule / ("dup" if attack_name == "duplicate-index" else "main")))
    sites: list[SiteTrainer] = list(simulated_sites(config))
    node_ids = [1001, 1002, 1003, 1004]
    if attack_name == "duplicate-index":  # a second node answering as D before D is bound
        sites.append(_only_in_round(sites[ATTACKER], 1))
        node_ids.append(1099)
    else:
        sites[ATTACKER] = attacked(sites[ATTACKER], attack, (ATTACK_ROUND,))
    pipeline = AggregationPipeline.for_run(config, specs_of(initial), build_recipe(config).site_indexed_keys,
                                           None, resume=False, rng=np.random.default_rng(0))
    runner = InProcessRunner(config, pipeline, sites, run_key=f"byz-{rule}", node_ids=node_ids)
    after_one = runner.run(initial, 1)
    request = runner.request(ATTACK_ROUND, after_one)
    raw = [s(request) for s in sites[:4]]  # trained once here, replayed by the runner: no new cost
    final = runner.run(after_one, 1, first_round=ATTACK_ROUND)
    return final, runner.results, (None if attack_name == "duplicate-index" else undefended(request, raw))


def _only_in_round(site: SiteTrainer, server_round: int) -> SiteTrainer:
    def trainer(request: RecordDict) -> RecordDict:
        if int(request["config"]["absolute-round"]) != server_round:
            raise RuntimeError("the extra node answers round 1 only")
        return site(request)
    return trainer


def distance(a: dict, b: dict, keys: list[str]) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)
                             for k in keys)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="federation data and node states")
    parser.add_argument("--local-steps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = args.work / "data"
    build_federation(SimConfig(seed=0, sites=SITES, subjects_per_site=12, public_size=16,
                               heldout_fit=2, heldout_test=2, image_size=32), data)
    config = RunConfig(sites=SITES, num_rounds=2, local_steps=args.local_steps, batch_size=4, image_size=32,
                       accountant="rdp", eval_every=0, data_root=str(data.resolve()),
                       options={"gen-width": 8, "disc-width": 8})
    recipe = build_recipe(config)
    initial = {k: v.numpy() for k, v in recipe.shared_state(recipe.build()).items()}
    floats = [k for k, v in initial.items() if v.dtype.kind == "f"]
    rows = [k for k in floats if k in recipe.site_indexed_keys]
    started, table, honest_bounded = time.perf_counter(), [], {}
    for rule in RULES:
        honest, results, _ = cell(config, rule, 3.0, "none", attacks(())["none"], initial, args.work / "state")
        step = distance(honest, results[0].arrays, floats)
        honest_bounded[rule] = [note for r in results for note in r.notes]  # must stay empty
        for name, attack in attacks(tuple(rows)).items():
            for screen, mads in SCREENS.items():
                final, results, raw = cell(config, rule, mads, name, attack, initial, args.work / "state")
                attack_round = results[-1] if name != "duplicate-index" else results[0]
                plain = distance(raw, honest, floats) / step if raw is not None else None
                table.append({"attack": name, "rule": rule, "screen": screen,
                              "damage_honest_steps": distance(final, honest, floats) / step,
                              "undefended_honest_steps": plain if plain is None or np.isfinite(plain) else "inf",
                              "max_abs_site_row": float(max(np.abs(final[k]).max() for k in rows)),
                              "excluded": [f"{e['site']}: {e['reason'][:90]}" for e in attack_round.excluded],
                              "bounded_notes": attack_round.notes[:3]})
                row = table[-1]
                print(f"{rule:12s} screen {screen:3s} {name:24s} damage {row['damage_honest_steps']:8.3f} "
                      f"(undefended {row['undefended_honest_steps']}) excluded {len(row['excluded'])}", flush=True)
    worst = max(r["damage_honest_steps"] for r in table)
    per_attack = {a: max(r["damage_honest_steps"] for r in table if r["attack"] == a) for a in attacks(())}
    write_result("byzantine", {
        "command": "python -m bench.byzantine " + shlex.join(sys.argv[1:] if argv is None else argv),
        "federation": "4 simulated sites A-D, 12 patients each, 32 px, dp-cgan gen/disc width 8, "
                      f"{args.local_steps} local steps, batch 4, RDP accountant; site D attacks in round 2",
        "damage": "||final - honest final|| / ||honest round-2 step|| over all shared float arrays",
        "seconds": time.perf_counter() - started, "worst_damage_honest_steps": worst,
        "worst_per_attack": per_attack, "honest_runs_bounded_notes": honest_bounded, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
