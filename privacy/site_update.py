"""What one site sent, as the server's aggregation sees it, and the weighted mean of them.

These types sit in privacy/ (not server/) because both layers use them: the server's
aggregation pipeline (server/aggregation.py) builds them, and the robust rules
(privacy/robust.py), client-level DP (privacy/client_dp.py) and the message audit
(privacy/message_audit.py) read them. privacy/ never imports server/.

``AcceptedReply.num_examples`` is the site's AGGREGATION WEIGHT: the num-examples it
declared, bounded by the pipeline (server/example_counts.py). What the site declared is
kept in ``metrics["num-examples"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class AcceptedReply:
    site: str
    num_examples: float                 # the aggregation weight (bounded)
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]
    node: int | None = None             # the Flower node that sent it


@dataclass(frozen=True)
class RejectedReply:
    """An excluded reply. ``site`` names the SENDING node (its bound site, else node-<id>).
    ``epsilon``/``delta`` are set when the reply's privacy metrics were well-formed: the
    site spent that budget although its update was not used (privacy.json reports it)."""

    site: str
    reason: str
    node: int | None = None
    epsilon: float | None = None
    delta: float | None = None

    def to_log(self) -> dict[str, object]:
        entry: dict[str, object] = {"site": self.site, "reason": self.reason}
        if self.node is not None:
            entry["node"] = int(self.node)
        if self.epsilon is not None:
            entry["epsilon"], entry["delta"] = float(self.epsilon), float(self.delta or 0.0)
        return entry


def specs_of(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    return {k: ArraySpec(tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in arrays.items()}


def is_float(spec: ArraySpec | np.ndarray) -> bool:
    return np.issubdtype(np.dtype(spec.dtype), np.floating)


def cast_like(value: np.ndarray, spec: ArraySpec) -> np.ndarray:
    """float64 result back to the array's dtype (integer counters rounded, not truncated)."""
    dtype = np.dtype(spec.dtype)
    return (np.rint(value) if np.issubdtype(dtype, np.integer) else value).astype(dtype)


def weighted_average(replies: Sequence[AcceptedReply], specs: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """FedAvg: sum_i w_i x_i / sum_i w_i, in float64, cast back to each array's dtype."""
    total = float(sum(r.num_examples for r in replies))
    out = {}
    for key, spec in specs.items():
        acc = sum(np.asarray(r.arrays[key], dtype=np.float64) * (r.num_examples / total) for r in replies)
        out[key] = cast_like(np.asarray(acc), spec)
    return out
