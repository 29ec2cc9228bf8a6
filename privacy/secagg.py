"""Secure aggregation (SecAgg+) as a run option: the server learns only the weighted SUM
of the sites' updates, never one site's update, and survives dropped sites.

Flower 1.42 has SecAgg+ only on its legacy path (``secaggplus_mod`` on the client,
``SecAggPlusWorkflow`` on the server, FitIns/FitRes records). This module holds the
protocol settings and the client side; the server side is server/secure_rounds.py, which
aggregates through the server's one pipeline (server/aggregation.py).

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

Site-indexed rows (a recipe's ``site_indexed_keys``: site embeddings, per-site tables,
one-off releases). Row k is trained, or released, by site k alone, so row k of the
unmasked sum is exactly site k's own (weighted) row update: SecAgg+ cannot hide it, and
averaging it would shrink it K-fold. The design:
- each site zeroes, in its masked update, every row of those arrays but its own (the
  request names the arrays under ``medgen-site-rows``), so honest row k of the sum is
  site k's alone;
- the server recovers row k's update from the mean by undoing site k's weight
  (x sum(w) / w_k, w the protocol's quantised weights of the sites in the sum), applies it
  to the current row, and bounds the row like any site row (privacy/robust.py, 3.);
- what this releases is site k's own row, the same value the plain path takes from site
  k's reply: the output of its DP-trained network (post-processing) or its accounted
  one-off release (its ledger), so it costs no budget beyond the record-level guarantee.
  SecAgg+'s protection covers the shared (non-row) arrays; docs/security.md says so.
A malicious site can add values to another site's row inside the sum (it cannot be
attributed there); the row bound limits what that can do.

Thresholds: with K sites and ``secagg-max-dropped`` = d, every site's secrets are split
among all K sites and any K - d shares reconstruct them. SecAgg's guarantee against the
server needs K - d > K / 2 (otherwise the server could claim a live site dropped and
unmask it alone), so d < K / 2 is enforced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server.workflow import SecAggPlusWorkflow

from medgen.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

ARRAY_KEYS = "medgen-array-keys"   # fitins config: the names of the legacy parameter list
SITE_ROWS = "medgen-site-rows"     # fitins config: the site-indexed arrays (row k: site k's own)
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

    def weight_ratio(self, num_examples: float) -> float:
        """The weight a site's update carries in the sum: n / max_weight rounded to 1/Q
        (Flower's secaggplus_mod, ``dq_ratio``)."""
        return round(num_examples / self.max_weight * self.levels) / self.levels

    def error_bound(self, num_examples: list[float]) -> float:
        """Worst-case per-coordinate error of the aggregated mean update from quantisation
        (each site's stochastic rounding <= one step 2c/Q) and from rounding the weights
        n_i / max_weight to multiples of 1/Q, for updates bounded by c (test oracle)."""
        q = self.levels
        ratios = [self.weight_ratio(n) for n in num_examples]
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
        row_keys = [str(k) for k in settings.get(SITE_ROWS, [])]
        config = ConfigRecord({k: v for k, v in settings.items() if k not in (ARRAY_KEYS, SITE_ROWS)})
        plain = Message(RecordDict({"arrays": ArrayRecord({k: Array(a) for k, a in zip(keys, incoming)}),
                                    "config": config}), metadata=msg.metadata)
        reply = self.call_next(plain, context)
        if reply.has_error():
            raise SecAggRefused(int(reply.error.code), str(reply.error.reason))
        arrays = next(iter(reply.content.array_records.values()))
        metrics = next(iter(reply.content.metric_records.values()))
        update = _only_own_rows(keys, _update(keys, incoming, arrays), row_keys, metrics.get("site-index"))
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


def _only_own_rows(keys: list[str], update: list[np.ndarray], row_keys: list[str], site_index: Any
                   ) -> list[np.ndarray]:
    """Zero every row of the site-indexed arrays but this site's own (module docstring)."""
    if not row_keys:
        return update
    if not isinstance(site_index, int) or isinstance(site_index, bool):
        raise SecAggRefused(SECAGG_REFUSED, "the reply names no integer site-index; the site-indexed "
                            "rows cannot be placed in the masked sum")
    out = list(update)
    for position, key in enumerate(keys):
        if key in row_keys:
            own = np.zeros_like(out[position])
            own[site_index] = out[position][site_index]
            out[position] = own
    return out


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
