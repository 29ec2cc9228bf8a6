"""Which site this node is and where its data and state live.

Two sources, one result (``NodeSetup``):
- simulation: Flower gives each simulated node a ``partition-id``; partition i is site
  ``config.site_names[i]``, its data ``<data-root>/sites/<site>``, its node-local state
  ``<state-root>/<site>``, the public anatomy bank ``<data-root>/public``;
- deployment: the hospital's SuperNode is started with
  ``--node-config 'site="A" data-dir="..." state-dir="..." public-dir="..." epsilon-cap=3.0'``
  (epsilon-cap optional: the site's own ceiling, never looser than the run's target;
  ``trainer="warm"``, written by medgen-client, sends the rounds to the hospital's warm
  trainer, client/worker_channel.py; the node it resolves to is the same).

The state directory holds everything that must survive rounds, runs and restarts and
never leaves the node: the privacy ledger, the tensor cache, local-only weights and
optimizer state, and the stored replies used for replay safety.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from medgen.config import ConfigError, RunConfig

DEPLOYMENT_KEYS = ("site", "data-dir", "state-dir", "public-dir")


@dataclass(frozen=True)
class NodeSetup:
    site: str
    site_index: int
    data_dir: Path
    state_dir: Path
    public_dir: Path
    epsilon_cap: float        # the site's own ceiling (inf if it set none)
    simulated: bool

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "privacy_ledger.json"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    @property
    def local_state_path(self) -> Path:
        return self.state_dir / "local_state.pt"

    @property
    def replies_dir(self) -> Path:
        return self.state_dir / "replies"

    def target_epsilon(self, config: RunConfig) -> float:
        """The epsilon this site plans for: the run's target, tightened by its own cap."""
        return min(config.target_epsilon, self.epsilon_cap)


def resolve_node(config: RunConfig, node_config: Mapping[str, Any]) -> NodeSetup:
    if "partition-id" in node_config:
        return _simulated(config, node_config)
    return _deployed(config, node_config)


def _simulated(config: RunConfig, node_config: Mapping[str, Any]) -> NodeSetup:
    pid, count = int(node_config["partition-id"]), int(node_config.get("num-partitions", -1))
    sites = config.site_names
    if count != -1 and count != len(sites):
        raise ConfigError(f"simulation has {count} nodes but run-config field 'sites' names "
                          f"{len(sites)} ({config.sites}); set num-supernodes to {len(sites)}")
    if not config.data_root or not config.state_root:
        raise ConfigError("simulation needs run-config fields 'data-root' and 'state-root' "
                          "(absolute paths); medgen-server simulate sets them")
    site = sites[pid]
    root = Path(config.data_root)
    return NodeSetup(site=site, site_index=pid, data_dir=root / "sites" / site,
                     state_dir=Path(config.state_root) / site, public_dir=root / "public",
                     epsilon_cap=math.inf, simulated=True)


def _deployed(config: RunConfig, node_config: Mapping[str, Any]) -> NodeSetup:
    missing = [k for k in DEPLOYMENT_KEYS if not node_config.get(k)]
    if missing:
        raise ConfigError(f"SuperNode --node-config is missing {', '.join(missing)}; start the node "
                          "with --node-config 'site=\"A\" data-dir=\"/data/A\" state-dir=\"/var/lib/"
                          "medgen/A\" public-dir=\"/data/public\"'")
    site = str(node_config["site"])
    if site not in config.site_names:
        raise ConfigError(f"this node is site {site!r}, which is not in the run's sites "
                          f"({config.sites}); ask the coordinator to add it")
    cap = epsilon_cap(node_config)
    return NodeSetup(site=site, site_index=config.site_names.index(site),
                     data_dir=Path(str(node_config["data-dir"])),
                     state_dir=Path(str(node_config["state-dir"])),
                     public_dir=Path(str(node_config["public-dir"])),
                     epsilon_cap=cap, simulated=False)


def epsilon_cap(node_config: Mapping[str, Any]) -> float:
    """The site's own ceiling from node-config 'epsilon-cap' (absent: math.inf, no cap of its
    own). NaN, inf, zero, negative and non-numbers are refused: ``min(target, nan)`` would
    silently drop the cap (issue 13)."""
    if "epsilon-cap" not in node_config:
        return math.inf
    cap = node_config["epsilon-cap"]
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise ConfigError(f"node-config 'epsilon-cap' must be a finite number > 0, got {cap!r}; "
                          "leave it out to use the run's target-epsilon")
    return float(cap)
