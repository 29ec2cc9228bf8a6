"""Robust aggregation: screen out updates whose size is far outside the round's
distribution, then combine the rest by weighted mean, coordinate-wise median or trimmed
mean.

This runs AFTER the per-reply validation of ``medgen.server.strategy.ReplyValidator``
(errors, wrong keys/shapes/dtypes, non-finite values, bad metrics are already excluded
there), on the replies it accepted. Two defences, composable:

1. Norm screen (median/MAD rule). For each site, the L2 norm of its update
   ``||w_site - w_global||`` over all floating-point arrays. With ``m`` the round's
   median norm and ``MAD`` the median absolute deviation, a site is rejected when its
   norm exceeds ``m + k * 1.4826 * MAD`` (1.4826 makes MAD a consistent estimate of a
   Gaussian's standard deviation) and also exceeds ``(1 + slack) * m``; the slack keeps
   honest sites whose norms are nearly identical (MAD ~ 0) from being rejected for tiny
   differences. Catches scaled updates (x1e6) and random weights. A majority of honest
   sites is assumed (the median must be honest), and at least 3 replies are needed;
   fewer and the screen is skipped (logged).
2. The combination. ``mean`` is FedAvg weighted by num-examples. ``median`` and
   ``trimmed-mean`` are Flower's FedMedian / FedTrimmedAvg rules (unweighted, per
   coordinate; the trimmed mean calls Flower's own ``trim_mean``), and also bound
   attacks the norm screen cannot see, such as a sign-flipped update of normal size.

Every rejection is returned as a ``RejectedReply`` with the site and the reason; the
strategy logs it and writes it to the run log's ``excluded`` list like any other
exclusion. Not applicable with secure aggregation: the server never sees one site's
update there (docs/security.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from medgen.config import ConfigError, RunConfig
from medgen.server.strategy import AcceptedReply, ArraySpec, RejectedReply, weighted_average

log = logging.getLogger(__name__)

COMBINE_RULES = ("mean", "median", "trimmed-mean")
MAD_TO_SIGMA = 1.4826
MIN_REPLIES_FOR_SCREEN = 3


@dataclass(frozen=True)
class RobustSettings:
    """How the server bounds broken or malicious updates (run-config keys in brackets).

    combine: [aggregation] mean | median | trimmed-mean.
    trim_fraction: [trim-fraction] share cut at EACH end per coordinate (trimmed-mean).
    outlier_mads: [norm-outlier-mads] k of the median/MAD rule; 0 disables the screen.
    slack: a site is never rejected unless its norm is also above (1 + slack) x median.
    """

    combine: str = "mean"
    trim_fraction: float = 0.2
    outlier_mads: float = 3.0
    # "far outside": a bound of at least 3x the median norm. With 1.5x, the first 4-site
    # demo rejected honest site C (T2w, the largest style shift: norm 1.17 vs median 0.70)
    slack: float = 2.0

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_RULES:
            raise ConfigError(f"run-config field 'aggregation' must be one of {COMBINE_RULES}, "
                              f"got {self.combine!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError("run-config field 'trim-fraction' must be in [0, 0.5), got "
                              f"{self.trim_fraction!r}")
        if self.outlier_mads < 0:
            raise ConfigError("run-config field 'norm-outlier-mads' must be >= 0 (0 disables "
                              f"the norm screen), got {self.outlier_mads!r}")
        if self.slack < 0:
            raise ConfigError(f"robust-aggregation slack must be >= 0, got {self.slack!r}")

    @classmethod
    def from_config(cls, config: RunConfig) -> "RobustSettings":
        return cls(combine=config.aggregation, trim_fraction=config.trim_fraction,
                   outlier_mads=config.norm_outlier_mads)


def update_norms(replies: Sequence[AcceptedReply], global_arrays: Mapping[str, np.ndarray]
                 ) -> np.ndarray:
    """L2 norm of each reply's update over the floating-point arrays (float64)."""
    keys = [k for k, v in global_arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
    norms = []
    for reply in replies:
        squares = sum(float(np.sum((np.asarray(reply.arrays[k], np.float64)
                                    - np.asarray(global_arrays[k], np.float64)) ** 2)) for k in keys)
        norms.append(np.sqrt(squares))
    return np.asarray(norms, dtype=np.float64)


def screen_norm_outliers(replies: Sequence[AcceptedReply], global_arrays: Mapping[str, np.ndarray],
                         settings: RobustSettings) -> tuple[list[AcceptedReply], list[RejectedReply]]:
    """Median/MAD rule on update norms; returns (kept, rejected with reasons)."""
    if settings.outlier_mads == 0 or not replies:
        return list(replies), []
    if len(replies) < MIN_REPLIES_FOR_SCREEN:
        log.info("norm screen skipped: %d replies < %d needed for a median/MAD bound",
                 len(replies), MIN_REPLIES_FOR_SCREEN)
        return list(replies), []
    norms = update_norms(replies, global_arrays)
    median = float(np.median(norms))
    mad = float(np.median(np.abs(norms - median)))
    bound = max(median + settings.outlier_mads * MAD_TO_SIGMA * mad, (1.0 + settings.slack) * median)
    kept, rejected = [], []
    for reply, norm in zip(replies, norms):
        if norm > bound:
            rejected.append(RejectedReply(reply.site, (
                f"update norm {norm:.4g} is outside the round's distribution: above the bound "
                f"{bound:.4g} (median {median:.4g} + {settings.outlier_mads:g} x 1.4826 x MAD "
                f"{mad:.4g}, and at least (1 + {settings.slack:g}) x median)")))
        else:
            kept.append(reply)
    return kept, rejected


def coordinate_median(replies: Sequence[AcceptedReply], specs: Mapping[str, ArraySpec]
                      ) -> dict[str, np.ndarray]:
    """Flower FedMedian's rule: per-coordinate median over sites (unweighted)."""
    return _per_coordinate(replies, specs, lambda stack: np.median(stack, axis=0))


def trimmed_mean(replies: Sequence[AcceptedReply], specs: Mapping[str, ArraySpec],
                 fraction: float) -> dict[str, np.ndarray]:
    """Flower FedTrimmedAvg's rule: per coordinate, drop ``fraction`` of the sites at each
    end, average the rest (unweighted). With int(fraction * n) == 0 nothing is trimmed."""
    return _per_coordinate(replies, specs, lambda stack: trim_mean(stack, fraction))


def _per_coordinate(replies, specs, rule) -> dict[str, np.ndarray]:
    out = {}
    for key, spec in specs.items():
        stack = np.stack([np.asarray(r.arrays[key], dtype=np.float64) for r in replies])
        value = np.asarray(rule(stack))
        dtype = np.dtype(spec.dtype)
        out[key] = (np.rint(value) if np.issubdtype(dtype, np.integer) else value).astype(dtype)
    return out


@dataclass(frozen=True)
class RobustAggregator:
    """The server's aggregation step: ``screen`` then ``combine`` (both pure functions)."""

    settings: RobustSettings = RobustSettings()

    def screen(self, replies: Sequence[AcceptedReply], global_arrays: Mapping[str, np.ndarray] | None
               ) -> tuple[list[AcceptedReply], list[RejectedReply]]:
        if global_arrays is None:  # no reference yet: nothing to measure updates against
            return list(replies), []
        return screen_norm_outliers(replies, global_arrays, self.settings)

    def combine(self, replies: Sequence[AcceptedReply], specs: Mapping[str, ArraySpec]
                ) -> dict[str, np.ndarray]:
        if self.settings.combine == "median":
            return coordinate_median(replies, specs)
        if self.settings.combine == "trimmed-mean":
            return trimmed_mean(replies, specs, self.settings.trim_fraction)
        return weighted_average(list(replies), specs)

    def aggregate(self, replies: Sequence[AcceptedReply], specs: Mapping[str, ArraySpec],
                  global_arrays: Mapping[str, np.ndarray] | None
                  ) -> tuple[dict[str, np.ndarray] | None, list[AcceptedReply], list[RejectedReply]]:
        """Screen, then combine what is left; (None, ...) when nothing is left."""
        kept, rejected = self.screen(replies, global_arrays)
        return (self.combine(kept, specs) if kept else None), kept, rejected
