"""A simulated hospital in this process: the client's real round, called directly.

What ``medgen.server.inprocess.InProcessRunner`` calls for each site (benches, tests): the
same ``train_round`` the ClientApp runs per train message (site data, privacy ledger,
reply store, DP-SGD), at the node a simulated partition resolves to (client/node.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import RecordDict

from medgen.client.rounds import train_round
from medgen.client.node import NodeSetup, resolve_node
from medgen.config import RunConfig


@dataclass(frozen=True)
class SimulatedSite:
    """One simulated hospital: ``train_round`` at its node."""

    config: RunConfig
    node: NodeSetup

    def __call__(self, content: RecordDict) -> RecordDict:
        return train_round(self.config, self.node, content)


def simulated_sites(config: RunConfig) -> list[SimulatedSite]:
    """Site i = partition i of the simulated federation (data-root and state-root set)."""
    count = len(config.site_names)
    return [SimulatedSite(config, resolve_node(config, {"partition-id": i, "num-partitions": count}))
            for i in range(count)]
