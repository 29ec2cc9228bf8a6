"""Client-level DP: an optional extra layer whose unit is the SITE, reported separately
from the record-level guarantee (unit: the patient, privacy/ledger.py).

Record-level DP-SGD at each site protects one patient against everyone outside the site.
Client-level DP (McMahan et al. 2018, "DP-FedAvg"; Flower's central DP wrappers with
fixed clipping) protects a whole site's participation: each site's update
``w_site - w_global`` is clipped to L2 norm C on the site (``client_clipping_mod``, the
rule of Flower's ``fixedclipping_mod``), and the server adds Gaussian noise of standard deviation
z * C / K to the aggregate (K = the configured number of sites). It trusts the server to
add the noise (or, with secure aggregation, to add it to the unmasked sum).

Exact statement. Neighbouring federations differ by one site's update added or removed,
with the aggregation weights otherwise fixed. medgen's FedAvg weights sites by
num-examples n_i, so one site moves the weighted mean by at most C * max(n) / sum(n), not
C / K: the noise multiplier that actually protects a site in a round is
``z_eff = z * sum(n) / (K * max(n))`` (= z when all sites are equal). Every site
takes part in every round (no sampling, no amplification), so the guarantee composes
``rounds`` Gaussian mechanisms at sample rate 1, accounted with the run's named
accountant (Opacus "rdp" or "prv"). ``site_level_guarantee`` computes it from the
per-round num-examples the run log already holds.

Site rows. Row k of a site-indexed array comes from site k alone (server/aggregation.py),
so removing site k changes that row by its whole (clipped) row update b, not by
b * n_k / sum(n). With ``a`` the clipped update's shared part (a^2 + b^2 <= C^2), the
normalised sensitivity is sqrt((a * max(n) / sum(n) / s)^2 + (b / s_row)^2) for noise
``s = z * C / K`` on the shared arrays; noise ``s_row = z * C * sum(n) / (K * max(n))`` on
each released row (= z * C for equal sites) keeps it at most 1 / z_eff, so the statement
above holds for the rows too. Rows of sites that did not answer are unchanged and get none.

The noise is the LAST stage of the server's one aggregation pipeline
(server/aggregation.py, ``add_client_level_noise``), on the plain path, under SecAgg+
(the new global weights = unmasked mean + noise) and in the in-process runner alike;
excluded replies are logged there instead of skipping the round as Flower's wrapper does.
The weights n are the pipeline's bounded aggregation weights (logged per site as
``aggregation-weight``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv

from medgen.config import RunConfig

UNIT = "site"
CLIPPING_REFUSED = 4014  # medgen error codes: client/app.py, deploy/allowlist.py, privacy/*


@dataclass(frozen=True)
class ClientLevelDP:
    noise_multiplier: float
    clipping_norm: float
    num_sites: int

    @classmethod
    def from_config(cls, config: RunConfig) -> "ClientLevelDP | None":
        """None when the run does not ask for it (client-dp-noise-multiplier = 0)."""
        if config.client_dp_noise_multiplier == 0:
            return None
        return cls(config.client_dp_noise_multiplier, config.client_dp_clipping_norm,
                   len(config.site_names))

    @property
    def noise_std(self) -> float:
        return compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sites)

    def row_noise_std(self, weights: Sequence[float]) -> float:
        """Noise on each released site row: z * C * sum(n) / (K * max(n)) (module docstring)."""
        return self.noise_std * sum(weights) / max(weights)


def add_client_level_noise(arrays: Mapping[str, np.ndarray], shared_keys: Sequence[str],
                           released_rows: Mapping[str, Sequence[int]], std: float, row_std: float,
                           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The new global weights plus Gaussian noise: ``std`` on every coordinate of the
    floating-point ``shared_keys``, ``row_std`` on each released row (rows of sites that did
    not answer are untouched). Returns new arrays (the inputs are not modified)."""
    out = dict(arrays)
    for key in shared_keys:
        value = np.asarray(arrays[key])
        if np.issubdtype(value.dtype, np.floating):
            out[key] = (value.astype(np.float64) + rng.normal(0.0, std, value.shape)).astype(value.dtype)
    for key, positions in released_rows.items():
        value = np.array(arrays[key], dtype=np.float64, copy=True)
        if not np.issubdtype(np.asarray(arrays[key]).dtype, np.floating):
            continue
        for position in positions:
            value[position] += rng.normal(0.0, row_std, value[position].shape)
        out[key] = value.astype(np.asarray(arrays[key]).dtype)
    return out


def clip_update(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray], norm: float
                ) -> dict[str, np.ndarray]:
    """``after`` with its update ``after - before`` clipped to L2 ``norm`` over the floating-
    point arrays (Flower's fixedclipping_mod rule; integer arrays pass through)."""
    floats = [k for k, v in after.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
    updates = {k: np.asarray(after[k], np.float64) - np.asarray(before[k], np.float64) for k in floats}
    total = math.sqrt(sum(float(np.sum(u ** 2)) for u in updates.values()))
    scale = min(1.0, norm / total) if total > 0 else 1.0
    return {k: (np.asarray(before[k], np.float64) + updates[k] * scale).astype(np.asarray(after[k]).dtype)
            if k in updates else np.asarray(after[k]) for k in after}


def client_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: when the request carries a clipping norm (client-level DP is on), clip
    the site's update ``reply - request`` to that L2 norm over the floating-point arrays.

    The same rule as Flower's ``fixedclipping_mod`` (the tests use it as the oracle), but
    integer arrays (counters) pass through unchanged instead of failing the cast, and a
    request without a clipping norm passes through instead of being refused.
    """
    norm = _clipping_norm(msg)
    if norm is None:
        return call_next(msg, context)
    before = {k: a.numpy().copy() for k, a in next(iter(msg.content.array_records.values())).items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    name, arrays = next(iter(reply.content.array_records.items()))
    if set(arrays.keys()) != set(before):
        return Message(Error(CLIPPING_REFUSED, "client-level clipping: the trained weights do not match the "
                             "request's arrays"), reply_to=msg)
    clipped = clip_update(before, {k: arrays[k].numpy() for k in arrays.keys()}, norm)
    reply.content[name] = ArrayRecord({k: Array(np.asarray(v)) for k, v in clipped.items()})
    return reply


def _clipping_norm(msg: Message) -> float | None:
    if msg.metadata.message_type != "train":
        return None
    for record in msg.content.config_records.values():
        if KEY_CLIPPING_NORM in record:
            return float(record[KEY_CLIPPING_NORM])
    return None


def effective_noise_multiplier(noise_multiplier: float, num_sites: int, num_examples: Sequence[float]) -> float:
    """z_eff = z * sum(n) / (K * max(n)) for a round aggregated with weights n."""
    if not num_examples or min(num_examples) <= 0:
        raise ValueError("client-level DP: every aggregated site needs num-examples > 0")
    return noise_multiplier * sum(num_examples) / (num_sites * max(num_examples))


def site_level_epsilon(rounds: Sequence[Sequence[float]], dp: ClientLevelDP, delta: float,
                       accountant: str) -> float:
    """Epsilon per site after the given rounds (each: the num-examples of its sites)."""
    from medgen.privacy.accounting import epsilon_of  # Opacus: off the ClientApp's import path

    history = [(effective_noise_multiplier(dp.noise_multiplier, dp.num_sites, r), 1.0, 1) for r in rounds]
    return epsilon_of(history, delta, accountant) if history else 0.0


def site_level_guarantee(train_records: Iterable[dict], config: RunConfig) -> dict | None:
    """The client-level statement for privacy.json, from the run log's train records."""
    dp = ClientLevelDP.from_config(config)
    if dp is None:
        return None
    # the weights the mean actually used (bounded by the pipeline), else the declared counts
    rounds = [[float(m.get("aggregation-weight", m["num-examples"])) for m in record["per_site"].values()]
              for record in train_records
              if record.get("kind") == "train" and record.get("per_site")
              and not record.get("aggregate", {}).get("kept-previous-weights")]
    epsilon = site_level_epsilon(rounds, dp, config.delta, config.accountant)
    return {"unit": UNIT, "mechanism": "Gaussian on the aggregate, updates clipped on the site",
            "noise_multiplier": dp.noise_multiplier, "clipping_norm": dp.clipping_norm,
            "num_sites": dp.num_sites, "noise_std": dp.noise_std, "rounds": len(rounds),
            "sample_rate": 1.0, "accountant": config.accountant, "delta": config.delta,
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "neighbouring": "one site's update added or removed, weights fixed; "
                            "sensitivity C * max(n) / sum(n)"}
