"""Distances between two sets of feature vectors: Frechet distance and KID.

Both take features [N, D] from the project's own extractor (evaluation/networks.py), so
the Frechet distance is reported as ``FD_<extractor>``, never as "FID" (that name belongs
to Inception features, which cannot be downloaded here; EVALUATION.md).

- Frechet distance: MONAI's ``FIDMetric`` (monai.metrics.fid), which works on any
  feature vectors. It is biased at small N, so the evaluator always reports it beside a
  real-vs-real floor at the same N.
- KID (Binkowski et al. 2018): the unbiased estimator of the squared MMD with the cubic
  polynomial kernel k(x, y) = (x.y / D + 1)^3. MONAI 1.6 has no KID, so it is written
  here, with a percentile bootstrap confidence interval.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import FIDMetric


def _as_features(name: str, feats: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(feats).detach().to("cpu", torch.float64)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a feature matrix [N, D], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 feature vectors, got {tensor.shape[0]}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (MONAI FIDMetric)."""
    a, b = _as_features("feats_a", feats_a), _as_features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    with warnings.catch_warnings():
        # MONAI passes scipy's deprecated `disp` argument to sqrtm; harmless here
        warnings.simplefilter("ignore", DeprecationWarning)
        value = float(FIDMetric()(a, b))
    # the matrix square root of a rank-deficient product can leave -1e-12-size residue
    return max(value, 0.0)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """KID's kernel (x.y / D + coef0) ** degree for all pairs: [Nx, Ny]."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def _kernels(feats_a, feats_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # numpy, not torch: the bootstrap is many tiny ops, and torch's thread pool makes
    # each of them slow on a loaded machine
    a = _as_features("feats_a", feats_a).numpy()
    b = _as_features("feats_b", feats_b).numpy()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)


def _unbiased(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray) -> float:
    n, m = len(k_aa), len(k_bb)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


def kid(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel (can be slightly negative)."""
    return _unbiased(*_kernels(feats_a, feats_b))


@dataclass(frozen=True)
class KidEstimate:
    value: float        # KID on the full sets
    low: float          # percentile bootstrap interval
    high: float
    n_a: int
    n_b: int
    bootstrap: int
    seed: int


def kid_with_ci(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray,
                bootstrap: int = 200, level: float = 0.95, seed: int = 0) -> KidEstimate:
    """KID plus a percentile bootstrap CI (both sets resampled with replacement).

    A resample holds duplicates; the unbiased estimator must not pair a vector with a copy
    of itself (that pair is k(x, x), the diagonal it excludes), so pairs whose underlying
    indices coincide are masked out of the within-set means.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be >= 1, got {bootstrap}")
    k_aa, k_bb, k_ab = _kernels(feats_a, feats_b)
    n, m = len(k_aa), len(k_bb)
    rng = np.random.default_rng(seed)
    values = np.empty(bootstrap)
    for i in range(bootstrap):
        values[i] = kid_resampled(k_aa, k_bb, k_ab, rng.integers(0, n, n), rng.integers(0, m, m))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return KidEstimate(value=_unbiased(k_aa, k_bb, k_ab), low=float(low), high=float(high),
                       n_a=n, n_b=m, bootstrap=bootstrap, seed=seed)


def kid_resampled(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray,
                  index_a: np.ndarray, index_b: np.ndarray) -> float:
    """KID of the rows ``index_a`` / ``index_b`` (with repeats) of precomputed kernels."""
    return (_masked_mean(k_aa, index_a) + _masked_mean(k_bb, index_b)
            - 2 * float(k_ab[np.ix_(index_a, index_b)].mean()))


def _masked_mean(kernel: np.ndarray, index: np.ndarray) -> float:
    block = kernel[np.ix_(index, index)]
    distinct = index[:, None] != index[None, :]
    if not distinct.any():  # every draw the same vector: no within-set pair exists
        return 0.0
    return float(block[distinct].mean())
