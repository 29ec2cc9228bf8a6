"""The ONE aggregation pipeline: every round loop (plain strategy, SecAgg+ strategy,
in-process runner, bench) aggregates through an ``AggregationPipeline``, so a guarantee
added here holds everywhere.

    validate (server/validation.py)
      -> bind node to site (server/site_binding.py)
      -> bound the example counts (``bounded_weights``)
      -> robust screen (privacy/robust.py)              [plain path only: needs one update per site]
      -> combine: weighted mean | median | trimmed mean [SecAgg+: the protocol's unmasked mean]
      -> site rows: row k from site k alone, bounded   (privacy/robust.py)
      -> client-level noise                            (privacy/client_dp.py)
      -> metrics (epsilon/delta max, the rest weighted, float64, never inf) and the run log

Example counts are self-declared. A site's aggregation weight is its declared num-examples,
at most what it declared in its first bound round, at most ``max-num-examples`` when set,
and at most ``max-weight-ratio`` x the round's lower median of those weights. With K sites
and ratio r, a lying site holds at most r / (r + K - 1) of the mean (0.5 at the defaults,
4 sites): a sign-flipped update then moves the global at most 2 r / (r + K - 1) honest steps
away from the honest mean, whatever count it claims.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from medgen.config import ConfigError, RunConfig
from medgen.privacy.client_dp import ClientLevelDP, add_client_level_noise
from medgen.privacy.robust import RobustAggregator, RobustSettings
from medgen.privacy.site_update import AcceptedReply, ArraySpec, RejectedReply
from medgen.server.run_log import RunDir
from medgen.server.site_binding import SiteBinding
from medgen.server.validation import WEIGHT_KEY, SITE_KEY, Claim, ReplyValidator, SiteReply

log = logging.getLogger(__name__)

MAX_AGGREGATED = ("epsilon", "delta")


@dataclass
class RoundResult:
    """What one round produced; ``arrays`` None: the previous global weights are kept."""

    round: int
    arrays: dict[str, np.ndarray] | None
    per_site: dict[str, dict[str, float]]
    excluded: list[dict[str, object]]
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.arrays is not None


def bounded_weights(declared: Sequence[float], first: Sequence[float], cap: float, ratio: float) -> list[float]:
    """min(declared, first declared, cap), then at most ``ratio`` x their lower median."""
    weights = [min(d, f, cap) if cap > 0 else min(d, f) for d, f in zip(declared, first)]
    if not weights:
        return []
    lower_median = sorted(weights)[(len(weights) - 1) // 2]
    return [min(w, ratio * lower_median) for w in weights]


def aggregate_site_metrics(replies: Sequence[AcceptedReply]) -> dict[str, float]:
    """epsilon/delta: max over sites; other metrics: mean weighted by the aggregation weight,
    in float64 with normalised weights; a metric that still overflows is dropped (logged)."""
    weights = np.asarray([r.num_examples for r in replies], dtype=np.float64)
    total = float(weights.sum())
    keys = sorted(set().union(*(r.metrics for r in replies)) - {WEIGHT_KEY, SITE_KEY})
    out: dict[str, float] = {WEIGHT_KEY: total, "sites": float(len(replies))}
    for key in keys:
        present = [(r.metrics[key], w) for r, w in zip(replies, weights) if key in r.metrics]
        if key in MAX_AGGREGATED:
            value = max(v for v, _ in present)
        else:
            share = np.asarray([w for _, w in present]) / sum(w for _, w in present)
            with np.errstate(over="ignore", invalid="ignore"):
                value = float(np.sum(np.asarray([v for v, _ in present], np.float64) * share))
        if math.isfinite(value):
            out[key] = float(value)
        else:
            log.warning("aggregated metric %r is not finite: left out of the round's metrics", key)
    return out


@dataclass
class AggregationPipeline:
    specs: Mapping[str, ArraySpec]
    site_names: tuple[str, ...]
    min_sites: int
    validator: ReplyValidator
    robust: RobustAggregator = field(default_factory=RobustAggregator)
    site_indexed_keys: tuple[str, ...] = ()
    client_dp: ClientLevelDP | None = None
    binding: SiteBinding = field(default_factory=SiteBinding)
    max_num_examples: float = 0.0
    max_weight_ratio: float = 3.0
    run_dir: RunDir | None = None
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @classmethod
    def for_run(cls, config: RunConfig, specs: Mapping[str, ArraySpec], site_indexed_keys: Sequence[str],
                run_dir: RunDir | None, resume: bool, **overrides) -> "AggregationPipeline":
        robust = RobustAggregator(RobustSettings.from_config(config))
        client_dp = ClientLevelDP.from_config(config)
        if client_dp is not None and config.aggregation != "mean":
            raise ConfigError("client-level DP (client-dp-noise-multiplier > 0) needs aggregation = "
                              f"'mean': its noise is calibrated to the weighted mean, not to {config.aggregation!r}")
        values = dict(specs=specs, site_names=config.site_names, min_sites=config.min_sites,
                      validator=ReplyValidator(specs, config.site_names, config.target_epsilon, config.delta),
                      robust=robust, site_indexed_keys=tuple(site_indexed_keys), client_dp=client_dp,
                      binding=SiteBinding.at(run_dir.path if run_dir else None, fresh=not resume),
                      max_num_examples=config.max_num_examples, max_weight_ratio=config.max_weight_ratio,
                      run_dir=run_dir)
        return cls(**{**values, **overrides})

    # -- validate -> bind -> bound the weights --------------------------------------------
    def admit(self, replies: Iterable[SiteReply], with_arrays: bool = True
              ) -> tuple[list[AcceptedReply], list[RejectedReply]]:
        claims, rejected = [], []
        for reply in replies:
            verdict = self.validator.claim(reply, self.binding.name_of)
            (rejected if isinstance(verdict, RejectedReply) else claims).append(verdict)
        refused = self.binding.resolve([(c.reply.node, c.site) for c in claims])
        rejected += [RejectedReply(self.binding.name_of(c.reply.node), refused[i], c.reply.node)
                     for i, c in enumerate(claims) if i in refused]
        valid: list[tuple[Claim, dict]] = []
        for claim in (c for i, c in enumerate(claims) if i not in refused):
            why = self.validator.privacy_problem(claim)
            if why:
                rejected.append(RejectedReply(claim.site, why, claim.reply.node))
                continue
            why = self.validator.examples_problem(claim)
            arrays, why = (self.validator.arrays(claim) if with_arrays and not why else ({}, why))
            if why:
                rejected.append(self.validator.spent(claim, why))
                continue
            valid.append((claim, arrays))
        declared = [c.metrics[WEIGHT_KEY] for c, _ in valid]
        first = [self.binding.first_declared(c.site, n) for (c, _), n in zip(valid, declared)]
        weights = bounded_weights(declared, first, self.max_num_examples, self.max_weight_ratio)
        accepted = [AcceptedReply(c.site, w, arrays, {**c.metrics, "aggregation-weight": w}, c.reply.node)
                    for (c, arrays), w in zip(valid, weights)]
        return accepted, rejected

    # -- the plain path: every stage ------------------------------------------------------
    def aggregate(self, server_round: int, replies: Iterable[SiteReply],
                  current: Mapping[str, np.ndarray] | None) -> RoundResult:
        """``current``: the round's global weights (None: nothing to screen against)."""
        accepted, rejected = self.admit(replies)
        kept, screened, notes = self.robust.screen(accepted, current, self.site_indexed_keys)
        by_site = {r.site: r for r in accepted}
        rejected += [spent_by(r, by_site[r.site]) for r in screened]
        if len(kept) < self.min_sites:
            return self._kept_previous(server_round, kept, rejected, notes)
        combined = self.robust.combine(kept, self.specs)
        new_rows = {key: {self.site_names.index(r.site): np.asarray(r.arrays[key][self.site_names.index(r.site)])
                          for r in kept} for key in self.site_indexed_keys}
        return self.finish(server_round, kept, rejected, combined, new_rows, current, notes)

    # -- shared by both paths: site rows -> noise -> metrics --------------------------------
    def finish(self, server_round: int, kept: Sequence[AcceptedReply], rejected: list[RejectedReply],
               combined: Mapping[str, np.ndarray], new_rows: Mapping[str, Mapping[int, np.ndarray]],
               current: Mapping[str, np.ndarray], notes: Sequence[str] = (),
               labels: Mapping[str, float] | None = None) -> RoundResult:
        """``labels``: constant metrics that describe the path (e.g. secure-aggregation 1)."""
        arrays, row_notes = self.robust.site_rows(combined, new_rows, combined if current is None else current)
        notes = list(notes) + row_notes
        metrics = {**aggregate_site_metrics(kept), **(labels or {})}
        if self.client_dp is not None:
            weights = [r.num_examples for r in kept]
            shared = [k for k in self.specs if k not in self.site_indexed_keys]
            released = {key: sorted(rows) for key, rows in new_rows.items()}
            std, row_std = self.client_dp.noise_std, self.client_dp.row_noise_std(weights)
            arrays = add_client_level_noise(arrays, shared, released, std, row_std, self.rng)
            metrics["client-dp-noise-std"], metrics["client-dp-row-noise-std"] = std, row_std
        return self._record(RoundResult(server_round, arrays, {r.site: r.metrics for r in kept},
                                        [r.to_log() for r in rejected], metrics, notes))

    def _kept_previous(self, server_round, kept, rejected, notes) -> RoundResult:
        log.warning("round %d: %d valid replies < min-sites %d: keeping the previous global weights",
                    server_round, len(kept), self.min_sites)
        return self._record(RoundResult(server_round, None, {r.site: r.metrics for r in kept},
                                        [r.to_log() for r in rejected],
                                        {"kept-previous-weights": 1.0, "sites": float(len(kept))}, list(notes)))

    def refuse_round(self, server_round: int, kept: Sequence[AcceptedReply], rejected: list[RejectedReply],
                     reason: str) -> RoundResult:
        """The round's aggregate cannot be used (SecAgg+: a sum that cannot be re-weighted)."""
        log.warning("round %d: %s: keeping the previous global weights", server_round, reason)
        return self._record(RoundResult(server_round, None, {r.site: r.metrics for r in kept},
                                        [r.to_log() for r in rejected] + [{"site": "aggregate", "reason": reason}],
                                        {"kept-previous-weights": 1.0, "sites": float(len(kept))}))

    def _record(self, result: RoundResult) -> RoundResult:
        for item in result.excluded:
            log.warning("round %d: excluded reply from %s: %s", result.round, item["site"], item["reason"])
        for note in result.notes:
            log.warning("round %d: bounded: %s", result.round, note)
        if self.run_dir is not None:
            self.run_dir.log_train(result.round, result.per_site, result.excluded,
                                   {**result.metrics, **({"bounded": float(len(result.notes))} if result.notes else {})})
        return result


def spent_by(rejected: RejectedReply, reply: AcceptedReply) -> RejectedReply:
    """A screened-out reply still spent its site's (valid) budget: carry it to the log."""
    return replace(rejected, epsilon=reply.metrics.get("epsilon"), delta=reply.metrics.get("delta"))
