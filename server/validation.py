"""Reply validation: the first stage of the aggregation pipeline (server/aggregation.py).

A reply is checked in this order, and the first failure excludes it with its reason:
1. an error reply (e.g. a site that refused because its privacy budget is spent);
2. structure: exactly one ArrayRecord and one MetricRecord, no ConfigRecord;
3. every metric a single finite number;
4. ``site-index`` an integer naming one of the run's sites (-> a ``Claim``; the pipeline
   then checks the claim against the node-to-site binding, server/site_binding.py);
5. privacy metrics: ``epsilon`` present, finite and in (0, target-epsilon] (a node's plan
   can only tighten the run's target), ``delta`` equal to the run's delta;
6. ``num-examples`` a finite number > 0;
7. arrays: the global model's keys, shapes and dtypes, every value finite.

From 5 on, the site is known and its privacy metrics are well-formed: a reply excluded
later carries its epsilon/delta in the ``RejectedReply`` (it spent that budget).

``SiteReply`` is transport-neutral, so the plain strategy (a Flower Message), the SecAgg+
strategy (a legacy FitRes, no arrays: the server only sees the sum) and the in-process
runner go through the same checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from medgen.privacy.site_update import AcceptedReply, ArraySpec, RejectedReply

WEIGHT_KEY = "num-examples"
SITE_KEY = "site-index"
EPSILON_KEY, DELTA_KEY = "epsilon", "delta"
# the node's ledger refuses above its cap + 1e-9; allow float noise, nothing more
EPSILON_SLACK = 1e-6


@dataclass(frozen=True)
class SiteReply:
    """One site's train reply as the pipeline sees it, whatever carried it."""

    node: int
    error: str | None = None
    metrics: Mapping[str, Any] | None = None
    arrays: ArrayRecord | Mapping[str, np.ndarray] | None = None
    problem: str | None = None      # malformed structure, found when it was unpacked

    @classmethod
    def from_message(cls, msg: Message) -> "SiteReply":
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            return cls(node, error=str(msg.error.reason))
        return cls.from_content(node, msg.content)

    @classmethod
    def from_content(cls, node: int, content: RecordDict) -> "SiteReply":
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return cls(node, problem=(f"reply must hold exactly one ArrayRecord and one MetricRecord "
                                      f"(got {len(content.array_records)} and {len(content.metric_records)})"))
        if len(content.config_records) != 0:
            return cls(node, problem="reply must not carry a ConfigRecord")
        return cls(node, metrics=next(iter(content.metric_records.values())),
                   arrays=next(iter(content.array_records.values())))


@dataclass(frozen=True)
class Claim:
    """A reply whose metrics are well-formed numbers and which names one site."""

    reply: SiteReply
    site: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class ReplyValidator:
    """Stages 1-7 above, one method per stage group; ``check`` runs them all (no binding)."""

    expected: Mapping[str, ArraySpec]
    site_names: tuple[str, ...]
    target_epsilon: float = 10.0
    delta: float = 1e-5

    def claim(self, reply: SiteReply, name_of: Callable[[int], str] = lambda n: f"node-{n}"
              ) -> Claim | RejectedReply:
        sender = name_of(reply.node)
        if reply.error is not None:
            return RejectedReply(sender, f"site replied with an error: {reply.error}", reply.node)
        if reply.problem is not None:
            return RejectedReply(sender, reply.problem, reply.node)
        metrics = dict(reply.metrics or {})
        for key, value in metrics.items():
            if isinstance(value, (list, bool)) or not isinstance(value, (int, float)):
                return RejectedReply(sender, f"metric '{key}' must be a single number", reply.node)
            if not math.isfinite(value):
                return RejectedReply(sender, f"metric '{key}' is not finite", reply.node)
        index = metrics.get(SITE_KEY)
        if index is None or index != int(index) or not 0 <= int(index) < len(self.site_names):
            return RejectedReply(sender, f"metric '{SITE_KEY}' must be an integer in "
                                 f"[0, {len(self.site_names)}), got {index!r}", reply.node)
        return Claim(reply, self.site_names[int(index)], {k: float(v) for k, v in metrics.items()})

    def privacy_problem(self, claim: Claim) -> str | None:
        eps, delta = claim.metrics.get(EPSILON_KEY), claim.metrics.get(DELTA_KEY)
        if eps is None or delta is None:
            return f"metrics '{EPSILON_KEY}' and '{DELTA_KEY}' are required (the privacy statement needs them)"
        if not 0 < eps <= self.target_epsilon * (1 + EPSILON_SLACK):
            return (f"epsilon {eps!r} is impossible: it must be in (0, {self.target_epsilon:g}], "
                    "the run's target-epsilon (a node's own plan can only be tighter)")
        if not math.isclose(delta, self.delta, rel_tol=1e-9, abs_tol=0.0):
            return f"delta {delta!r} differs from the run's delta {self.delta!r}"
        return None

    def examples_problem(self, claim: Claim) -> str | None:
        weight = claim.metrics.get(WEIGHT_KEY)
        if weight is None or weight <= 0:
            return f"metric '{WEIGHT_KEY}' must be > 0, got {weight!r}"
        return None

    def arrays(self, claim: Claim) -> tuple[dict[str, np.ndarray], str | None]:
        arrays = claim.reply.arrays or {}
        got, want = set(arrays.keys()), set(self.expected)
        if got != want:
            missing, extra = sorted(want - got), sorted(got - want)
            return {}, f"array keys differ from the global model (missing {missing[:5]}, unexpected {extra[:5]})"
        out = {}
        for key, spec in self.expected.items():
            array = arrays[key]
            value = array.numpy() if hasattr(array, "numpy") else np.asarray(array)
            if tuple(value.shape) != spec.shape or str(value.dtype) != spec.dtype:
                return {}, f"array '{key}' is {tuple(value.shape)} {value.dtype}, expected {spec.shape} {spec.dtype}"
            if not np.all(np.isfinite(value)):
                return {}, f"array '{key}' has non-finite values"
            out[key] = value
        return out, None

    def spent(self, claim: Claim, reason: str) -> RejectedReply:
        """A rejection after stage 5: the site spent this reply's (valid) budget."""
        return RejectedReply(claim.site, reason, claim.reply.node,
                             claim.metrics[EPSILON_KEY], claim.metrics[DELTA_KEY])

    def check(self, msg: Message | SiteReply) -> AcceptedReply | RejectedReply:
        """Every stage for one reply, without the binding or weight bounds (usable alone)."""
        reply = msg if isinstance(msg, SiteReply) else SiteReply.from_message(msg)
        claim = self.claim(reply)
        if isinstance(claim, RejectedReply):
            return claim
        why = self.privacy_problem(claim)
        if why:
            return RejectedReply(claim.site, why, reply.node)
        why = self.examples_problem(claim)
        if why:
            return self.spent(claim, why)
        arrays, why = self.arrays(claim)
        if why:
            return self.spent(claim, why)
        return AcceptedReply(claim.site, claim.metrics[WEIGHT_KEY], arrays, claim.metrics, reply.node)
