"""The set metrics, what each number means, and scoring a set against a real reference.

A *set metric* compares a candidate set of images (generated, or degraded real images in
the sanity suite) with a reference set of real held-out images. Each one is split into
``describe`` (per-image descriptors, computed once per set) and ``statistic`` (a function
of two index arrays, so the bootstrap resamples images without recomputing anything;
bootstrap.py). ``ReferenceScorer`` describes the reference once and scores any number of
candidates against it, every quantity with its percentile bootstrap interval.

Quantities (``QUANTITIES``; per-level and per-class keys share their family's entry):

    swd, swd_<side>px   Laplacian-pyramid sliced Wasserstein distance (laplacian_swd.py)
    psd                 radially averaged power spectrum distance, dB (power_spectrum.py)
    tissue_w1[_<class>] per-tissue intensity Wasserstein-1, HU for CT (tissue_intensity.py)
    tissue_texture      per-tissue fine-band (noise, sharpness) W1, in reference s.d.
    tissue_bands        both bands together, in reference s.d. (dimensionless)
    kid_rand            KID on untrained random-conv features (random_features.py)
    precision, recall, density, coverage   on the same features (density_coverage.py)
    fd_medgenenc, kid_medgenenc   FD and KID on medgen's TRAINED encoder (networks.py), the
                        old headline, kept to show what the sanity suite says about it

Titles, units, directions and the HEADLINE list live in quantities.py (plain data, so
the report can read them without torch); they are re-exported here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from medgen.evaluation.bootstrap import DEFAULT_BOOTSTRAP, Interval, Statistic, bootstrap_intervals
from medgen.evaluation.feature_metrics import frechet_distance, kid_resampled, polynomial_kernel
from medgen.evaluation.laplacian_swd import describe_patches, swd_statistic
from medgen.evaluation.power_spectrum import radial_log_spectra, spectrum_statistic
from medgen.evaluation.quantities import (HEADLINE, QUANTITIES, REQUIRED_SAMPLES,  # noqa: F401 (re-exported)
                                          Quantity, floor_verdict, quantity)
from medgen.evaluation.random_features import RandomConvFeatures, random_feature_statistic
from medgen.evaluation.tissue_intensity import TissueUnits, tissue_histograms, tissue_statistic

PATCH_SEED = 0   # patch positions: the same for every set, so paired sets are compared alike


@dataclass(frozen=True)
class ImageSet:
    """Images [N,1,H,W] in [-1, 1]; labels [N,H,W] (a generated set: its conditioning maps)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)


class SetMetric(Protocol):
    name: str
    needs_labels: bool

    def describe(self, images: ImageSet) -> Any: ...

    def statistic(self, candidate: Any, reference: Any) -> Statistic: ...


class LaplacianSWD:
    name, needs_labels = "swd", False

    def describe(self, images: ImageSet) -> Any:
        return describe_patches(images.images, seed=PATCH_SEED)

    def statistic(self, candidate: Any, reference: Any) -> Statistic:
        return swd_statistic(candidate, reference)


class PowerSpectrum:
    name, needs_labels = "psd", False

    def describe(self, images: ImageSet) -> Any:
        return radial_log_spectra(images.images)

    def statistic(self, candidate: Any, reference: Any) -> Statistic:
        return spectrum_statistic(candidate, reference)


class TissueIntensity:
    name, needs_labels = "tissue_w1", True

    def __init__(self, class_names: Sequence[str], units: TissueUnits = TissueUnits()):
        self.class_names, self.units = tuple(class_names), units

    def describe(self, images: ImageSet) -> Any:
        return tissue_histograms(images.images, images.labels, self.class_names)

    def statistic(self, candidate: Any, reference: Any) -> Statistic:
        return tissue_statistic(candidate, reference, self.units)


class RandomFeatures:
    name, needs_labels = "random_features", False

    def __init__(self) -> None:
        self.network = RandomConvFeatures()

    def describe(self, images: ImageSet) -> Any:
        return self.network.features(images.images)

    def statistic(self, candidate: Any, reference: Any) -> Statistic:
        return random_feature_statistic(candidate, reference)


class TrainedEncoderFeatures:
    """FD and KID on the features of a trained ``FeatureNet`` (evaluator.py's extractor)."""

    name, needs_labels = "medgenenc", False

    def __init__(self, extractor: Any):
        self.extractor = extractor

    def describe(self, images: ImageSet) -> Any:
        return self.extractor.features(images.images).double().numpy()

    def statistic(self, candidate: Any, reference: Any) -> Statistic:
        kernels = (polynomial_kernel(candidate, candidate), polynomial_kernel(reference, reference),
                   polynomial_kernel(candidate, reference))

        def statistic(index_a: np.ndarray, index_b: np.ndarray) -> dict[str, float]:
            with warnings.catch_warnings():  # resamples repeat rows: singular covariances are expected
                warnings.simplefilter("ignore")
                fd = frechet_distance(candidate[index_a], reference[index_b])
            return {"fd_medgenenc": fd, "kid_medgenenc": kid_resampled(*kernels, index_a, index_b)}

        return statistic


def standard_metrics(class_names: Sequence[str], units: TissueUnits = TissueUnits()) -> list[SetMetric]:
    return [LaplacianSWD(), PowerSpectrum(), TissueIntensity(class_names, units), RandomFeatures()]


class ReferenceScorer:
    """A real reference set, described once, against which candidate sets are scored."""

    def __init__(self, reference: ImageSet, metrics: Sequence[SetMetric],
                 bootstrap: int = DEFAULT_BOOTSTRAP):
        self.reference, self.bootstrap = reference, bootstrap
        self.metrics = [m for m in metrics if not (m.needs_labels and reference.labels is None)]
        self.descriptors = {m.name: m.describe(reference) for m in self.metrics}

    def score(self, candidate: ImageSet, seed: int = 0, bootstrap: int | None = None) -> dict[str, Interval]:
        """Every quantity of every metric, with its interval (label metrics need labels)."""
        if candidate.images.shape[1:] != self.reference.images.shape[1:]:
            raise ValueError(f"candidate images {tuple(candidate.images.shape)} and reference "
                             f"{tuple(self.reference.images.shape)} differ in size")
        out: dict[str, Interval] = {}
        for metric in self.metrics:
            if metric.needs_labels and candidate.labels is None:
                continue
            statistic = metric.statistic(metric.describe(candidate), self.descriptors[metric.name])
            out.update(bootstrap_intervals(statistic, len(candidate), len(self.reference),
                                           self.bootstrap if bootstrap is None else bootstrap, seed=seed))
        return out
