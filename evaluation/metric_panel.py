"""The set metrics of every site, each beside its real-vs-real floor: the evaluator's panel.

``MetricPanel.prepare`` builds, per site, a ``ReferenceScorer`` on the reference half of
heldout/test and scores the conditioning half (real images, same N as the generated set
will have) against it: that is the floor, with its bias-corrected bootstrap interval.
``score`` then turns a generated set into flat metric keys (the run log's format):

    <q>/<site>, <q>_lo/<site>, <q>_hi/<site>          generated set and its interval
    <q>_floor/<site>, <q>_floor_lo/<site>, <q>_floor_hi/<site>   the real-vs-real floor
    headline_worse/<site>   how many HEADLINE quantities are outside their floor's interval
    panel_n/<site>          images per set behind those numbers

for every quantity q in ``REPORTED``. A generated image's labels are the map it was
conditioned on. The per-tissue intensity histograms of the last scored round are kept
for the report (``histograms``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from medgen.evaluation.bootstrap import Interval
from medgen.evaluation.heldout_split import SplitSite
from medgen.evaluation.random_features import VERSION as RANDOM_FEATURES
from medgen.evaluation.random_features import RandomConvFeatures
from medgen.evaluation.set_metrics import (HEADLINE, ImageSet, ReferenceScorer, floor_verdict,
                                           quantity, standard_metrics)
from medgen.evaluation.tissue_intensity import TissueUnits, pooled_histograms, tissue_histograms

REPORTED = ("swd", "psd", "tissue_bands", "tissue_w1", "tissue_texture", "kid_rand",
            "precision", "recall", "density", "coverage")
FLOOR_BOOTSTRAP = 200   # once per prepare
EVAL_BOOTSTRAP = 100    # every evaluation round: the generated set's own interval (context)
FLOOR_SEED = 0


@dataclass
class MetricPanel:
    sites: tuple[str, ...]
    class_names: tuple[str, ...]
    units: dict[str, TissueUnits]
    samples: dict[str, int]
    scorers: dict[str, ReferenceScorer] = field(repr=False)
    floors: dict[str, dict[str, Interval]] = field(repr=False)
    split: dict[str, SplitSite] = field(repr=False)
    last_histograms: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def prepare(cls, split: dict[str, SplitSite], samples: dict[str, int],
                class_names: tuple[str, ...], units: dict[str, TissueUnits]) -> "MetricPanel":
        scorers, floors = {}, {}
        for site, half in split.items():
            n = samples[site]
            scorers[site] = ReferenceScorer(ImageSet(half.ref_images, half.ref_labels),
                                            standard_metrics(class_names, units[site]),
                                            bootstrap=FLOOR_BOOTSTRAP)
            floors[site] = scorers[site].score(ImageSet(half.cond_images[:n], half.cond_labels[:n]),
                                               seed=FLOOR_SEED)
        return cls(sites=tuple(split), class_names=tuple(class_names), units=dict(units),
                   samples=dict(samples), scorers=scorers, floors=floors, split=split)

    def score(self, site: str, images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, float]:
        scores = self.scorers[site].score(ImageSet(images, labels), seed=seed % 2 ** 32,
                                          bootstrap=EVAL_BOOTSTRAP)
        floor = self.floors[site]
        out: dict[str, float] = {f"panel_n/{site}": float(len(images))}
        worse = 0
        for key in REPORTED:
            if key not in scores:
                continue
            got, ref = scores[key], floor[key]
            out.update({f"{key}/{site}": got.value, f"{key}_lo/{site}": got.low, f"{key}_hi/{site}": got.high,
                        f"{key}_floor/{site}": ref.value, f"{key}_floor_lo/{site}": ref.low,
                        f"{key}_floor_hi/{site}": ref.high})
            if key in HEADLINE and floor_verdict(got.value, ref, quantity(key).higher_is_worse) != "at floor":
                worse += 1
        out[f"headline_worse/{site}"] = float(worse)
        self.last_histograms[site] = self._histograms(site, images, labels)
        return out

    def _histograms(self, site: str, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        half, units = self.split[site], self.units[site]
        real = pooled_histograms(tissue_histograms(half.ref_images, half.ref_labels, self.class_names), units)
        generated = pooled_histograms(tissue_histograms(images, labels, self.class_names), units)
        return {"units": units.name, "centres": real["centres"], "real": real["density"],
                "generated": generated["density"]}

    def info(self) -> dict[str, Any]:
        return {"headline": list(HEADLINE), "reported": list(REPORTED), "floor_bootstrap": FLOOR_BOOTSTRAP,
                "eval_bootstrap": EVAL_BOOTSTRAP, "random_features": RANDOM_FEATURES,
                "random_features_sha256": RandomConvFeatures().sha256(),
                "tissue_units": {s: u.name for s, u in self.units.items()},
                "classes": list(self.class_names), "panel_samples": self.samples,
                "floors": {s: {k: v.as_dict() for k, v in f.items() if k in REPORTED}
                           for s, f in self.floors.items()},
                "quantities": {k: {"title": quantity(k).title, "unit": quantity(k).unit,
                                   "higher_is_worse": quantity(k).higher_is_worse} for k in REPORTED}}
