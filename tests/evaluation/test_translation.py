"""Ground-truth translation evaluation: metric oracles, baselines, the table, the outputs.

Synthetic paired held-out data in memory: ellipse anatomies rendered at two "sites" with
opposite tissue contrast (T1-like A, T2-like B), 32 px.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgen.data.site_data import HeldoutSite
from medgen.evaluation.translation import (acceptance, brain_masks, classical_baselines,
                                           evaluate_translation, mean_tissue_dice,
                                           render_section, score_pair, train_target_segmenters,
                                           write_translation_outputs)
from medgen.models.segmenter import SegmenterSettings

SIZE = 32
CONTRAST = {"A": (-1.0, -0.5, 0.1, 0.8), "B": (-1.0, 0.8, 0.1, -0.5)}  # bg, CSF, GM, WM


def ellipses(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    out = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        cx, cy = ((torch.rand(2, generator=gen) - 0.5) * 0.3).tolist()
        a, b = (0.7 + 0.2 * torch.rand(2, generator=gen)).tolist()
        r = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2
        out[i][r < 1.0], out[i][r < 0.75], out[i][r < 0.4], out[i][r < 0.06] = 1, 2, 3, 1
    return out


def site(labels: torch.Tensor, name: str, seed: int) -> HeldoutSite:
    clean = torch.tensor(CONTRAST[name])[labels][:, None]
    noise = 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    subjects = tuple(f"s{i}" for i in range(labels.shape[0]))
    return HeldoutSite((clean + noise).clamp(-1, 1), clean, labels, subjects, [])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@pytest.fixture(scope="module")
def heldout():
    torch.set_num_threads(1)
    fit_labels, test_labels = ellipses(16, 0), ellipses(8, 1)
    fit = {s: site(fit_labels, s, 10 + k) for k, s in enumerate(CONTRAST)}
    test = {s: site(test_labels, s, 20 + k) for k, s in enumerate(CONTRAST)}
    return fit, test


@pytest.fixture(scope="module")
def segmenters(heldout):
    torch.set_num_threads(1)
    return train_target_segmenters(heldout[0], SegmenterSettings(steps=60, batch_size=8,
                                                                  channels=(8, 16, 32)), seed=0)


def test_metrics_match_scikit_image_and_a_numpy_dice(heldout):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    _, test = heldout
    rng = np.random.default_rng(3)
    pred = (test["B"].clean + torch.from_numpy(rng.normal(0, 0.1, test["B"].clean.shape)).float()).clamp(-1, 1)
    scores = score_pair(pred, test["B"], None, None)
    masks = brain_masks(test["B"].labels).numpy()
    p, t = pred[:, 0].double().numpy(), test["B"].clean[:, 0].double().numpy()
    mse = [np.mean((p[i][masks[i]] - t[i][masks[i]]) ** 2) for i in range(len(p))]
    assert scores["psnr"] == pytest.approx(np.mean([10 * np.log10(4.0 / m) for m in mse]), rel=1e-6)
    assert scores["mae"] == pytest.approx(np.mean([np.abs(p[i] - t[i])[masks[i]].mean() for i in range(len(p))]), rel=1e-6)
    # SSIM: scikit-image's Gaussian-window map, averaged inside the mask away from the border
    pad = 5
    ref = []
    for i in range(len(p)):
        _, full = structural_similarity(p[i], t[i], data_range=2.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, full=True)
        inner = masks[i][pad:-pad, pad:-pad]
        ref.append(full[pad:-pad, pad:-pad][inner].mean())
    assert scores["ssim"] == pytest.approx(np.mean(ref), abs=1e-4)
    # whole-image PSNR without a mask agrees with scikit-image too (sanity of the scale)
    assert 10 * np.log10(4.0 / np.mean((p[0] - t[0]) ** 2)) == pytest.approx(
        peak_signal_noise_ratio(t[0], p[0], data_range=2.0))

    true = test["B"].labels
    pred_labels = true.clone()
    pred_labels[:, :, :SIZE // 2] = 0  # erase the left half: Dice drops by a computable amount
    expected = []
    for c in (1, 2, 3):
        per_image = []
        for i in range(true.shape[0]):
            a, b = pred_labels[i] == c, true[i] == c
            per_image.append(2 * (a & b).sum().item() / (a.sum() + b.sum()).item())
        expected.append(np.mean(per_image))
    assert mean_tissue_dice(pred_labels, true) == pytest.approx(np.mean(expected), rel=1e-6)
    assert mean_tissue_dice(true, true) == pytest.approx(1.0)


def test_baselines_identity_hm_and_inverted_hm(heldout):
    fit, test = heldout
    baselines = classical_baselines(fit)
    x = test["A"].images
    assert torch.equal(baselines["identity"](x, "A", "B"), x)
    # HM output takes the reference histogram's values: its sorted pixels follow the pool's
    hm = baselines["hist-match"](x, "A", "B")
    pooled = np.sort(fit["B"].images.numpy().ravel())
    quantiles = np.quantile(pooled, [0.1, 0.5, 0.9])
    assert np.quantile(hm.numpy().ravel(), [0.1, 0.5, 0.9]) == pytest.approx(quantiles, abs=0.05)
    # HM is rank-preserving; inverted HM reverses ranks on the foreground, keeps them outside
    inv = baselines["inv-hist-match"](x, "A", "B")
    for i in range(x.shape[0]):
        m = x[i, 0].numpy() > -0.8
        src, plain, flipped = x[i, 0].numpy(), hm[i, 0].numpy(), inv[i, 0].numpy()
        assert spearman(src.ravel(), plain.ravel()) > 0.95
        assert spearman(src[m], flipped[m]) < -0.95
        assert spearman(src[~m], flipped[~m]) > 0.5
    assert torch.equal(test["A"].images, x)  # input untouched


def test_table_scores_a_perfect_translator_above_baselines_and_dice_fraction(heldout, segmenters, tmp_path):
    fit, test = heldout
    translators = dict(classical_baselines(fit))
    translators["oracle"] = lambda images, s, t: test[t].clean.clone()
    results = evaluate_translation(test, translators, segmenters)
    assert set(results["pairs"]) == {"A->B", "B->A"}
    assert results["reference_dice"]["B"] > 0.8  # the target segmenter works on real B
    row = results["pairs"]["A->B"]
    assert row["oracle"]["ssim"] > 0.99 and row["oracle"]["dice_fraction"] > 0.9
    # an untranslated T1 image looks wrong to a T2 segmenter: Dice fraction far below 0.9
    assert row["identity"]["dice_fraction"] < 0.7
    verdict = acceptance(results, "oracle")
    assert all(v["beats_baseline_ssim"] and v["dice_ok"] for v in verdict.values())
    assert not any(v["beats_baseline_ssim"] for v in acceptance(results, "identity").values()
                   if v["best_baseline"] != "identity")

    written = write_translation_outputs(tmp_path, results, test, translators, examples=2)
    assert json.loads((tmp_path / "translation.json").read_text())["n"] == 8
    assert {p.name for p in written} >= {"translation.json", "A-to-B.png", "B-to-A.png"}
    from PIL import Image
    grid = Image.open(tmp_path / "translation" / "A-to-B.png")
    assert grid.size[0] > 5 * SIZE and grid.size[1] > 2 * SIZE  # 2 rows x (source+4 methods+truth)
    assert "<table>" in render_section(results) and "A-&gt;B" not in render_section(results)


def test_unpaired_heldout_is_refused(heldout):
    _, test = heldout
    b = test["B"]
    shuffled = {"A": test["A"], "B": HeldoutSite(b.images, b.clean, b.labels, tuple(reversed(b.subjects)), [])}
    with pytest.raises(ValueError, match="same subjects"):
        evaluate_translation(shuffled, {"identity": lambda x, s, t: x})


def test_wrong_shape_is_a_clear_error(heldout):
    _, test = heldout
    with pytest.raises(ValueError, match="expected"):
        score_pair(test["A"].images[:3], test["B"], None, None)


def test_adaptation_recovery_and_label_free_augmentation():
    from medgen.evaluation.adaptation import heavy_intensity_augmentation, recovery

    results = {"no-adaptation": {"A": 0.9, "C": 0.3}, "in-domain": {"A": 0.9, "C": 0.9},
               "translated-inputs": {"A": 0.9, "C": 0.75}}
    assert recovery(results)["translated-inputs"] == {"C": pytest.approx(0.75)}  # A has no gap
    labels = ellipses(8, 2)
    images = torch.tensor(CONTRAST["A"])[labels][:, None]
    out_a = heavy_intensity_augmentation(images, labels, torch.Generator().manual_seed(0))
    out_b = heavy_intensity_augmentation(images, torch.zeros_like(labels), torch.Generator().manual_seed(0))
    assert torch.equal(out_a, out_b)  # labels are not used
    assert out_a.shape == images.shape and out_a.min() >= -1 and out_a.max() <= 1
    assert not torch.allclose(out_a, images, atol=0.1)


def test_translated_training_data_closes_the_gap_only_when_the_translation_is_right():
    """A segmenter trained on source images translated into the target's contrast (source
    labels kept) segments the target; trained on untranslated source images it does not."""
    from types import SimpleNamespace

    from medgen.evaluation.adaptation import evaluate_adaptation

    def scans(site, labels, seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.tensor(CONTRAST[site])[labels][:, None] + 0.03 * torch.randn(labels.shape[0], 1, SIZE, SIZE,
                                                                                     generator=g)).clamp(-1, 1)

    def oracle(x, source, target):  # each pixel to the nearest source tissue value, then the target's
        index = (x - torch.tensor(CONTRAST[source]).view(1, 4, 1, 1)).abs().argmin(dim=1)
        return torch.tensor(CONTRAST[target])[index][:, None]

    train = {s: (scans(s, ellipses(24, 1 + i), 10 + i), ellipses(24, 1 + i)) for i, s in enumerate("AB")}
    test = {s: SimpleNamespace(images=scans(s, ellipses(16, 50 + i), 60 + i), labels=ellipses(16, 50 + i))
            for i, s in enumerate("AB")}
    settings = SegmenterSettings(steps=60, batch_size=8, lr=5e-3, channels=(8, 16))
    right = evaluate_adaptation("A", train, test, oracle, settings, seed=0)["dice"]
    wrong = evaluate_adaptation("A", train, test, lambda x, s, t: x, settings, seed=0)["dice"]
    assert right["in-domain"]["B"] > 0.8 and right["no-adaptation"]["B"] < 0.6  # a real gap
    for arm in ("translated-training", "translated-training+jitter"):
        assert right[arm]["B"] > 0.8 * right["in-domain"]["B"]
        assert wrong[arm]["B"] < right[arm]["B"] - 0.2
