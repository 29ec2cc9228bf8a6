"""Oracle tests: FD against a numpy/scipy reference, KID against a slow pairwise loop."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from medgen.evaluation.feature_metrics import frechet_distance, kid, kid_with_ci


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def reference_kid(a: np.ndarray, b: np.ndarray) -> float:
    d = a.shape[1]
    k = lambda x, y: (float(x @ y) / d + 1.0) ** 3  # noqa: E731
    n, m = len(a), len(b)
    kaa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kbb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return kaa + kbb - 2 * kab


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 8))
    return rng.normal(size=(200, 8)) @ mix, rng.normal(size=(150, 8)) @ mix * 1.3 + 0.5


def test_frechet_matches_scipy_reference(feats):
    a, b = feats
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(reference_frechet(a, b), rel=1e-6)


def test_frechet_of_identical_sets_is_zero_and_grows_with_mean_shift(feats):
    a, _ = feats
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = [frechet_distance(a, a + s) for s in (0.5, 1.0, 2.0)]
    # same covariance: FD = |shift|^2 * D exactly
    assert shifted == pytest.approx([0.25 * 8, 1.0 * 8, 4.0 * 8], rel=1e-5)


def test_kid_matches_slow_unbiased_reference(feats):
    a, b = feats[0][:40], feats[1][:30]
    assert kid(a, b) == pytest.approx(reference_kid(a, b), rel=1e-9)


def test_kid_is_unbiased_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(1)
    same = [kid(rng.normal(size=(60, 16)), rng.normal(size=(60, 16))) for _ in range(20)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) + 1e-3
    assert kid(rng.normal(size=(60, 16)), rng.normal(size=(60, 16)) + 1.0) > 10 * max(abs(v) for v in same)


def test_kid_bootstrap_interval_covers_the_estimate_and_separates_a_shift(feats):
    a, b = feats
    same = kid_with_ci(a[:100], a[100:], bootstrap=200, seed=3)
    shifted = kid_with_ci(a[:100], a[100:] + 2.0, bootstrap=200, seed=3)
    assert same.low <= same.value <= same.high and shifted.low <= shifted.value <= shifted.high
    assert same.low < 0 < same.high  # same distribution: zero inside the interval
    assert shifted.low > same.high    # a real difference lies above it
    assert (same.n_a, same.n_b, same.bootstrap) == (100, 100, 200)
    again = kid_with_ci(a[:100], a[100:], bootstrap=200, seed=3)
    assert (again.low, again.high) == (same.low, same.high)  # seeded


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="feats_a"):
        frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        kid(np.full((4, 2), np.nan), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(np.zeros((4, 2)), np.zeros((4, 3)))
