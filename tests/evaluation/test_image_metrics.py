"""Oracle tests for the paired image metrics against scikit-image, numpy and a hand Dice."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medgen.evaluation.image_metrics import dice_per_class, mae, psnr, ssim


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    target = np.sin(xx / 5.0) * np.cos(yy / 7.0)
    pred = target + rng.normal(0, 0.1, target.shape)
    mask = (yy - 16) ** 2 + (xx - 16) ** 2 < 11 ** 2
    return pred, target, mask


def test_psnr_matches_skimage_and_mask_restricts_it(pair):
    pred, target, mask = pair
    assert psnr(pred, target, data_range=2.0) == pytest.approx(
        peak_signal_noise_ratio(target, pred, data_range=2.0), rel=1e-9)
    assert psnr(pred, target, 2.0, mask=mask) == pytest.approx(
        peak_signal_noise_ratio(target[mask], pred[mask], data_range=2.0), rel=1e-9)


def test_ssim_matches_skimage_gaussian_ssim(pair):
    pred, target, _ = pair
    expected = structural_similarity(target, pred, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert ssim(pred, target, data_range=2.0) == pytest.approx(expected, abs=1e-6)
    assert ssim(target, target, data_range=2.0) == pytest.approx(1.0, abs=1e-9)


def test_masked_ssim_is_the_mean_of_skimage_map_over_the_mask(pair):
    pred, target, mask = pair
    _, full = structural_similarity(target, pred, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, full=True)
    valid = np.zeros_like(mask)
    valid[5:-5, 5:-5] = True  # the 11-px window's valid region
    assert ssim(pred, target, 2.0, mask=mask) == pytest.approx(full[mask & valid].mean(), abs=1e-6)
    # corrupt only outside the mask: the masked score must not move
    outside = pred.copy()
    outside[~mask] += 5.0
    inner = mask & valid & _eroded(mask, 5)  # no 11-px window centred here reaches outside
    assert ssim(outside, target, 2.0, mask=inner) == pytest.approx(ssim(pred, target, 2.0, mask=inner), abs=1e-9)
    assert ssim(outside, target, 2.0) < ssim(pred, target, 2.0) - 0.05  # unmasked score does move


def _eroded(mask: np.ndarray, r: int) -> np.ndarray:
    from scipy.ndimage import binary_erosion
    return binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=r)


def test_mae_inside_mask_and_batch_mean(pair):
    pred, target, mask = pair
    assert mae(pred, target, mask) == pytest.approx(np.abs(pred - target)[mask].mean(), rel=1e-12)
    batch_p, batch_t = np.stack([pred, pred * 0]), np.stack([target, target])
    expected = (np.abs(pred - target)[mask].mean() + np.abs(target)[mask].mean()) / 2
    assert mae(batch_p, batch_t, mask) == pytest.approx(expected, rel=1e-12)


def hand_dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    return 2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c))


def test_dice_per_class_matches_hand_computation():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, (2, 16, 16))
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 4, truth.shape))
    scores = dice_per_class(pred, truth)
    assert set(scores) == {1, 2, 3}
    for c in (1, 2, 3):
        expected = np.mean([hand_dice(pred[i], truth[i], c) for i in range(2)])
        assert scores[c] == pytest.approx(expected, rel=1e-6)
    assert dice_per_class(truth, truth) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((8, 8)), np.zeros((8, 9)), 1.0)
    with pytest.raises(ValueError, match="empty"):
        mae(np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="outside"):
        dice_per_class(np.full((4, 4), 7), np.zeros((4, 4), int))
