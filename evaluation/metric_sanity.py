"""The metric sanity suite: a metric must see each failure on REAL images before it is trusted.

For one site, with its held-out test subjects split in two halves (heldout_split.py):

    floor        metric(real half 1, real half 2): what a perfect generator scores, with
                 its bias-corrected bootstrap interval (bootstrap.py)
    degradation  metric(degrade(real half 1), real half 2) for each degradation
                 (degradations.py), plus ``wrong_site``: the most similar other site's
                 images of the same subjects

A degradation is *seen* when its score lies outside the floor's interval on the worse
side (``floor_verdict``). A metric is a *headline* metric only if it sees every
degradation at every site of every federation tested (``headline_status``); the others
are reported as diagnostics, with the failures they miss. Used by bench/metric_sanity.py
(the measured table, bench/results/metric_sanity.json) and by
tests/evaluation/test_metric_sanity.py (the same checks on a small federation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medgen.evaluation.bootstrap import Interval
from medgen.evaluation.degradations import DEGRADATIONS, Degradation, most_similar_site
from medgen.evaluation.heldout_split import SplitSite
from medgen.evaluation.set_metrics import ImageSet, ReferenceScorer, SetMetric, floor_verdict, quantity

CANDIDATES = ("swd", "psd", "tissue_w1", "tissue_texture", "tissue_bands", "kid_rand",
              "precision", "recall", "density", "coverage", "fd_medgenenc", "kid_medgenenc")
"""Set-level quantities that could be headline metrics (per-level / per-class ones are detail)."""
WRONG_SITE = "wrong_site"


@dataclass(frozen=True)
class SanitySettings:
    samples: int = 128            # images per half (floor: this many vs this many)
    bootstrap: int = 200          # replicates for the floor's interval
    degraded_bootstrap: int = 100  # replicates for a degraded set's own interval (context only)
    seed: int = 0


def _interval_dict(interval: Interval) -> dict[str, float]:
    return {"value": interval.value, "low": interval.low, "high": interval.high}


def site_sanity(site: str, halves: dict[str, SplitSite], metrics: Sequence[SetMetric],
                settings: SanitySettings,
                degradations: dict[str, Degradation] | None = None) -> dict[str, Any]:
    """Floor and every degradation of one site, as plain JSON-ready numbers."""
    degradations = DEGRADATIONS if degradations is None else degradations
    half = halves[site]
    n = min(settings.samples, len(half.cond_images), len(half.ref_images))
    scorer = ReferenceScorer(ImageSet(half.ref_images[:n], half.ref_labels[:n]), metrics,
                             bootstrap=settings.bootstrap)
    images, labels = half.cond_images[:n], half.cond_labels[:n]
    floor = scorer.score(ImageSet(images, labels), seed=settings.seed)
    out: dict[str, Any] = {"samples": n, "floor": {k: _interval_dict(v) for k, v in floor.items()},
                           "degradations": {}}
    cases: dict[str, tuple[Any, Any, str | None]] = {}
    for name, degrade in degradations.items():
        rng = np.random.default_rng([settings.seed, len(cases)])
        cases[name] = (*degrade(images, labels, rng), None)
    paired = {s: h.cond_images[:n] for s, h in halves.items() if len(h.cond_images) >= n}
    if len(paired) > 1 and site in paired:
        other = most_similar_site(site, paired)
        cases[WRONG_SITE] = (halves[other].cond_images[:n], labels, other)
    for name, (cand_images, cand_labels, other) in cases.items():
        scores = scorer.score(ImageSet(cand_images, cand_labels), seed=settings.seed,
                              bootstrap=settings.degraded_bootstrap)
        entry: dict[str, Any] = {"scores": {}}
        if other is not None:
            entry["other_site"] = other
        for key, interval in scores.items():
            verdict = floor_verdict(interval.value, floor[key], _worse_is_higher(key))
            entry["scores"][key] = {**_interval_dict(interval), "seen": verdict == "worse than floor"}
        out["degradations"][name] = entry
    return out


def _worse_is_higher(key: str) -> bool:
    return quantity(key).higher_is_worse


def headline_status(federations: dict[str, dict[str, Any]],
                    candidates: Sequence[str] = CANDIDATES) -> dict[str, dict[str, Any]]:
    """Per candidate: headline (saw every degradation everywhere it was measured) and misses.

    ``federations``: {name: {"sites": {site: site_sanity(...)}}}. A candidate never
    measured (e.g. tissue metrics without labels) is not a headline metric.
    """
    status = {}
    for key in candidates:
        misses, measured = [], 0
        for fed, result in federations.items():
            for site, site_result in result.get("sites", {}).items():
                for name, entry in site_result["degradations"].items():
                    score = entry["scores"].get(key)
                    if score is None:
                        continue
                    measured += 1
                    if not score["seen"]:
                        misses.append(f"{fed}/{site}/{name}")
        status[key] = {"headline": measured > 0 and not misses, "checks": measured, "missed": misses}
    return status
