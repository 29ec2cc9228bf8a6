"""Validating FedAvg: every train reply is checked BEFORE it can touch the global model.

Composition, not branches: ``ReplyValidator`` is a small standalone check (usable by any
strategy later), ``weighted_average`` / ``aggregate_site_metrics`` are plain functions with
numpy oracles in the tests, and ``ValidatingFedAvg`` only wires them into Flower's FedAvg
(sampling, message construction and the round loop stay Flower's).

A reply is excluded, with its reason logged and written to the run log, when it carries an
error (e.g. a site that refused because its privacy budget is spent), when it does not
hold exactly one ArrayRecord and one MetricRecord, when the arrays' keys, shapes or dtypes
differ from the global model's shared state, when any value is not finite, or when
num-examples is not a positive number. Fewer than ``min_sites`` valid replies: the round
keeps the previous global weights.

Metrics: epsilon (and delta) aggregate as the MAX over sites, never a mean: the federation's
privacy statement is the worst site's. Other metrics are weighted by num-examples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from medgen.server.run_log import RunDir

log = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"
SITE_KEY = "site-index"
MAX_AGGREGATED = ("epsilon", "delta")


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class AcceptedReply:
    site: str
    num_examples: float
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


@dataclass(frozen=True)
class RejectedReply:
    site: str
    reason: str


def specs_of(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    return {k: ArraySpec(tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in arrays.items()}


@dataclass
class ReplyValidator:
    """Checks one train reply against the expected shared state; returns a verdict."""

    expected: Mapping[str, ArraySpec]
    site_names: tuple[str, ...]
    node_sites: dict[int, str] = field(default_factory=dict)  # learnt from valid replies

    def site_of(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        return self.node_sites.get(node, f"node-{node}")

    def check(self, msg: Message) -> AcceptedReply | RejectedReply:
        if msg.has_error():
            return RejectedReply(self.site_of(msg), f"site replied with an error: {msg.error.reason}")
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return RejectedReply(self.site_of(msg), "reply must hold exactly one ArrayRecord and "
                                 f"one MetricRecord (got {len(content.array_records)} and "
                                 f"{len(content.metric_records)})")
        if len(content.config_records) != 0:
            return RejectedReply(self.site_of(msg), "reply must not carry a ConfigRecord")
        metrics = next(iter(content.metric_records.values()))
        site, why = self._site(metrics)
        if why:
            return RejectedReply(self.site_of(msg), why)
        self.node_sites[msg.metadata.src_node_id] = site
        why = _check_metrics(metrics)
        if why:
            return RejectedReply(site, why)
        arrays = next(iter(content.array_records.values()))
        numpy_arrays, why = self._arrays(arrays)
        if why:
            return RejectedReply(site, why)
        values = {k: float(v) for k, v in metrics.items()}
        return AcceptedReply(site, values[WEIGHT_KEY], numpy_arrays, values)

    def _site(self, metrics: MetricRecord) -> tuple[str, str | None]:
        index = metrics.get(SITE_KEY)
        if not isinstance(index, (int, float)) or isinstance(index, bool) or index != int(index) \
                or not 0 <= int(index) < len(self.site_names):
            return "", f"metric '{SITE_KEY}' must be an integer in [0, {len(self.site_names)}), got {index!r}"
        return self.site_names[int(index)], None

    def _arrays(self, arrays: ArrayRecord) -> tuple[dict[str, np.ndarray], str | None]:
        got, want = set(arrays.keys()), set(self.expected)
        if got != want:
            missing, extra = sorted(want - got), sorted(got - want)
            return {}, f"array keys differ from the global model (missing {missing[:5]}, unexpected {extra[:5]})"
        out = {}
        for key in self.expected:
            spec, array = self.expected[key], arrays[key]
            if tuple(array.shape) != spec.shape or str(array.dtype) != spec.dtype:
                return {}, (f"array '{key}' is {tuple(array.shape)} {array.dtype}, "
                            f"expected {spec.shape} {spec.dtype}")
            value = array.numpy()
            if value.shape != spec.shape or not np.all(np.isfinite(value)):
                return {}, f"array '{key}' has non-finite values"
            out[key] = value
        return out, None


def _check_metrics(metrics: MetricRecord) -> str | None:
    for key, value in metrics.items():
        if isinstance(value, list) or isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric '{key}' must be a single number"
        if not math.isfinite(value):
            return f"metric '{key}' is not finite"
    weight = metrics.get(WEIGHT_KEY)
    if weight is None or weight <= 0:
        return f"metric '{WEIGHT_KEY}' must be > 0, got {weight!r}"
    return None


def weighted_average(replies: list[AcceptedReply], specs: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """FedAvg: sum_i w_i x_i / sum_i w_i, in float64, cast back to each array's dtype."""
    total = sum(r.num_examples for r in replies)
    out = {}
    for key, spec in specs.items():
        acc = sum(np.asarray(r.arrays[key], dtype=np.float64) * (r.num_examples / total) for r in replies)
        dtype = np.dtype(spec.dtype)
        out[key] = (np.rint(acc) if np.issubdtype(dtype, np.integer) else acc).astype(dtype)
    return out


def site_rows_from_own_site(averaged: Mapping[str, np.ndarray], replies: list[AcceptedReply],
                            current: Mapping[str, np.ndarray], keys: tuple[str, ...],
                            site_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Row k of a site-indexed array comes from site k's replies only.

    A recipe's per-site rows (a site embedding, a per-site contrast table) are trained only
    at their own site; averaging them with K-1 untouched copies would shrink that site's
    update K-fold. Rows of sites that did not answer keep the current global value.
    """
    out = dict(averaged)
    index = {name: i for i, name in enumerate(site_names)}
    for key in keys:
        rows = np.array(current[key], copy=True)
        for site, position in index.items():
            own = [r for r in replies if r.site == site]
            if own:
                total = sum(r.num_examples for r in own)
                rows[position] = sum(np.asarray(r.arrays[key][position], dtype=np.float64)
                                     * (r.num_examples / total) for r in own)
        out[key] = rows.astype(np.asarray(averaged[key]).dtype)
    return out


def aggregate_site_metrics(replies: list[AcceptedReply]) -> dict[str, float]:
    """epsilon/delta: max over sites; other metrics: num-examples-weighted mean."""
    total = sum(r.num_examples for r in replies)
    keys = sorted(set().union(*(r.metrics for r in replies)) - {WEIGHT_KEY, SITE_KEY})
    out: dict[str, float] = {WEIGHT_KEY: float(total), "sites": float(len(replies))}
    for key in keys:
        present = [r for r in replies if key in r.metrics]
        if key in MAX_AGGREGATED:
            out[key] = max(r.metrics[key] for r in present)
        else:
            weight = sum(r.num_examples for r in present)
            out[key] = sum(r.metrics[key] * r.num_examples for r in present) / weight
    return out


class ValidatingFedAvg(FedAvg):
    """Flower FedAvg with validated replies, max-epsilon metrics and absolute rounds.

    ``round_offset`` is the round the run resumed from: Flower counts rounds from 1 in
    every ``start``; clients, checkpoints and the run log see absolute rounds.
    """

    def __init__(self, *, expected: ArrayRecord, site_names: tuple[str, ...], min_sites: int,
                 run_dir: RunDir | None, round_offset: int = 0, aggregator: Any = None,
                 site_indexed_keys: tuple[str, ...] = ()) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_sites,
                         min_available_nodes=min_sites)
        # robust aggregation (medgen.privacy.robust.RobustAggregator): screen() rejects
        # updates far outside the round's distribution, combine() replaces the mean
        self.aggregator = aggregator
        self.site_indexed_keys = tuple(site_indexed_keys)
        self.current: dict[str, np.ndarray] | None = None  # this round's global weights
        self.specs = specs_of(expected)
        self.validator = ReplyValidator(self.specs, site_names)
        self.site_names = tuple(site_names)
        self.min_sites = min_sites
        self.run_dir = run_dir
        self.round_offset = round_offset

    def absolute(self, server_round: int) -> int:
        return self.round_offset + server_round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["absolute-round"] = self.absolute(server_round)
        config["server-round"] = server_round
        self.current = {k: a.numpy() for k, a in arrays.items()}
        # Wait for min-sites only, then send to every node online NOW. FedAvg counts the
        # online nodes and then waits for that many again, so a hospital leaving in
        # between stalls the round until it returns (seen in the deployment e2e test).
        sample_nodes(grid, self.min_sites, self.min_sites)
        node_ids = list(grid.get_node_ids())
        log.info("round %d: sending to %d site(s)", config["absolute-round"], len(node_ids))
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_ = self.absolute(server_round)
        accepted, rejected = [], []
        for msg in replies:
            verdict = self.validator.check(msg)
            (accepted if isinstance(verdict, AcceptedReply) else rejected).append(verdict)
        if self.aggregator is not None:
            accepted, screened = self.aggregator.screen(accepted, self.current)
            rejected += screened
        for r in rejected:
            log.warning("round %d: excluded reply from %s: %s", round_, r.site, r.reason)
        per_site = {r.site: r.metrics for r in accepted}
        excluded = [{"site": r.site, "reason": r.reason} for r in rejected]
        if len(accepted) < self.min_sites:
            log.warning("round %d: %d valid replies < min-sites %d: keeping the previous global "
                        "weights", round_, len(accepted), self.min_sites)
            self._log(round_, per_site, excluded, {"kept-previous-weights": 1.0,
                                                   "sites": float(len(accepted))})
            return None, None
        averaged = (self.aggregator.combine(accepted, self.specs) if self.aggregator is not None
                    else weighted_average(accepted, self.specs))
        if self.site_indexed_keys:
            averaged = site_rows_from_own_site(averaged, accepted, self.current,
                                               self.site_indexed_keys, self.site_names)
        metrics = aggregate_site_metrics(accepted)
        self._log(round_, per_site, excluded, metrics)
        return (ArrayRecord({k: Array(v) for k, v in averaged.items()}),
                MetricRecord({k: v for k, v in metrics.items()}))

    def _log(self, round_: int, per_site, excluded, aggregate) -> None:
        if self.run_dir is not None:
            self.run_dir.log_train(round_, per_site, excluded, aggregate)
