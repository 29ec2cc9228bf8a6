"""In-process federation: the product's rounds on one machine, without Flower's transport.

For benches and tests that need many rounds or many variants cheaply. Every round is
aggregated by the SAME ``AggregationPipeline`` as the Flower strategies
(server/aggregation.py). What is left out is only the transport: no Flower messages,
processes or client mods, so the runner applies the one mod that changes a reply,
client-level clipping (``clip_update``, the rule of ``client_clipping_mod``), itself.

A site is any ``SiteTrainer``: a callable from the train request's content (``arrays`` and
``config``) to the reply content (``arrays`` and ``metrics``). The real one is
``medgen.client.simulated_site.SimulatedSite``: the client's REAL round (its data, privacy
ledger, reply store, DP-SGD); the server never imports the client, the caller passes it in.
A bench can wrap it (bench/byzantine.py wraps it in attacks), which keeps attacks out of
the product's code paths. A trainer that raises becomes an error reply, like the
ClientApp's.

Secure aggregation is a transport property (the server sees a masked sum): this runner
refuses configs that ask for it; ``medgen-server simulate`` runs SecAgg+ for real.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

import medgen
from medgen.config import ConfigError, RunConfig
from medgen.privacy.client_dp import clip_update
from medgen.server.aggregation import AggregationPipeline, RoundResult
from medgen.server.validation import SiteReply

log = logging.getLogger(__name__)

SiteTrainer = Callable[[RecordDict], RecordDict]
FIRST_NODE_ID = 1001  # simulated node ids: 1001, 1002, ... (Flower's are random 64-bit)


@dataclass
class InProcessRunner:
    config: RunConfig
    pipeline: AggregationPipeline
    sites: Sequence[SiteTrainer]
    run_key: str = "in-process"
    node_ids: Sequence[int] = ()
    results: list[RoundResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.config.secure_aggregation:
            raise ConfigError("the in-process runner aggregates in the clear; run secure-aggregation "
                              "= true through medgen-server simulate (Flower's SecAgg+)")
        self.node_ids = list(self.node_ids) or [FIRST_NODE_ID + i for i in range(len(self.sites))]

    def request(self, server_round: int, current: Mapping[str, np.ndarray]) -> RecordDict:
        config = {"run-key": self.run_key, "absolute-round": server_round, "server-round": server_round,
                  "medgen-version": medgen.__version__}
        return RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in current.items()}),
                           "config": ConfigRecord(config)})

    def ask(self, node: int, site: SiteTrainer, server_round: int, current: Mapping[str, np.ndarray]) -> SiteReply:
        try:
            content = site(self.request(server_round, current))
        except Exception as err:  # noqa: BLE001 - a failing site is an error reply, as in the ClientApp
            log.warning("node %d: round %d failed: %s: %s", node, server_round, type(err).__name__, err)
            return SiteReply(node, error=f"training failed with {type(err).__name__}")
        dp = self.pipeline.client_dp
        if dp is not None and len(content.array_records) == 1:  # what client_clipping_mod does
            name, arrays = next(iter(content.array_records.items()))
            clipped = clip_update(current, {k: a.numpy() for k, a in arrays.items()}, dp.clipping_norm) \
                if set(arrays.keys()) == set(current) else None
            if clipped is not None:
                content[name] = ArrayRecord({k: Array(np.asarray(v)) for k, v in clipped.items()})
        return SiteReply.from_content(node, content)

    def run_round(self, server_round: int, current: Mapping[str, np.ndarray]) -> RoundResult:
        replies = [self.ask(node, site, server_round, current) for node, site in zip(self.node_ids, self.sites)]
        result = self.pipeline.aggregate(server_round, replies, current)
        self.results.append(result)
        return result

    def run(self, initial: Mapping[str, np.ndarray], num_rounds: int, first_round: int = 1,
            on_round_end: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> dict[str, np.ndarray]:
        """``num_rounds`` rounds from ``initial``; returns the final global weights."""
        current = {k: np.asarray(v) for k, v in initial.items()}
        for server_round in range(first_round, first_round + num_rounds):
            result = self.run_round(server_round, current)
            if result.accepted:
                current = result.arrays
            if on_round_end is not None:
                on_round_end(server_round, current)
        return current
