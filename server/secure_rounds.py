"""SecAgg+ rounds on the server, aggregated by the server's one pipeline.

``SecureAggregationRounds`` runs Flower's ``SecAggPlusWorkflow`` once per round with a
small legacy strategy (``_SumToGlobal``): configure_fit sends the global weights (ordered
by key; the key order and the site-indexed arrays travel in the config), aggregate_fit
receives the unmasked weighted mean update and hands it to ``AggregationPipeline``:

- validate + bind: every reply's metrics (site-index, epsilon, delta, num-examples) travel
  in the clear and go through the same checks and node-to-site binding as the plain path;
- a masked sum is all or nothing: a reply the pipeline refuses (a foreign site, impossible
  privacy metrics) is already inside the sum, so the round keeps the previous weights and
  says why. The same holds for a site declaring more examples than in its first round
  or than ``max-num-examples``: the sum cannot be re-weighted. (The ratio cap of the plain
  path cannot apply; a site's weight is bounded by the protocol's max_weight.)
- combine: the protocol's mean update added to the global weights; the norm screen and
  median/trimmed mean cannot apply (one site's update is never seen);
- site rows: row k recovered from the mean as site k's own update (privacy/secagg.py) and
  bounded like any site row;
- client-level noise on the NEW global weights, and the run log: the pipeline's stages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medgen.privacy.secagg import ARRAY_KEYS, SITE_ROWS, SecAggSettings
from medgen.privacy.site_update import RejectedReply, cast_like
from medgen.server.aggregation import AggregationPipeline, RoundResult
from medgen.server.federated_eval import FederatedEvaluation
from medgen.server.validation import WEIGHT_KEY, SiteReply

log = logging.getLogger(__name__)

DROPPED = "dropped out of secure aggregation (no masked update, or an error reply)"


class _SumToGlobal(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow drives: global weights out, mean update in."""

    def __init__(self, pipeline: AggregationPipeline, settings: SecAggSettings, keys: list[str],
                 grid: Grid, train_config: dict[str, Any]):
        self.pipeline, self.settings, self.keys = pipeline, settings, keys
        self.grid, self.train_config = grid, train_config
        self.result: RoundResult | None = None
        self.sampled: list[int] = []
        self.absolute_round = 0
        self.current: dict[str, np.ndarray] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        config = {**self.train_config, "absolute-round": self.absolute_round, ARRAY_KEYS: list(self.keys)}
        if self.pipeline.site_indexed_keys:
            config[SITE_ROWS] = list(self.pipeline.site_indexed_keys)
        self.sampled = sorted(self.grid.get_node_ids())
        return [(GridClientProxy(n, self.grid, self.grid.run.run_id), FitIns(parameters, dict(config)))
                for n in self.sampled]

    def aggregate_fit(self, server_round, results, failures):
        pipeline, round_ = self.pipeline, self.absolute_round
        answered = {proxy.node_id for proxy, _ in results}
        dropped = [RejectedReply(pipeline.binding.name_of(n), DROPPED, n) for n in self.sampled if n not in answered]
        replies = [SiteReply(proxy.node_id, metrics={**fitres.metrics, WEIGHT_KEY: fitres.num_examples})
                   for proxy, fitres in results]
        accepted, refused = pipeline.admit(replies, with_arrays=False)
        if refused:
            return self._refuse(accepted, dropped + refused, "a reply inside the masked sum was refused")
        over = [r.site for r in accepted if r.metrics[WEIGHT_KEY] > self._allowed(r.site)]
        if over:
            return self._refuse(accepted, dropped, f"site(s) {over} declared more num-examples than in their "
                                "first round or than max-num-examples; a masked sum cannot be re-weighted")
        if len(accepted) < pipeline.min_sites:
            return self._refuse(accepted, dropped, f"{len(accepted)} sites < min-sites {pipeline.min_sites}")
        mean_update = parameters_to_ndarrays(results[0][1].parameters)  # the same sum for all
        combined, why = self._combined(mean_update)
        if why:
            return self._refuse(accepted, dropped, why)
        new_rows = self._rows(mean_update, accepted)
        self.result = pipeline.finish(round_, accepted, dropped, combined, new_rows, self.current,
                                      labels={"secure-aggregation": 1.0})
        self.current = self.result.arrays
        return ndarrays_to_parameters([self.current[k] for k in self.keys]), {}

    def _allowed(self, site: str) -> float:
        first, cap = self.pipeline.binding.first_examples[site], self.pipeline.max_num_examples
        return min(first, cap) if cap > 0 else first

    def _refuse(self, accepted, rejected, reason):
        self.result = self.pipeline.refuse_round(self.absolute_round, accepted, rejected, reason)
        return None, {}

    def _combined(self, mean_update) -> tuple[dict[str, np.ndarray], str | None]:
        if len(mean_update) != len(self.keys):
            return {}, f"aggregate holds {len(mean_update)} arrays, the model {len(self.keys)}"
        out = {}
        for key, delta in zip(self.keys, mean_update):
            before = self.current[key]
            if delta.shape != before.shape or not np.all(np.isfinite(delta)):
                return {}, f"aggregated update of '{key}' is not finite or has the wrong shape"
            out[key] = cast_like(np.asarray(before, np.float64) + delta, self.pipeline.specs[key])
        return out, None

    def _rows(self, mean_update, accepted) -> dict[str, dict[int, np.ndarray]]:
        """Row k's update = row k of the mean x sum(w) / w_k (privacy/secagg.py)."""
        weights = {r.site: self.settings.weight_ratio(r.metrics[WEIGHT_KEY]) for r in accepted}
        total, names = sum(weights.values()), self.pipeline.site_names
        update = dict(zip(self.keys, mean_update))
        return {key: {names.index(site): np.asarray(self.current[key][names.index(site)], np.float64)
                      + update[key][names.index(site)] * total / w for site, w in weights.items() if w > 0}
                for key in self.pipeline.site_indexed_keys}

    # the rest of the legacy interface is unused: evaluation is the coordinator's own
    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


@dataclass
class SecureAggregationRounds:
    """Runs ``num_rounds`` SecAgg+ rounds from ``initial``; after each, ``on_round_end``
    (the same evaluate_fn the plain path uses: checkpoint, evaluation). The pipeline
    writes the run log."""

    settings: SecAggSettings
    pipeline: AggregationPipeline
    round_offset: int = 0
    wait_for_nodes: float = 300.0
    outcomes: list[RoundResult] = field(default_factory=list)
    #: the sites' DP-released scores (server/federated_eval.py): sent as plain EVALUATE
    #: messages after a due round that trained; the scalars are already DP-released, so
    #: masking them would add nothing
    federated_eval: FederatedEvaluation | None = None

    def run(self, grid: Grid, initial: ArrayRecord, num_rounds: int, train_config: dict[str, Any],
            on_round_end: Callable[[int, ArrayRecord], Any] | None = None,
            context: Context | None = None) -> ArrayRecord:
        keys = list(initial.keys())
        train_config = dict(train_config)
        if self.pipeline.client_dp is not None:  # sites clip (client_clipping_mod), the pipeline adds noise
            train_config[KEY_CLIPPING_NORM] = float(self.pipeline.client_dp.clipping_norm)
        if self.pipeline.robust.settings.outlier_mads > 0:
            log.info("secure aggregation: the norm screen cannot apply (no site's update is seen); "
                     "site rows are still bounded")
        strategy = _SumToGlobal(self.pipeline, self.settings, keys, grid, train_config)
        strategy.current = {k: initial[k].numpy() for k in keys}
        base = context or Context(run_id=grid.run.run_id, node_id=0, node_config={},
                                  state=RecordDict(), run_config={})
        legacy = LegacyContext(base, strategy=strategy)
        workflow = self.settings.workflow()
        for server_round in range(1, num_rounds + 1):
            self._wait_for_nodes(grid)
            self.pipeline.binding.reconcile(grid.get_node_ids())
            strategy.absolute_round = self.round_offset + server_round
            strategy.result = None
            legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                ndarrays_to_parameters([strategy.current[k] for k in keys]), keep_input=True)
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
                {WorkflowKey.CURRENT_ROUND: strategy.absolute_round})
            workflow(grid, legacy)
            result = strategy.result or self.pipeline.refuse_round(
                strategy.absolute_round, [], [], "secure aggregation halted: too few sites answered to "
                "unmask the sum")
            self.outcomes.append(result)
            self._evaluate(grid, strategy, result, train_config)
            if on_round_end is not None:
                on_round_end(server_round, ArrayRecord({k: Array(v) for k, v in strategy.current.items()}))
        return ArrayRecord({k: Array(v) for k, v in strategy.current.items()})

    def _evaluate(self, grid: Grid, strategy: _SumToGlobal, result: RoundResult,
                  train_config: dict[str, Any]) -> None:
        absolute = strategy.absolute_round
        if self.federated_eval is None or not self.federated_eval.due(absolute) or not result.accepted:
            return
        arrays = ArrayRecord({k: Array(v) for k, v in strategy.current.items()})
        base = {k: v for k, v in train_config.items() if k in ("run-key", "medgen-version")}
        replies = grid.send_and_receive(self.federated_eval.messages(grid.get_node_ids(), absolute, arrays, base),
                                        timeout=self.settings.timeout)
        self.federated_eval.collect(absolute, replies)

    def _wait_for_nodes(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.wait_for_nodes
        while len(list(grid.get_node_ids())) < max(self.pipeline.min_sites, self.settings.threshold):
            if time.monotonic() > deadline:
                raise RuntimeError(f"secure aggregation needs {self.settings.threshold} connected sites; "
                                   f"only {len(list(grid.get_node_ids()))} after {self.wait_for_nodes:.0f} s")
            time.sleep(1.0)
