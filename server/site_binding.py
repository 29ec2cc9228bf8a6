"""Which Flower node speaks for which site, for the whole run, and what each site declared.

A reply names its site with the ``site-index`` metric, which the site itself writes: on
its own that lets any node speak for any site (overwrite another site's metrics and rows,
and have its own exclusions logged against an innocent site). So:

- the node that first sends a valid claim for site S owns S for the run. Its node id is
  Flower's ``src_node_id``, which the SuperLink sets, not the reply; in deployment with
  SuperNode authentication that id belongs to the node's registered key;
- a later reply from another node claiming S is refused, and logged against the SENDING
  node (its own bound site, else ``node-<id>``); a bound node claiming another site is
  refused the same way;
- if two unbound nodes claim the same site in one round, nobody can tell which is honest:
  both are refused and the site stays unbound; a node sending two replies in one round is
  refused too;
- the binding is written to ``<run-dir>/site_binding.json`` after every change, so a
  restarted coordinator keeps it: an error reply is logged by site as soon as its node has
  answered validly once in the run, before or after a restart (never from the reply's own
  words: an error reason is self-declared).
  A restart whose SuperLink lost its node ids (none of the bound nodes is connected, e.g. a
  new simulation) starts a new binding (logged); a fresh run (round 0) always does.

It also keeps the num-examples each site declared in its first bound round: later rounds
are weighted by at most that (server/aggregation.py, ``bounded_weights``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medgen.atomic import atomic_write_json

log = logging.getLogger(__name__)

BINDING_FILE = "site_binding.json"


@dataclass
class SiteBinding:
    path: Path | None = None
    site_of_node: dict[int, str] = field(default_factory=dict)
    first_examples: dict[str, float] = field(default_factory=dict)

    @classmethod
    def at(cls, run_dir: Path | None, fresh: bool) -> "SiteBinding":
        """The run's binding, loaded from ``run_dir`` unless ``fresh`` (a new run)."""
        path = Path(run_dir) / BINDING_FILE if run_dir is not None else None
        if path is None or fresh or not path.exists():
            binding = cls(path)
            binding.save()
            return binding
        data = json.loads(path.read_text())
        return cls(path, {int(n): str(s) for n, s in data.get("site_of_node", {}).items()},
                   {str(s): float(v) for s, v in data.get("first_examples", {}).items()})

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"site_of_node": {str(n): s for n, s in sorted(self.site_of_node.items())},
                                          "first_examples": dict(sorted(self.first_examples.items()))})

    @property
    def node_of_site(self) -> dict[str, int]:
        return {site: node for node, site in self.site_of_node.items()}

    def name_of(self, node: int) -> str:
        return self.site_of_node.get(int(node), f"node-{node}")

    def reconcile(self, connected: Iterable[int]) -> None:
        """Forget a binding whose nodes are all gone (the SuperLink's ids were reset)."""
        connected = {int(n) for n in connected}
        if self.site_of_node and connected and not connected & set(self.site_of_node):
            log.warning("none of the bound nodes %s is connected (connected: %s): the SuperLink "
                        "has new node ids; binding sites anew", sorted(self.site_of_node), sorted(connected))
            self.site_of_node.clear()
            self.save()

    def resolve(self, claims: Sequence[tuple[int, str]]) -> dict[int, str]:
        """For one round's claims ``(node, site)``: {position: reason} of those refused.
        Accepted claims by unbound nodes bind them (saved)."""
        refused: dict[int, str] = {}
        per_node = Counter(node for node, _ in claims)
        owners = self.node_of_site
        candidates: dict[str, set[int]] = defaultdict(set)
        for position, (node, site) in enumerate(claims):
            bound = self.site_of_node.get(node)
            if per_node[node] > 1:
                refused[position] = f"node {node} sent {per_node[node]} replies in one round"
            elif bound is not None and bound != site:
                refused[position] = (f"node {node} is site {bound} for this run but claimed site "
                                     f"{site}: a node cannot speak for another site")
            elif bound is None and site in owners:
                refused[position] = (f"claimed site {site}, which belongs to node {owners[site]} "
                                     "for this run")
            elif bound is None:
                candidates[site].add(node)
        for position, (node, site) in enumerate(claims):
            if position not in refused and self.site_of_node.get(node) is None and len(candidates[site]) > 1:
                refused[position] = (f"duplicate site-index: nodes {sorted(candidates[site])} all "
                                     f"claimed site {site} in one round; none is bound to it")
        new = {node: site for position, (node, site) in enumerate(claims)
               if position not in refused and node not in self.site_of_node}
        if new:
            self.site_of_node.update(new)
            log.info("bound node(s) to site(s) for this run: %s", new)
            self.save()
        return refused

    def first_declared(self, site: str, declared: float) -> float:
        """The num-examples ``site`` declared in its first bound round (recorded now if new)."""
        if site not in self.first_examples:
            self.first_examples[site] = float(declared)
            self.save()
        return self.first_examples[site]
