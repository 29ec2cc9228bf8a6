"""The ServerApp: validated FedAvg rounds, a checkpoint after every round that trained,
evaluation on the coordinator's held-out data, the report at the end.

Resume: if run-dir holds a checkpoint with the same config hash (server/checkpoint.py),
training continues from its absolute round with its run key, so clients can recognise a
replayed round (client/local_state.py) and ledgers are not charged twice. Only the
remaining ``num-rounds - checkpoint round`` rounds run.

The run directory (server/run_log.py) receives config.toml, metrics.jsonl, sample grids,
the checkpoint, privacy.json, report.html and finally the DONE marker with the status,
which is how ``medgen-server simulate`` learns that the run ended (``flwr run`` returns as
soon as the run is submitted, and exits 0 even when every ClientApp failed). DONE carries
the run config's coordinator-id (the harness trusts only its own), the last round that
trained and the rounds that trained no site.

No lost work: a round in which no site's update was aggregated (every site refused, e.g.
budget exhausted) writes no checkpoint and is not evaluated, so the checkpoint's round is
the last round that trained (server/outcome.py). A ServerApp whose run directory was taken
over by another coordinator (run-dir/.coordinator/lock names another id) stops at its next
round end without writing anything more.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import medgen
from medgen.atomic import atomic_write_json
from medgen.config import ConfigError, RunConfig
from medgen.evaluation.report import write_report
from medgen.evaluation.evaluator import Evaluator
from medgen.models.recipe import Recipe
from medgen.models.registry import build_recipe
from medgen.privacy.client_dp import site_level_guarantee
from medgen.privacy.secagg import SecAggSettings
from medgen.privacy.site_update import specs_of
from medgen.server.checkpoint import (checkpoint_for_resume, new_checkpoint, save_checkpoint,
                                      set_aside_checkpoint)
from medgen.server.outcome import checkpoint_round, kept_previous, untrained_rounds
from medgen.server.run_lock import read_holder
from medgen.server.run_log import RunDir, read_metrics
from medgen.server.aggregation import AggregationPipeline
from medgen.server.federated_eval import KIND as FEDERATED_EVAL
from medgen.server.federated_eval import FederatedEvaluation
from medgen.server.secure_rounds import SecureAggregationRounds
from medgen.server.strategy import ValidatingFedAvg

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_run_config(context.run_config)
    run_server(grid, config)


class RunDirTakenOver(RuntimeError):
    """Another coordinator owns the run directory now; this ServerApp must stop writing."""


def run_server(grid: Grid, config: RunConfig) -> None:
    """Run (or resume) the whole training; leaves a DONE marker with the status (unless
    another coordinator took the run directory over)."""
    run_dir = RunDir(Path(config.run_dir))
    run_dir.path.mkdir(parents=True, exist_ok=True)
    _check_owner(config, run_dir)
    run_dir.clear_done()
    if not config.resume and (kept := set_aside_checkpoint(run_dir.path)) is not None:
        log.info("resume = false: the previous checkpoint is kept as %s", kept)
    try:
        _train(grid, config, run_dir)
    except RunDirTakenOver:
        log.error("server run stopped:\n%s", traceback.format_exc())
        raise
    except BaseException as err:
        log.error("server run failed:\n%s", traceback.format_exc())
        _finish(config, run_dir)
        run_dir.write_done("failed", error=f"{type(err).__name__}: {err}",
                           coordinator=config.coordinator_id)
        raise
    report = _finish(config, run_dir)
    run_dir.write_done("ok", coordinator=config.coordinator_id, final_round=checkpoint_round(run_dir.path),
                       num_rounds=config.num_rounds, untrained_rounds=untrained_rounds(read_metrics(run_dir.metrics)),
                       report=str(report) if report else None)


def _check_owner(config: RunConfig, run_dir: RunDir) -> None:
    if not config.coordinator_id:
        return  # started without a coordinator (tests, an older harness)
    holder = read_holder(run_dir.path)
    if holder is not None and holder.coordinator_id != config.coordinator_id:
        raise RunDirTakenOver(f"run directory {run_dir.path} now belongs to coordinator "
                              f"{holder.coordinator_id} ({holder.describe()}); this ServerApp "
                              f"(coordinator {config.coordinator_id}) stops without writing")


def _train(grid: Grid, config: RunConfig, run_dir: RunDir) -> int:
    recipe = build_recipe(config)
    model = recipe.build()
    checkpoint = checkpoint_for_resume(run_dir.path, config)
    if checkpoint is not None:
        model.load_state_dict(checkpoint.shared_state, strict=False)
        start, run_key = checkpoint.server_round, checkpoint.run_key
        log.info("resuming from the checkpoint of round %d", start)
    else:
        recipe.initialise(model)  # e.g. weights trained on public data only (bridge's S)
        start, run_key = 0, uuid.uuid4().hex
    run_dir.write_config(config)
    run_dir.restart_metrics(start)
    remaining = config.num_rounds - start
    if remaining <= 0:
        log.info("checkpoint is at round %d >= num-rounds %d: nothing to train", start, config.num_rounds)
        return start

    initial = ArrayRecord(recipe.shared_state(model))
    round_end = RoundEnd(config, recipe, run_dir, run_key, start, _evaluator(config))
    train_config = ConfigRecord({"run-key": run_key,
                                 # hospitals check it against their own (deploy/allowlist.py)
                                 "medgen-version": medgen.__version__})
    # ONE aggregation pipeline for either path (server/aggregation.py); the node-to-site
    # binding survives a restart of this run (kept beside the checkpoint), not a new run
    pipeline = AggregationPipeline.for_run(config, specs_of(initial), recipe.site_indexed_keys, run_dir,
                                           resume=checkpoint is not None)
    # the sites' own DP-released scores of each due round (server/federated_eval.py)
    federated_eval = FederatedEvaluation(config, pipeline.validator, pipeline.binding, run_dir.path) \
        if config.federated_eval_rounds else None
    if config.secure_aggregation:  # SecAgg+ (privacy/secagg.py): the server sees only the sum
        SecureAggregationRounds(SecAggSettings.from_config(config), pipeline, round_offset=start,
                                federated_eval=federated_eval
                                ).run(grid, initial, remaining, dict(train_config), on_round_end=round_end)
        return config.num_rounds
    strategy = ValidatingFedAvg(pipeline, round_offset=start, federated_eval=federated_eval,
                                dropout=config.simulate_dropout, seed=config.seed)
    strategy.start(grid, initial, num_rounds=remaining, timeout=config.round_timeout,
                   train_config=train_config, evaluate_config=ConfigRecord(dict(train_config)),
                   evaluate_fn=round_end)
    return config.num_rounds


@dataclass
class RoundEnd:
    """Flower's evaluate_fn, called after aggregation of every round: checkpoint, evaluate.

    Round 0 (before any training, fresh runs only) saves the initial weights with the run
    key. A later round that trained no site (its metrics line says kept-previous-weights)
    saves nothing and is not evaluated: the checkpoint keeps the last trained round.
    """

    config: RunConfig
    recipe: Recipe
    run_dir: RunDir
    run_key: str
    round_offset: int
    evaluator: Any = None
    model: Any = field(init=False, default=None)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        absolute = self.round_offset + server_round
        _check_owner(self.config, self.run_dir)
        if server_round == 0 and self.round_offset > 0:
            return None  # resumed: the checkpoint already holds these weights
        if server_round > 0 and not self._trained(absolute):
            log.warning("round %d trained no site: the weights stay those of the last trained round; "
                        "no checkpoint, no evaluation", absolute)
            return None
        shared = arrays.to_torch_state_dict()
        # round 0 (Flower calls it before round 1): the initial weights and the run key, so a
        # crash in round 1 resumes with the same key (sites replay, no double charge); a fresh
        # run then evaluates the untrained generator, the baseline every later FD is read against
        save_checkpoint(self.run_dir.path, new_checkpoint(shared, absolute, self.config, self.run_key))
        if self.evaluator is None or not self._due(absolute):
            return None
        if self.model is None:
            self.model = self.recipe.build()
        self.model.load_state_dict(shared, strict=False)
        try:
            metrics = {k: float(v) for k, v in self.evaluator.evaluate(self.recipe, self.model, absolute).items()}
            self.evaluator.write_sample_grid(self.recipe, self.model, absolute,
                                             self.run_dir.sample_grid(absolute))
        except Exception:  # noqa: BLE001 - a broken evaluation must not cost the training run
            log.error("round %d: evaluation failed (training goes on; the checkpoint is saved):\n%s",
                      absolute, traceback.format_exc())
            return None
        self.run_dir.log_eval(absolute, metrics)
        return MetricRecord(metrics)

    def _trained(self, absolute: int) -> bool:
        """False if the round's train line says the previous weights were kept."""
        records = [r for r in read_metrics(self.run_dir.metrics)
                   if r.get("kind") == "train" and r.get("round") == absolute]
        return not records or not kept_previous(records[-1])

    def _due(self, absolute: int) -> bool:
        every = self.config.eval_every
        return absolute == 0 or absolute % every == 0 or absolute == self.config.num_rounds


def _evaluator(config: RunConfig) -> Any:
    if config.eval_every == 0:
        return None
    heldout = Path(config.data_root) / "heldout" if config.data_root else None
    if heldout is None or not heldout.is_dir():
        raise ConfigError(f"run-config field 'eval-every' is {config.eval_every} but there is no "
                          f"held-out data at {heldout or '<data-root>/heldout'}; set eval-every=0 "
                          "or point data-root at a data root with heldout/")
    # cached beside the held-out data it was trained on, so later runs pay nothing
    evaluator = Evaluator.prepare(config, heldout, Path(config.data_root) / "cache" / "evaluator")
    evaluator.write_info(Path(config.run_dir) / "evaluator.json")  # weight hashes for the report
    return evaluator


def _finish(config: RunConfig, run_dir: RunDir) -> Path | None:
    """privacy.json from the sites' reported metrics, then the HTML report (best effort)."""
    try:
        existing = {}
        if run_dir.privacy.exists():
            existing = json.loads(run_dir.privacy.read_text())
        atomic_write_json(run_dir.privacy, {**existing, **privacy_from_metrics(run_dir, config)})
    except Exception:  # noqa: BLE001 - a summary must not hide the run's own status
        log.error("could not write %s:\n%s", run_dir.privacy, traceback.format_exc())
    try:
        return write_report(run_dir.path)
    except Exception:  # noqa: BLE001
        log.error("could not write the report:\n%s", traceback.format_exc())
        return None


def privacy_from_metrics(run_dir: RunDir, config: RunConfig) -> dict[str, Any]:
    """Per-site epsilon as the sites reported it: the largest a site reported, in a reply
    that was aggregated OR excluded after its privacy metrics were checked (an excluded
    site still spent that budget: ``excluded_rounds`` counts those, ``spent_while_excluded``
    flags the site; server/validation.py). Epsilons in refused privacy metrics are not
    believed and not reported."""
    sites: dict[str, dict[str, Any]] = {}
    records = read_metrics(run_dir.metrics)  # read once: both guarantees come from it
    for record in records:
        if record.get("kind") != "train":
            continue
        spent = [(e["site"], e, True) for e in record.get("excluded", []) if e.get("epsilon") is not None]
        for site, metrics, excluded in [(s, m, False) for s, m in record.get("per_site", {}).items()] + spent:
            entry = sites.setdefault(site, {"epsilon": None, "delta": None, "last_round": 0, "rounds": 0,
                                            "excluded_rounds": 0, "spent_while_excluded": False})
            eps = metrics.get("epsilon")
            if eps is not None and (entry["epsilon"] is None or eps >= entry["epsilon"]):
                entry["epsilon"], entry["delta"] = eps, metrics.get("delta")
            entry["last_round"] = max(entry["last_round"], int(record["round"]))
            entry["excluded_rounds" if excluded else "rounds"] += 1
            entry["spent_while_excluded"] = entry["spent_while_excluded"] or excluded
    for record in records:  # a site's evaluation releases are spent budget too
        if record.get("kind") != FEDERATED_EVAL:
            continue
        for site, metrics in record.get("per_site", {}).items():
            entry = sites.setdefault(site, {"epsilon": None, "delta": None, "last_round": 0, "rounds": 0,
                                            "excluded_rounds": 0, "spent_while_excluded": False})
            eps = metrics.get("epsilon")
            if eps is not None and (entry["epsilon"] is None or eps >= entry["epsilon"]):
                entry["epsilon"], entry["delta"] = eps, metrics.get("delta")
            entry["federated_eval_releases"] = entry.get("federated_eval_releases", 0) + 1
    out = {"unit": "patient", "accountant": config.accountant, "delta": config.delta,
           "target_epsilon": config.target_epsilon, "reported_by_sites": sites,
           "max_epsilon": max((s["epsilon"] or 0.0 for s in sites.values()), default=0.0)}
    client_level = site_level_guarantee(records, config)
    if client_level is not None:  # a separate guarantee, unit = the site
        out["client_level"] = client_level
    return out
