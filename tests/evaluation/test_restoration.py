"""evaluation/restoration.py: the body region, exact scores (PSNR, SSIM, HU MAE) on known
errors, every task's classical baselines doing their job, and a seeded, shared measurement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medgen.evaluation.restoration import (baselines, body_mask, evaluate_site, mean_over_seeds,
                                           noise_std, scores)
from medgen.models.degradations import Degradation, NoiseModel

SIZE = 32
RICIAN = NoiseModel("rician", 0.05)


def phantom(n: int = 3) -> torch.Tensor:
    """A smooth bright disc with a dark ring inside (a hole for the body mask to fill) on a
    black background, [-1, 1]."""
    yy, xx = torch.meshgrid(torch.arange(SIZE) - SIZE / 2 + 0.5, torch.arange(SIZE) - SIZE / 2 + 0.5,
                            indexing="ij")
    r = torch.sqrt(yy ** 2 + xx ** 2)
    image = torch.where(r < 12, 0.4 + 0.3 * torch.cos(xx / 4) * torch.sin(yy / 5), torch.tensor(-1.0))
    image = torch.where((r > 5) & (r < 6), torch.tensor(-1.0), image)  # a ring darker than the body level
    return image.expand(n, 1, SIZE, SIZE).clone()


def test_body_mask_is_the_thresholded_body_with_its_holes_filled():
    body = body_mask(phantom())
    r = np.hypot(*np.meshgrid(np.arange(SIZE) - SIZE / 2 + 0.5, np.arange(SIZE) - SIZE / 2 + 0.5))
    assert body.shape == (3, SIZE, SIZE)
    assert np.array_equal(body[0], r < 12)  # the dark ring inside is body, the background is not


def test_scores_are_exact_on_a_known_error():
    clean = phantom()
    body = body_mask(clean)
    shifted = clean + 0.1 * torch.from_numpy(body).unsqueeze(1).float()  # +0.1 inside the body only
    s = scores(shifted, clean, body, units_per_step=1500.0)
    assert s["psnr"] == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-6)
    assert s["mae_units"] == pytest.approx(150.0, abs=1e-4)  # 0.1 of a 3000 HU window's half-width
    assert s["n"] == 3 and 0 < s["ssim"] < 1
    perfect = scores(clean, clean, body)
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] > 100 and "mae_units" not in perfect


@pytest.mark.parametrize("task,noise", [("denoise", RICIAN), ("denoise", NoiseModel("correlated", 0.06, 0.8)),
                                        ("sr2", RICIAN), ("inpaint", RICIAN)])
def test_each_classical_baseline_beats_doing_nothing(task, noise):
    clean = phantom(2)
    degradation = Degradation(task, noise)
    d = degradation.apply(clean, torch.Generator().manual_seed(0))
    body = body_mask(clean)
    methods = baselines(degradation, SIZE)
    nothing = d.condition[:, :1]  # the noisy image; the bicubic up-sampling; the hole at 0
    floor = scores(nothing, clean, body)["psnr"]
    for name, restore in methods.items():
        out = restore(d)
        assert out.shape == clean.shape and out.min() >= -1 and out.max() <= 1, name
        if name != "identity":
            assert scores(out, clean, body)["psnr"] > floor - (0.5 if task == "sr2" else 0.0), name
    if task == "inpaint":  # biharmonic fills the hole better than zeros (the ring it cannot know)
        assert scores(methods["biharmonic"](d), clean, body)["psnr"] > floor + 1
    if task == "denoise":  # white noise is their case; correlated grain they remove less of
        gain = 1.0 if noise.kind == "rician" else 0.3
        assert max(scores(methods[m](d), clean, body)["psnr"] for m in ("nl_means", "wavelet")) > floor + gain


def test_noise_std_is_in_network_units():
    assert noise_std(Degradation("denoise", RICIAN)) == pytest.approx(0.1)  # [0, 1] std x 2
    assert noise_std(Degradation("denoise", NoiseModel("correlated", 0.04, 1.0))) == pytest.approx(0.04)


def test_every_method_sees_the_same_seeded_measurement_and_seeds_are_counted():
    clean = phantom(2)
    seen = []

    def spy(d):
        seen.append(d.measurement.clone())
        return d.condition[:, :1]

    degradation = Degradation("denoise", RICIAN)
    a = evaluate_site(degradation, clean, {"spy": spy}, seed=4, skip=("bm3d", "nl_means"))
    b = evaluate_site(degradation, clean, {"spy": spy}, seed=4, skip=("bm3d", "nl_means"))
    assert a == b and torch.equal(seen[0], seen[1])
    assert a["spy"] == a["identity"]  # the learned slot got exactly the baselines' measurement
    assert "nl_means" not in a and "wavelet" in a
    c = evaluate_site(degradation, clean, {"spy": spy}, seed=5, skip=("bm3d",))
    merged = mean_over_seeds([a, c])
    assert merged["identity"]["seeds"] == 2 and merged["nl_means"]["seeds"] == 1
    assert merged["identity"]["psnr"] == pytest.approx((a["identity"]["psnr"] + c["identity"]["psnr"]) / 2)
    assert merged["identity"]["psnr_sd"] > 0  # another seed, another noise draw
