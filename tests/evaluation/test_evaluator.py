"""Evaluator: right generators score near the floor, wrong ones do not; deterministic; cached."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_heldout import NoiseRecipe, RenderingRecipe

import medgen.evaluation.evaluator as evaluator_module
from medgen.config import RunConfig
from medgen.evaluation.evaluator import Evaluator
from medgen.evaluation.heldout_split import HeldoutDataError
from medgen.evaluation.networks import TrainSettings

FAST = TrainSettings(steps=60, batch_size=16, widths=(8, 16, 16, 32), feature_dim=16)
CONFIG = RunConfig(sites="A,B", image_size=32, eval_samples=64, seed=3)


@pytest.fixture(scope="module")
def prepared(heldout_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Evaluator.prepare(CONFIG, heldout_root / "heldout", cache, settings=FAST), cache
    finally:
        torch.set_num_threads(previous)


def test_prepare_reports_classifier_quality_floor_and_hashes(prepared):
    ev, _ = prepared
    assert ev.extractor_name == "FD_medgenenc-v1"
    assert ev.classifier_real_acc == {"A": 1.0, "B": 1.0}
    assert ev.num_eval == {"A": 8, "B": 8}  # eval_samples capped at the conditioning half
    assert all(v >= 0 and math.isfinite(v) for v in ev.floor.values())
    assert len(ev.extractor_sha256) == 64 and ev.extractor_sha256 != ev.classifier_sha256


def test_right_generator_scores_near_floor_and_wrong_site_far_above(prepared, dummy_model):
    ev, _ = prepared
    right = ev.evaluate(RenderingRecipe(), dummy_model, server_round=1)
    wrong = ev.evaluate(RenderingRecipe(wrong_site=True), dummy_model, server_round=1)
    noise = ev.evaluate(NoiseRecipe(), dummy_model, server_round=1)
    assert all(isinstance(v, float) for v in right.values())
    for site in ("A", "B"):
        assert right[f"site_acc/{site}"] == 1.0 and wrong[f"site_acc/{site}"] == 0.0
        assert wrong[f"fd/{site}"] > 10 * max(right[f"fd/{site}"], right[f"fd_floor/{site}"])
        assert noise[f"fd/{site}"] > 10 * max(right[f"fd/{site}"], right[f"fd_floor/{site}"])
        assert wrong[f"kid_lo/{site}"] > right[f"kid_hi/{site}"]
        assert right[f"kid_lo/{site}"] <= right[f"kid/{site}"] <= right[f"kid_hi/{site}"]
        assert right[f"n_gen/{site}"] == 8.0 and right[f"n_ref/{site}"] == 8.0
    assert right["site_acc_mean"] == 1.0
    assert wrong["fd_mean"] == pytest.approx((wrong["fd/A"] + wrong["fd/B"]) / 2)


def test_evaluation_is_deterministic_per_round(prepared, dummy_model):
    ev, _ = prepared
    first = ev.evaluate(NoiseRecipe(), dummy_model, server_round=2)
    assert ev.evaluate(NoiseRecipe(), dummy_model, server_round=2) == first
    other = ev.evaluate(NoiseRecipe(), dummy_model, server_round=3)
    assert other["seed/A"] != first["seed/A"] and other["fd/A"] != first["fd/A"]


def test_nonfinite_samples_are_counted_not_fatal(prepared, dummy_model):
    class HalfNaN(RenderingRecipe):
        def sample(self, model, label_maps, site_index, generator=None):
            out = super().sample(model, label_maps, site_index, generator)
            out[:, :, :16] = float("nan")
            return out

    result = prepared[0].evaluate(HalfNaN(), dummy_model, server_round=1)
    assert result["nonfinite/A"] == pytest.approx(0.5)
    assert all(math.isfinite(v) for v in result.values())


def test_wrong_sample_shape_is_a_clear_error(prepared, dummy_model):
    class Flat(NoiseRecipe):
        def sample(self, model, label_maps, site_index, generator=None):
            return torch.zeros(len(label_maps), 32, 32)

    with pytest.raises(ValueError, match=r"\[N,1,H,W\]"):
        prepared[0].evaluate(Flat(), dummy_model, server_round=1)


def test_second_prepare_loads_cache_without_training(prepared, heldout_root, monkeypatch):
    ev, cache = prepared

    def refuse(*args, **kwargs):
        raise AssertionError("trained again although the cache holds the weights")

    monkeypatch.setattr(evaluator_module, "train_feature_net", refuse)
    monkeypatch.setattr(evaluator_module, "train_site_classifier", refuse)
    again = Evaluator.prepare(CONFIG, heldout_root / "heldout", cache, settings=FAST)
    assert (again.extractor_sha256, again.classifier_sha256) == (ev.extractor_sha256, ev.classifier_sha256)
    assert again.floor == ev.floor
    # another training config is another key: it must train
    with pytest.raises(AssertionError, match="trained again"):
        Evaluator.prepare(CONFIG, heldout_root / "heldout", cache,
                          settings=TrainSettings(**{**FAST.as_dict(), "steps": 61}))


def test_corrupt_cache_is_rebuilt(prepared, heldout_root, tmp_path):
    ev, cache = prepared
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    cached = next(copy.glob("evaluator-*.pt"))
    cached.write_bytes(b"not a checkpoint")
    rebuilt = Evaluator.prepare(CONFIG, heldout_root / "heldout", copy, settings=FAST)
    assert rebuilt.extractor_sha256 == ev.extractor_sha256  # deterministic retraining
    assert cached.stat().st_size > 1000


def test_missing_site_is_named(heldout_root, tmp_path):
    with pytest.raises(HeldoutDataError, match="site\\(s\\) C"):
        Evaluator.prepare(CONFIG.replace(sites="A,B,C"), heldout_root / "heldout", tmp_path, settings=FAST)


def test_sample_grid_png_has_one_row_per_site_plus_maps(prepared, dummy_model, tmp_path):
    ev, _ = prepared
    path = tmp_path / "samples" / "round_001.png"
    ev.write_sample_grid(RenderingRecipe(), dummy_model, 1, path)
    image = np.asarray(Image.open(path).convert("L"))
    cell = 64 + 2  # 32 px cells enlarged to 64, 2 px gaps
    assert image.shape[0] == 3 * cell  # label-map row + sites A and B
    row_a, row_b = image[cell:cell + 64, -64:], image[2 * cell:2 * cell + 64, -64:]
    assert np.abs(row_a.astype(float) - row_b).mean() > 20  # the two site styles differ
    assert not list(path.parent.glob("*.tmp"))


def test_the_registered_dp_cgan_recipe_can_be_evaluated(prepared, tmp_path):
    """Interface check against the real recipe (models/dp_cgan.py), untrained."""
    from medgen.models.registry import build_recipe

    ev, _ = prepared
    recipe = build_recipe(CONFIG)
    model = recipe.build()
    metrics = ev.evaluate(recipe, model, server_round=1)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["fd_mean"] > metrics["fd_floor_mean"]  # an untrained generator is not real
    assert model.training  # evaluation left the model's mode as it found it
    ev.write_sample_grid(recipe, model, 1, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_too_few_eval_samples_is_refused(heldout_root, tmp_path):
    from medgen.config import ConfigError

    with pytest.raises(ConfigError, match="eval-samples"):
        Evaluator.prepare(CONFIG.replace(eval_samples=1), heldout_root / "heldout", tmp_path, settings=FAST)


def test_metric_panel_scores_every_site_beside_its_floor(prepared, dummy_model, tmp_path):
    ev, _ = prepared
    right = ev.evaluate(RenderingRecipe(), dummy_model, server_round=1)
    wrong = ev.evaluate(RenderingRecipe(wrong_site=True), dummy_model, server_round=1)
    for site in ("A", "B"):
        for key in ("tissue_bands", "swd", "psd", "kid_rand", "coverage"):
            for suffix in ("", "_lo", "_hi", "_floor", "_floor_lo", "_floor_hi"):
                assert f"{key}{suffix}/{site}" in right
        assert right[f"panel_n/{site}"] == 8.0
        assert right[f"tissue_bands_floor/{site}"] == wrong[f"tissue_bands_floor/{site}"]  # one floor
        assert wrong[f"tissue_bands/{site}"] > wrong[f"tissue_bands_floor_hi/{site}"] > right[f"tissue_bands/{site}"]
        assert wrong[f"headline_worse/{site}"] >= 1
    ev.write_sample_grid(RenderingRecipe(wrong_site=True), dummy_model, 1, tmp_path / "round_001.png")
    histograms = json.loads((tmp_path / "round_001.tissue.json").read_text())
    assert set(histograms) == {"A", "B"} and set(histograms["A"]["real"]) == {"background", "csf", "gm", "wm"}
    assert ev.info()["panel"]["headline"] == ["tissue_bands"]
