"""Fidelity and diversity as separate numbers: precision/recall and density/coverage.

A single distance cannot say whether a generator is *wrong* (samples off the real
manifold) or *narrow* (samples on it, but only part of it). k-nearest-neighbour balls
estimate each manifold (Kynkaenniemi et al. 2019; Naeem et al. 2020), with k = 5 as Naeem
et al. recommend:

- precision: fraction of generated samples inside some real sample's k-NN ball (fidelity);
- recall: fraction of real samples inside some generated sample's k-NN ball (diversity);
- density: mean number of real balls a generated sample falls in, divided by k (about 1 for
  a perfect generator, robust to real outliers, unlike precision);
- coverage: fraction of real samples whose ball holds at least one generated sample
  (diversity; robust to generated outliers, unlike recall).

All four are "higher is better". Mode collapse shows as low recall/coverage; a noisy or
blurred generator as low precision/density. Written here because the reference package
(``prdc``) is not installed; scipy's ``cdist`` computes the distances. Distances are
Euclidean on whatever features are given (random_features.py standardises them).

Bootstrap replicates repeat rows: a row's copy is not its neighbour, so radii are taken
over pairs of *different* underlying rows (``distinct_pairs``). Genuinely duplicated
samples (different rows with equal features) are still neighbours at distance 0, which is
what makes duplicated generated samples cost recall.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

from medgen.evaluation.bootstrap import Statistic, distinct_pairs

NEAREST_K = 5


def knn_radii(within: np.ndarray, index: np.ndarray, k: int = NEAREST_K) -> np.ndarray:
    """Distance of each resampled row to its k-th nearest *other* row of the same set.

    A tiny (resampled) set with k or fewer distinct rows uses its farthest other row
    instead; a set of one distinct row has no neighbour (radius 0).
    """
    block = within[np.ix_(index, index)].copy()
    block[~distinct_pairs(index)] = np.inf
    k = min(k, len(np.unique(index)) - 1)
    if k < 1:
        return np.zeros(len(index))
    return np.partition(block, k - 1, axis=1)[:, k - 1]


def precision_recall_density_coverage(cross: np.ndarray, real_radii: np.ndarray,
                                      fake_radii: np.ndarray, k: int = NEAREST_K) -> dict[str, float]:
    """From distances cross[fake j, real i] and both sets' k-NN radii."""
    in_real_ball = cross <= real_radii[None, :]
    return {"precision": float(in_real_ball.any(axis=1).mean()),
            "recall": float((cross <= fake_radii[:, None]).any(axis=0).mean()),
            "density": float(in_real_ball.sum() / (k * cross.shape[0])),
            "coverage": float((cross.min(axis=0) < real_radii).mean())}


def fidelity_diversity_statistic(fake: np.ndarray, real: np.ndarray, k: int = NEAREST_K) -> Statistic:
    """Precision, recall, density, coverage of ``fake`` [Na, D] against ``real`` [Nb, D]."""
    fake_within, real_within, cross = cdist(fake, fake), cdist(real, real), cdist(fake, real)

    def statistic(index_a: np.ndarray, index_b: np.ndarray) -> dict[str, float]:
        return precision_recall_density_coverage(
            cross[np.ix_(index_a, index_b)], knn_radii(real_within, index_b, k),
            knn_radii(fake_within, index_a, k), k)

    return statistic
