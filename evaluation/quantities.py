"""What each set-metric number is: title, unit, direction, and which are headline metrics.

Plain data, no torch: the report reads it to label and judge numbers without loading
any network code (set_metrics.py computes them and re-exports these names).

Which quantities are *headline* metrics is decided by the sanity suite
(bench/metric_sanity.py; docs/evaluation.md): ``HEADLINE`` lists the ones that scored
every degradation of real images outside the real-vs-real floor's interval at every site
of both simulated federations. The rest are diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medgen.evaluation.bootstrap import Interval

#: the intensity unit of a site without physical units (per-volume normalised MR): "norm."
NORMALISED = "norm."

RANDOM_FEATURES = "randconv-v1"   # random_features.VERSION (checked by a test)


@dataclass(frozen=True)
class Quantity:
    key: str
    title: str
    unit: str
    higher_is_worse: bool


QUANTITIES = {q.key: q for q in (
    Quantity("swd", "sliced Wasserstein distance of Laplacian-pyramid patches, mean over levels",
             "ref. patch s.d.", True),
    Quantity("swd_px", "SWD at one pyramid level (finest = noise and edges, coarsest = contrast)",
             "ref. patch s.d.", True),
    Quantity("psd", "radially averaged power spectrum distance (RMS over frequencies)", "dB", True),
    Quantity("tissue_w1", "per-tissue intensity Wasserstein-1, mean over classes and image regions",
             "", True),
    Quantity("tissue_texture", "per-tissue fine-texture (finest Laplacian band) Wasserstein-1",
             "ref. s.d.", True),
    Quantity("tissue_bands", "per-tissue intensity and fine-texture Wasserstein-1, mean of both",
             "ref. s.d.", True),
    Quantity("kid_rand", f"KID on untrained random-conv features ({RANDOM_FEATURES})", "", True),
    Quantity("fd_medgenenc", "FD_medgenenc-v1: Frechet distance on medgen's trained encoder",
             "", True),
    Quantity("kid_medgenenc", "KID on medgen's trained encoder (medgenenc-v1)", "", True),
    Quantity("precision", "precision: generated samples on the real manifold (fidelity)", "", False),
    Quantity("recall", "recall: real samples on the generated manifold (diversity)", "", False),
    Quantity("density", "density: real k-NN balls per generated sample / k (fidelity)", "", False),
    Quantity("coverage", "coverage: real samples with a generated neighbour (diversity)", "", False),
)}
HEADLINE: tuple[str, ...] = ("tissue_bands",)
"""Set from bench/results/metric_sanity.json; tests/evaluation/test_metric_sanity.py checks it."""
REQUIRED_SAMPLES = 128
"""Images per site (each of generated and reference) at which every headline metric told
a mildly blurred copy (sigma 0.5 px) and every suite degradation from the floor at every
site of both federations (bench/results/metric_sanity.json, "sample_size"). Below it a
result "at floor" is inconclusive, and the report says so."""


def quantity(key: str) -> Quantity:
    """The entry for a key, per-level / per-class keys falling back to their family."""
    if key in QUANTITIES:
        return QUANTITIES[key]
    if key.startswith("swd_") and key.endswith("px"):
        return QUANTITIES["swd_px"]
    if key.startswith("tissue_w1_"):
        return QUANTITIES["tissue_w1"]
    raise KeyError(f"unknown set-metric quantity '{key}'")


def floor_verdict(value: float, floor: Interval, higher_is_worse: bool) -> str:
    """'at floor' inside (or better than) the floor's interval, 'worse than floor' outside it."""
    if not math.isfinite(value):
        return "not finite"
    worse = value > floor.high if higher_is_worse else value < floor.low
    return "worse than floor" if worse else "at floor"
