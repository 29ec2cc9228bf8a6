"""evaluation/translation_truth.py: HU error inside the head, box scores, pairing checks."""

from __future__ import annotations

import pytest
import torch

from medgen.data.heldout_data import HeldoutSite
from medgen.data.intensity import WindowMap
from medgen.evaluation.translation_truth import evaluate_pairs, score

WINDOW = WindowMap(-1000.0, 2000.0)  # 1 unit on [-1, 1] = 1500 HU


def site(seed: int, subjects=("s1", "s2")) -> HeldoutSite:
    labels = torch.zeros(len(subjects), 16, 16, dtype=torch.long)
    labels[:, 4:12, 4:12] = 1
    labels[:, 6:10, 6:10] = 3
    gen = torch.Generator().manual_seed(seed)
    clean = torch.where(labels[:, None] > 0, 0.2 * labels[:, None].float() - 0.4, torch.tensor(-1.0))
    images = clean + 0.01 * torch.randn(clean.shape, generator=gen)
    return HeldoutSite(images, clean, labels, tuple(subjects), [])


def test_hu_error_is_measured_inside_the_head_in_hounsfield_units():
    target = site(0)
    shifted = target.clean.clone()
    head = target.labels[:, None] > 0
    shifted[head] += 0.1  # 150 HU inside the head; the air outside is untouched
    shifted[~head] += 0.5  # outside the head: must not count in mae_hu
    scores = score(shifted, target, None, 4, WINDOW, None)
    assert scores["mae_hu"] == pytest.approx(150.0, rel=1e-5)
    perfect = score(target.clean.clone(), target, None, 4, WINDOW, None)
    assert perfect["mae_hu"] == pytest.approx(0.0, abs=1e-6) and perfect["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert "mae_hu" not in score(shifted, target, None, 4, None, None)  # not a CT target


def test_pairs_must_hold_the_same_subjects_and_translations_the_target_shape():
    test = {"A": site(0), "B": site(1)}
    out = evaluate_pairs(test, {"identity": lambda x, s, t: x}, {}, 4, {"A": None, "B": WINDOW})
    assert set(out["pairs"]) == {"A->B", "B->A"} and "mae_hu" in out["pairs"]["A->B"]["identity"]
    assert "mae_hu" not in out["pairs"]["B->A"]["identity"]
    with pytest.raises(ValueError, match="same subjects"):
        evaluate_pairs({"A": site(0), "B": site(1, ("s2", "s1"))}, {"identity": lambda x, s, t: x}, {}, 4, {})
    with pytest.raises(ValueError, match="shape"):
        evaluate_pairs(test, {"bad": lambda x, s, t: x[:1]}, {}, 4, {})
