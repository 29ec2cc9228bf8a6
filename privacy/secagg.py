"""Secure aggregation (SecAgg+) as a run option: the server learns only the weighted SUM
of the sites' updates, never one site's update, and survives dropped sites.

Flower 1.42 has SecAgg+ only on its legacy path (``secaggplus_mod`` on the client,
``SecAggPlusWorkflow`` on the server, FitIns/FitRes records). This module bridges it to
medgen's Message-API apps without a second copy of any logic:

Client: ``secure_aggregation_mod`` is a client mod. A plain train request passes straight
to the ClientApp's train handler. A SecAgg+ request goes through Flower's own
``secaggplus_mod``; at the masking stage that mod calls ``_LegacyBridge``, which turns
the legacy FitIns into the same ``{"arrays", "config"}`` message the plain path gets,
calls the SAME train handler (and any mods after this one, e.g. client-level clipping),
and turns its reply into a FitRes holding the UPDATE (reply - incoming weights, so the
quantisation range can be small and exact), which secaggplus_mod quantises and masks. A
site whose update is non-finite or outside the quantisation range, or whose weight is
above the protocol's max_weight, refuses (error reply, counted as dropped) instead of
corrupting the masked sum.

Server: ``SecureAggregationRounds`` runs Flower's ``SecAggPlusWorkflow`` once per round
with a small legacy strategy (``_SumToGlobal``): configure_fit sends the global weights
(ordered by key; the key order travels in the config), aggregate_fit receives the
unmasked weighted mean update, adds it to the global weights and validates the result.
Per-site metrics (epsilon, num-examples, ...) still travel in the clear: they are
needed for the privacy statement and leak no update. Dropped sites and protocol failures
are logged like any exclusion. Robust per-site checks (privacy/robust.py) cannot apply
here by construction; the config refuses median/trimmed-mean with secure aggregation.

Thresholds: with K sites and ``secagg-max-dropped`` = d, every site's secrets are split
among all K sites and any K - d shares reconstruct them. SecAgg's guarantee against the
server needs K - d > K / 2 (otherwise the server could claim a live site dropped and
unmask it alone), so d < K / 2 is enforced.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, add_gaussian_noise_inplace

from medgen.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

ARRAY_KEYS = "medgen-array-keys"   # fitins config: the names of the legacy parameter list
SECAGG_REFUSED = 4013
REQUIRE_KEY = "require-secure-aggregation"  # node config: the hospital insists


@dataclass(frozen=True)
class SecAggSettings:
    """Protocol parameters. ``clipping_range`` bounds each coordinate of an UPDATE times
    num-examples / max_weight; ``max_weight`` must be >= every site's num-examples.
    ``quantization_range`` 0 picks the finest that cannot overflow: the masked sum of K
    sites' values (each below Q) must stay below the 2^32 modulus, so Q = 2^(32 -
    bit_length(K)) (2^30 for 3 sites; Flower's default 2^22 is 256 times coarser)."""

    num_sites: int
    max_dropped: int = 1
    max_weight: float = 1000.0
    clipping_range: float = 1.0
    quantization_range: int = 0
    modulus_range: int = 2 ** 32
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.num_sites < 3:
            raise ConfigError(f"secure-aggregation needs at least 3 sites (got {self.num_sites}): "
                              "with 2, each site learns the other's update from the sum")
        if not 0 <= self.max_dropped < self.num_sites / 2:
            raise ConfigError(f"run-config field 'secagg-max-dropped' must be in [0, "
                              f"{(self.num_sites - 1) // 2}] for {self.num_sites} sites (a "
                              "reconstruction threshold at or below half the sites lets the server "
                              f"unmask one site); got {self.max_dropped}")

    @property
    def levels(self) -> int:
        return self.quantization_range or 2 ** (32 - self.num_sites.bit_length())

    @property
    def threshold(self) -> int:
        return self.num_sites - self.max_dropped

    @classmethod
    def from_config(cls, config: RunConfig, **overrides: Any) -> "SecAggSettings":
        return cls(num_sites=len(config.site_names), max_dropped=config.secagg_max_dropped,
                   timeout=config.round_timeout, **overrides)

    def workflow(self) -> SecAggPlusWorkflow:
        # shares as a fraction 1.0 = every site holds a share of every other site's secrets;
        # the threshold as the fraction (K - d) / K that Flower rounds back to K - d
        return SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=self.threshold / self.num_sites,
                                  max_weight=self.max_weight, clipping_range=self.clipping_range,
                                  quantization_range=self.levels,
                                  modulus_range=self.modulus_range, timeout=self.timeout)

    def error_bound(self, num_examples: list[float]) -> float:
        """Worst-case per-coordinate error of the aggregated mean update from quantisation
        (each site's stochastic rounding <= one step 2c/Q) and from rounding the weights
        n_i / max_weight to multiples of 1/Q, for updates bounded by c (test oracle)."""
        q = self.levels
        ratios = [round(n / self.max_weight * q) / q for n in num_examples]
        step = 2 * self.clipping_range / q
        return len(ratios) * step / sum(ratios) + self.clipping_range * len(ratios) / (q * sum(ratios))


class SecAggRefused(RuntimeError):
    """The site refuses to contribute to this round's masked sum; the message says why."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


# -- client -------------------------------------------------------------------------------
def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: SecAgg+ requests through Flower's secaggplus_mod, plain ones unchanged.

    Plain train requests are refused when secure aggregation is required: by the
    hospital's own node config (``--node-config 'require-secure-aggregation=true'``, the
    binding form: the coordinator cannot switch it off) or by the run config (protects
    against a server that asks for plain updates in a run declared secure).
    """
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if _truthy(context.node_config.get(REQUIRE_KEY)) or _truthy(context.run_config.get("secure-aggregation")):
            return Message(Error(SECAGG_REFUSED, "this run requires secure aggregation; the site "
                                 "refused to send its update in the clear"), reply_to=msg)
        return call_next(msg, context)
    try:
        return secaggplus_mod(msg, context, _LegacyBridge(call_next))
    except SecAggRefused as err:
        log.warning("secure aggregation: %s", err)
        return Message(Error(err.code, str(err)), reply_to=msg)


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


@dataclass
class _LegacyBridge:
    """FitIns -> the plain train message -> the plain reply -> FitRes holding the update."""

    call_next: ClientAppCallable

    def __call__(self, msg: Message, context: Context) -> Message:
        settings = msg.content.config_records["fitins.config"]
        keys = [str(k) for k in settings[ARRAY_KEYS]]
        legacy = msg.content.array_records["fitins.parameters"]
        incoming = [bytes_to_ndarray(legacy[k].data) for k in sorted(legacy, key=int)]
        if len(keys) != len(incoming):
            raise SecAggRefused(SECAGG_REFUSED, f"the request names {len(keys)} arrays but carries "
                                f"{len(incoming)}; refusing to train on a malformed request")
        config = ConfigRecord({k: v for k, v in settings.items() if k != ARRAY_KEYS})
        plain = Message(RecordDict({"arrays": ArrayRecord({k: Array(a) for k, a in zip(keys, incoming)}),
                                    "config": config}), metadata=msg.metadata)
        reply = self.call_next(plain, context)
        if reply.has_error():
            raise SecAggRefused(int(reply.error.code), str(reply.error.reason))
        arrays = next(iter(reply.content.array_records.values()))
        metrics = next(iter(reply.content.metric_records.values()))
        update = _update(keys, incoming, arrays)
        num_examples = int(metrics["num-examples"])
        _check_quantisable(update, num_examples, context)
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), num_examples,
                        {k: v for k, v in metrics.items() if k != "num-examples"})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _update(keys: list[str], incoming: list[np.ndarray], arrays: ArrayRecord) -> list[np.ndarray]:
    if list(arrays.keys()) != keys and sorted(arrays.keys()) != sorted(keys):
        raise SecAggRefused(SECAGG_REFUSED, "the trained weights do not match the requested arrays")
    update = []
    for key, before in zip(keys, incoming):
        after = arrays[key].numpy()
        delta = np.asarray(after, np.float64) - np.asarray(before, np.float64)
        if delta.shape != before.shape or not np.all(np.isfinite(delta)):
            raise SecAggRefused(SECAGG_REFUSED, f"local update of '{key}' is not finite or has the "
                                "wrong shape; the site does not add it to the masked sum")
        update.append(delta)
    return update


def _check_quantisable(update: list[np.ndarray], num_examples: int, context: Context) -> None:
    """Refuse what Flower would silently clip (and so corrupt the sum): a weight above
    max_weight, or a weighted update coordinate outside [-clipping_range, clipping_range]."""
    protocol = context.state.config_records.get(RECORD_KEY_STATE, {})
    max_weight = float(protocol.get("max_weight", 0.0) or 0.0)
    clipping_range = float(protocol.get("clipping_range", 0.0) or 0.0)
    if max_weight <= 0 or clipping_range <= 0:
        return  # not set up yet: secaggplus_mod itself refuses out-of-order stages
    if num_examples > max_weight:
        raise SecAggRefused(SECAGG_REFUSED, f"this site's weight ({num_examples} patients) exceeds "
                            f"the protocol's max_weight {max_weight:g}; the coordinator must raise it")
    peak = max((float(np.max(np.abs(u))) for u in update if u.size), default=0.0)
    if peak * num_examples / max_weight > clipping_range:
        raise SecAggRefused(SECAGG_REFUSED, "this site's update exceeds the secure-aggregation "
                            "quantisation range; the coordinator must raise clipping_range")


# -- server -------------------------------------------------------------------------------
@dataclass
class RoundOutcome:
    server_round: int
    per_site: dict[str, dict[str, float]]
    excluded: list[dict[str, str]]
    aggregate: dict[str, float]
    accepted: bool


class _SumToGlobal(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow drives: global weights out, mean update in."""

    def __init__(self, keys: list[str], dtypes: dict[str, np.dtype], site_names: tuple[str, ...],
                 grid: Grid, train_config: dict[str, Any], min_sites: int):
        self.keys, self.dtypes, self.site_names = keys, dtypes, site_names
        self.grid, self.train_config, self.min_sites = grid, train_config, min_sites
        self.outcome: RoundOutcome | None = None
        self.noise_std = 0.0
        self.sampled: list[int] = []
        self.node_sites: dict[int, str] = {}  # learnt from valid metrics, for the run log
        self.absolute_round = 0
        self.global_arrays: dict[str, np.ndarray] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        config = {**self.train_config, "absolute-round": self.absolute_round, ARRAY_KEYS: list(self.keys)}
        nodes = sorted(self.grid.get_node_ids())
        self.sampled = list(nodes)
        return [(GridClientProxy(n, self.grid, self.grid.run.run_id), FitIns(parameters, dict(config)))
                for n in nodes]

    def aggregate_fit(self, server_round, results, failures):
        from medgen.server.strategy import AcceptedReply, aggregate_site_metrics

        answered = {proxy.node_id for proxy, _ in results}
        excluded = [{"site": self.node_sites.get(node, f"node-{node}"),
                     "reason": "dropped out of secure aggregation (no masked update, or an error reply)"}
                    for node in self.sampled if node not in answered]
        sites, problems = [], []
        for proxy, fitres in results:
            site, why = _site_metrics(fitres, self.site_names)
            if why:
                problems.append({"site": f"node-{proxy.node_id}", "reason": why})
            else:
                self.node_sites[proxy.node_id] = site.site
                sites.append(site)
        per_site = {s.site: s.metrics for s in sites}
        if problems or len(results) < self.min_sites:
            why = "invalid site metrics" if problems else f"{len(results)} sites < min-sites {self.min_sites}"
            self.outcome = RoundOutcome(self.absolute_round, per_site, excluded + problems,
                                        {"kept-previous-weights": 1.0, "sites": float(len(sites))}, False)
            log.warning("round %d: secure aggregate discarded (%s): keeping the previous global "
                        "weights", self.absolute_round, why)
            return None, {}
        mean_update = parameters_to_ndarrays(results[0][1].parameters)  # the same sum for all
        new_global, why = _apply(self.keys, self.dtypes, self.global_arrays, mean_update)
        if why:
            self.outcome = RoundOutcome(self.absolute_round, per_site, excluded + [
                {"site": "aggregate", "reason": why}], {"kept-previous-weights": 1.0}, False)
            log.warning("round %d: %s: keeping the previous global weights", self.absolute_round, why)
            return None, {}
        if self.noise_std > 0:  # client-level DP (privacy/client_dp.py): noise on the sum only
            add_gaussian_noise_inplace(mean_update, self.noise_std)
        metrics = aggregate_site_metrics([AcceptedReply(s.site, s.num_examples, {}, s.metrics) for s in sites])
        metrics["secure-aggregation"] = 1.0
        if self.noise_std > 0:
            metrics["client-dp-noise-std"] = self.noise_std
        self.global_arrays = new_global
        self.outcome = RoundOutcome(self.absolute_round, per_site, excluded, metrics, True)
        return ndarrays_to_parameters([new_global[k] for k in self.keys]), {}

    # the rest of the legacy interface is unused: evaluation is the coordinator's own
    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


@dataclass(frozen=True)
class _SiteMetrics:
    site: str
    num_examples: float
    metrics: dict[str, float]


def _site_metrics(fitres: FitRes, site_names: tuple[str, ...]) -> tuple[_SiteMetrics | None, str | None]:
    metrics = {k: v for k, v in fitres.metrics.items()}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            return None, f"metric '{key}' must be a finite number"
    index = metrics.get("site-index")
    if index is None or index != int(index) or not 0 <= int(index) < len(site_names):
        return None, f"metric 'site-index' must be an integer in [0, {len(site_names)})"
    if fitres.num_examples <= 0:
        return None, "num-examples must be > 0"
    values = {k: float(v) for k, v in metrics.items()}
    values["num-examples"] = float(fitres.num_examples)
    return _SiteMetrics(site_names[int(index)], float(fitres.num_examples), values), None


def _apply(keys, dtypes, global_arrays, mean_update) -> tuple[dict[str, np.ndarray], str | None]:
    if len(mean_update) != len(keys):
        return {}, f"aggregate holds {len(mean_update)} arrays, the model {len(keys)}"
    out = {}
    for key, delta in zip(keys, mean_update):
        before = global_arrays[key]
        if delta.shape != before.shape or not np.all(np.isfinite(delta)):
            return {}, f"aggregated update of '{key}' is not finite or has the wrong shape"
        value = np.asarray(before, np.float64) + delta
        dtype = dtypes[key]
        out[key] = (np.rint(value) if np.issubdtype(dtype, np.integer) else value).astype(dtype)
    return out, None


@dataclass
class SecureAggregationRounds:
    """Runs ``num_rounds`` SecAgg+ rounds from ``initial``; after each, ``on_round_end``
    (the same evaluate_fn the plain path uses: checkpoint, evaluation) and the run log."""

    settings: SecAggSettings
    site_names: tuple[str, ...]
    min_sites: int
    run_log: Any = None                       # medgen.server.run_log.RunDir or None
    round_offset: int = 0
    client_dp: Any = None                     # medgen.privacy.client_dp.ClientLevelDP or None
    wait_for_nodes: float = 300.0
    outcomes: list[RoundOutcome] = field(default_factory=list)

    def run(self, grid: Grid, initial: ArrayRecord, num_rounds: int, train_config: dict[str, Any],
            on_round_end: Callable[[int, ArrayRecord], Any] | None = None,
            context: Context | None = None) -> ArrayRecord:
        keys = list(initial.keys())
        arrays = {k: initial[k].numpy() for k in keys}
        train_config = dict(train_config)
        if self.client_dp is not None:  # sites clip (client_clipping_mod), the server adds noise
            train_config[KEY_CLIPPING_NORM] = float(self.client_dp.clipping_norm)
        strategy = _SumToGlobal(keys, {k: a.dtype for k, a in arrays.items()}, self.site_names, grid,
                                train_config, self.min_sites)
        strategy.noise_std = self.client_dp.noise_std if self.client_dp is not None else 0.0
        strategy.global_arrays = arrays
        base = context or Context(run_id=grid.run.run_id, node_id=0, node_config={},
                                  state=RecordDict(), run_config={})
        legacy = LegacyContext(base, strategy=strategy)
        workflow = self.settings.workflow()
        for server_round in range(1, num_rounds + 1):
            self._wait_for_nodes(grid)
            strategy.absolute_round = self.round_offset + server_round
            strategy.outcome = None
            legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                ndarrays_to_parameters([strategy.global_arrays[k] for k in keys]), keep_input=True)
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
                {WorkflowKey.CURRENT_ROUND: strategy.absolute_round})
            workflow(grid, legacy)
            outcome = strategy.outcome or RoundOutcome(
                strategy.absolute_round, {}, [{"site": "all", "reason": "secure aggregation halted: "
                                               "too few sites answered to unmask the sum"}],
                {"kept-previous-weights": 1.0}, False)
            self._log(outcome)
            if on_round_end is not None:
                on_round_end(server_round, ArrayRecord({k: Array(v) for k, v in strategy.global_arrays.items()}))
        return ArrayRecord({k: Array(v) for k, v in strategy.global_arrays.items()})

    def _wait_for_nodes(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.wait_for_nodes
        while len(list(grid.get_node_ids())) < max(self.min_sites, self.settings.threshold):
            if time.monotonic() > deadline:
                raise RuntimeError(f"secure aggregation needs {self.settings.threshold} connected sites; "
                                   f"only {len(list(grid.get_node_ids()))} after {self.wait_for_nodes:.0f} s")
            time.sleep(1.0)

    def _log(self, outcome: RoundOutcome) -> None:
        self.outcomes.append(outcome)
        for item in outcome.excluded:
            log.warning("round %d: excluded %s: %s", outcome.server_round, item["site"], item["reason"])
        if self.run_log is not None:
            self.run_log.log_train(outcome.server_round, outcome.per_site, outcome.excluded, outcome.aggregate)
