"""Set metrics against slow references (scipy, brute force) and on properties they must have."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from synthetic_heldout import random_anatomy, render

from medgen.evaluation.bootstrap import bootstrap_intervals, multiplicity_weights
from medgen.evaluation.degradations import DEGRADATIONS, blur, most_similar_site, noise, texture_removal
from medgen.evaluation.density_coverage import NEAREST_K, fidelity_diversity_statistic
from medgen.evaluation.feature_metrics import kid, kid_resampled, polynomial_kernel
from medgen.evaluation.laplacian_swd import SortedProjections, laplacian_pyramid, pyramid_up
from medgen.evaluation.power_spectrum import radial_log_spectra, spectrum_statistic
from medgen.evaluation.quantities import RANDOM_FEATURES
from medgen.evaluation.random_features import VERSION, RandomConvFeatures
from medgen.evaluation.set_metrics import ImageSet, ReferenceScorer, floor_verdict, standard_metrics
from medgen.evaluation.tissue_intensity import (BINS, CENTRES, TissueUnits, histogram_w1, tissue_histograms,
                                                tissue_statistic)

CLASSES = ("background", "csf", "gm", "wm")


def phantoms(n: int, seed: int, site: str = "A") -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    maps = [random_anatomy(rng) for _ in range(n)]
    images = np.stack([np.clip(render(m, site, rng), 0, 1) for m in maps]) * 2 - 1
    return torch.tensor(images, dtype=torch.float32)[:, None], torch.tensor(np.stack(maps), dtype=torch.long)


def test_weighted_sliced_w1_matches_scipy_per_direction():
    rng = np.random.default_rng(1)
    proj_a, proj_b = rng.normal(size=(5, 3, 4)), rng.normal(1, 2, size=(7, 3, 4))
    weight_a, weight_b = rng.random(5), rng.random(7)
    weight_a, weight_b = weight_a / weight_a.sum(), weight_b / weight_b.sum()
    expected = np.mean([wasserstein_distance(proj_a[:, :, k].ravel(), proj_b[:, :, k].ravel(),
                                             np.repeat(weight_a, 3), np.repeat(weight_b, 3)) for k in range(4)])
    assert SortedProjections(proj_a, proj_b).w1(weight_a, weight_b) == pytest.approx(expected, rel=1e-5)


def test_laplacian_pyramid_adds_back_up_to_the_image():
    images = torch.randn(3, 1, 64, 48)
    levels = laplacian_pyramid(images)
    assert [tuple(level.shape[-2:]) for level in levels] == [(64, 48), (32, 24)]
    rebuilt = levels[-1]
    for level in reversed(levels[:-1]):
        rebuilt = level + pyramid_up(rebuilt, tuple(level.shape[-2:]))
    assert torch.allclose(rebuilt, images.double(), atol=1e-12)


def test_histogram_w1_matches_scipy_on_bin_centres():
    rng = np.random.default_rng(2)
    a = rng.random((3, BINS)) * (rng.random((3, BINS)) < 0.1)
    b = rng.random((3, BINS)) * (rng.random((3, BINS)) < 0.1)
    got = histogram_w1(a, b, 2 / BINS)
    assert got == pytest.approx([wasserstein_distance(CENTRES[0], CENTRES[0], a[i], b[i]) for i in range(3)])
    assert np.isnan(histogram_w1(np.zeros(BINS), b[0], 2 / BINS))


def test_tissue_w1_is_in_physical_units_for_a_window():
    images, labels = phantoms(8, 0)
    a = tissue_histograms(images, labels, CLASSES)
    b = tissue_histograms((images + 0.1).clamp(-1, 1), labels, CLASSES)
    index = np.arange(8)
    normalised = tissue_statistic(a, b, TissueUnits())(index, index)
    hu = tissue_statistic(a, b, TissueUnits.from_window(-1000, 2000))(index, index)
    assert hu["tissue_w1"] == pytest.approx(1500 * normalised["tissue_w1"])
    assert hu["tissue_bands"] == pytest.approx(normalised["tissue_bands"])   # dimensionless
    assert 0.05 < normalised["tissue_w1_gm"] < 0.11                         # the shift, within clipping


def brute_force_prdc(fake: np.ndarray, real: np.ndarray, k: int) -> dict[str, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]          # column 0 is the point itself

    real_r, fake_r = radii(real), radii(fake)
    cross = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    return {"precision": np.mean([(cross[j] <= real_r).any() for j in range(len(fake))]),
            "recall": np.mean([(cross[:, i] <= fake_r).any() for i in range(len(real))]),
            "density": sum((cross[j] <= real_r).sum() for j in range(len(fake))) / (k * len(fake)),
            "coverage": np.mean([cross[:, i].min() < real_r[i] for i in range(len(real))])}


def test_precision_recall_density_coverage_match_their_definitions():
    rng = np.random.default_rng(3)
    fake, real = rng.normal(0.3, 1, (20, 5)), rng.normal(0, 1, (25, 5))
    got = fidelity_diversity_statistic(fake, real)(np.arange(20), np.arange(25))
    assert got == pytest.approx(brute_force_prdc(fake, real, NEAREST_K))


def test_a_resampled_row_is_not_its_own_neighbour_but_a_true_duplicate_is():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(30, 4))
    statistic = fidelity_diversity_statistic(real, real)
    repeated = np.repeat(np.arange(15), 2)           # a bootstrap draw: every row twice
    assert statistic(repeated, repeated)["recall"] > 0.6
    duplicated = fidelity_diversity_statistic(real[np.repeat(np.arange(15), 2)], real)
    assert duplicated(np.arange(30), np.arange(30))["recall"] < statistic(np.arange(30), np.arange(30))["recall"]


def test_kid_on_resampled_kernels_equals_kid_for_the_identity_draw():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(12, 6)), rng.normal(0.5, 1, size=(15, 6))
    kernels = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    assert kid_resampled(*kernels, np.arange(12), np.arange(15)) == pytest.approx(kid(a, b))


def test_bias_corrected_interval_contains_its_point_estimate_for_a_biased_distance():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(64, 1)), rng.normal(size=(64, 1))

    def statistic(ia, ib):   # pooled W1: biased upwards, more so for resamples with repeats
        return {"w1": wasserstein_distance(a[ia, 0], b[ib, 0])}

    interval = bootstrap_intervals(statistic, 64, 64, bootstrap=100, seed=0)["w1"]
    assert interval.low <= interval.value <= interval.high
    assert multiplicity_weights(np.array([0, 0, 2]), 4) == pytest.approx([2 / 3, 0, 1 / 3, 0])


def test_power_spectrum_sees_blur_as_lost_high_frequencies_and_noise_as_added_ones():
    images, labels = phantoms(16, 7)
    rng = np.random.default_rng(0)
    spectra = radial_log_spectra(images)
    blurred = radial_log_spectra(blur(images, labels, rng)[0])
    noisy = radial_log_spectra(noise(images, labels, rng)[0])
    assert blurred[:, -4:].mean() < spectra[:, -4:].mean() < noisy[:, -4:].mean()
    same = spectrum_statistic(spectra, spectra)(np.arange(16), np.arange(16))["psd"]
    assert same == 0.0


def test_random_features_are_fixed_by_their_seed_and_see_noise():
    images, labels = phantoms(6, 8)
    net, again = RandomConvFeatures(), RandomConvFeatures()
    assert net.sha256() == again.sha256()
    clean = net.features(images)
    noisy = net.features(noise(images, labels, np.random.default_rng(0))[0])
    assert np.allclose(clean, again.features(images))
    assert np.abs(noisy - clean).max() > 1e-2


def test_degradations_keep_shapes_and_conditioning_maps():
    images, labels = phantoms(8, 9)
    for name, degrade in DEGRADATIONS.items():
        out, out_labels = degrade(images, labels, np.random.default_rng(0))
        assert out.shape == images.shape and torch.equal(out_labels, labels), name
        assert out.min() >= -1 and out.max() <= 1, name
    flat, _ = texture_removal(images, labels, None)
    for c in range(4):
        assert flat[0, 0][labels[0] == c].std() < 1e-6
    other, _ = phantoms(8, 9, site="B")
    assert most_similar_site("A", {"A": images, "B": other, "C": -images}) == "B"


def test_scorer_floor_and_verdicts_on_phantoms():
    ref, ref_labels = phantoms(24, 10)
    cand, cand_labels = phantoms(24, 11)
    scorer = ReferenceScorer(ImageSet(ref, ref_labels), standard_metrics(CLASSES), bootstrap=20)
    floor = scorer.score(ImageSet(cand, cand_labels))
    blurred = scorer.score(ImageSet(blur(cand, cand_labels, None, sigma=1.5)[0], cand_labels), bootstrap=2)
    for key in ("swd", "psd", "tissue_bands", "tissue_w1", "kid_rand", "coverage", "precision"):
        assert key in floor and np.isfinite(floor[key].value)
    assert floor_verdict(blurred["tissue_bands"].value, floor["tissue_bands"], True) == "worse than floor"
    assert floor_verdict(blurred["psd"].value, floor["psd"], True) == "worse than floor"
    assert floor_verdict(floor["swd"].value, floor["swd"], True) == "at floor"
    assert "tissue_w1" not in scorer.score(ImageSet(cand), bootstrap=2)   # no labels: no tissue metrics


def test_the_report_reads_quantities_without_loading_torch_and_names_the_network_version():
    assert RANDOM_FEATURES == VERSION
    probe = "import sys, medgen.evaluation.report_cli; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
