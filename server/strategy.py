"""Validating FedAvg: Flower's FedAvg with every train reply going through the server's
one aggregation pipeline (server/aggregation.py) BEFORE it can touch the global model.

Flower keeps what it is good at (sampling, message construction, the round loop, the
evaluate_fn callback); ``aggregate_train`` hands the replies to the pipeline, which
validates, binds nodes to sites, bounds example counts, screens, combines, takes site rows
from their own site, adds client-level noise and writes the run log. The SecAgg+ strategy
(privacy/secagg.py) and the in-process runner (server/inprocess.py) use the same pipeline.

Client-level DP: the pipeline adds the noise; this strategy only sends the clipping norm to
the sites (``client_clipping_mod``), as Flower's client-side fixed-clipping wrapper does.

The names below are re-exported for the code and tests that import them from here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medgen.privacy.site_update import (AcceptedReply, ArraySpec, RejectedReply, specs_of,  # noqa: F401
                                        weighted_average)
from medgen.server.aggregation import AggregationPipeline, aggregate_site_metrics  # noqa: F401
from medgen.server.federated_eval import FederatedEvaluation
from medgen.server.validation import SITE_KEY, WEIGHT_KEY, ReplyValidator, SiteReply  # noqa: F401

log = logging.getLogger(__name__)


def site_rows_from_own_site(averaged, replies, current, keys, site_names) -> dict[str, np.ndarray]:
    """Row k of each site-indexed array = the weighted mean of site k's replies' row k (the
    pipeline's rule, without its row bound): for recipes' tests and benches that assemble
    rows by hand. Rows of sites that did not answer keep the current value."""
    out = dict(averaged)
    for key in keys:
        rows = np.array(current[key], copy=True)
        for position, site in enumerate(site_names):
            own = [r for r in replies if r.site == site]
            if own:
                total = sum(r.num_examples for r in own)
                rows[position] = sum(np.asarray(r.arrays[key][position], np.float64) * (r.num_examples / total)
                                     for r in own)
        out[key] = rows.astype(np.asarray(averaged[key]).dtype)
    return out


def simulated_dropout(replies: list[Message], fraction: float, seed: int, absolute_round: int
                      ) -> tuple[list[Message], list[int]]:
    """Simulation's ``simulate-dropout``: lose round(fraction * n) of a round's n replies,
    drawn from (seed, round) over the replies in node order; returns (kept, lost node ids).

    A lost reply is one that failed or never came AFTER its site trained: the site spent its
    budget (its own ledger says so) and the server never sees the update, exactly as when a
    hospital's link drops mid-reply. Nothing of it reaches the pipeline or the run log's
    site list; the round then trains if min-sites replies remain, else keeps the weights."""
    ordered = sorted(replies, key=lambda m: m.metadata.src_node_id)
    count = int(round(fraction * len(ordered)))
    if count == 0:
        return ordered, []
    lost = set(np.random.default_rng([seed, 19, absolute_round]).choice(len(ordered), count, replace=False))
    return ([m for i, m in enumerate(ordered) if i not in lost],
            sorted(int(ordered[i].metadata.src_node_id) for i in lost))


class ValidatingFedAvg(FedAvg):
    """Flower FedAvg whose aggregation is ``pipeline``; rounds are absolute.

    ``round_offset`` is the round the run resumed from: Flower counts rounds from 1 in
    every ``start``; clients, checkpoints and the run log see absolute rounds.
    ``dropout`` (run config ``simulate-dropout``, with ``seed``): the fraction of each
    round's train replies dropped before aggregation (``simulated_dropout``).
    """

    def __init__(self, pipeline: AggregationPipeline, round_offset: int = 0,
                 federated_eval: FederatedEvaluation | None = None, dropout: float = 0.0,
                 seed: int = 0) -> None:
        # fraction_evaluate > 0 only tells Flower's summary that evaluation exists; which
        # rounds evaluate and which nodes are asked is ``federated_eval``'s decision
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0 if federated_eval else 0.0,
                         min_train_nodes=pipeline.min_sites, min_available_nodes=pipeline.min_sites)
        self.pipeline = pipeline
        self.round_offset = round_offset
        self.federated_eval = federated_eval
        self.current: dict[str, np.ndarray] | None = None  # this round's global weights
        self.last = None                                     # the last RoundResult
        self.dropout, self.seed = dropout, seed

    @property
    def min_sites(self) -> int:
        return self.pipeline.min_sites

    def absolute(self, server_round: int) -> int:
        return self.round_offset + server_round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["absolute-round"] = self.absolute(server_round)
        config["server-round"] = server_round
        if self.pipeline.client_dp is not None:  # the sites clip; the pipeline adds the noise
            config[KEY_CLIPPING_NORM] = float(self.pipeline.client_dp.clipping_norm)
        self.current = {k: a.numpy() for k, a in arrays.items()}
        # Wait for min-sites only, then send to every node online NOW. FedAvg counts the
        # online nodes and then waits for that many again, so a hospital leaving in
        # between stalls the round until it returns (seen in the deployment e2e test).
        sample_nodes(grid, self.min_sites, self.min_sites)
        node_ids = list(grid.get_node_ids())
        self.pipeline.binding.reconcile(node_ids)
        log.info("round %d: sending to %d site(s)", config["absolute-round"], len(node_ids))
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.dropout > 0:
            replies, lost = simulated_dropout(replies, self.dropout, self.seed, self.absolute(server_round))
            log.warning("round %d: simulate-dropout lost the replies of node(s) %s",
                        self.absolute(server_round), lost)
        self.last = self.pipeline.aggregate(self.absolute(server_round),
                                            [SiteReply.from_message(m) for m in replies], self.current)
        if not self.last.accepted:
            return None, None
        return (ArrayRecord({k: Array(v) for k, v in self.last.arrays.items()}),
                MetricRecord(dict(self.last.metrics)))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation (server/federated_eval.py) after a round that trained and
        is due; every node online now is asked, each answers for its own site."""
        absolute = self.absolute(server_round)
        if self.federated_eval is None or not self.federated_eval.due(absolute) or \
                self.last is None or not self.last.accepted:
            return []
        node_ids = list(grid.get_node_ids())
        log.info("round %d: federated evaluation at %d site(s)", absolute, len(node_ids))
        return self.federated_eval.messages(node_ids, absolute, arrays, dict(config))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        if self.federated_eval is None or not replies:
            return None
        return self.federated_eval.collect(self.absolute(server_round), replies)
