"""bench/resolution.py measures what its table claims.

- Every recipe in models/registry has a DP and a plain row at 128 and 256 px (volume
  recipes at 64^3) in the committed bench/results/resolution.json, without error, and each
  row of a recipe with public pre-work records the options that switched it off (mutation:
  deleting a recipe's 256 px rows, or a stale row timed with the pre-work, fails test 1).
- ``BENCH_OPTIONS`` really switches the pre-work off: with them, a round never calls the
  recipe's ``pretrain_segmenter`` and takes no public denoiser step; without them the same
  round does (mutation: emptying BENCH_OPTIONS fails test 2).
- da-gan gets PatientDataset's paired item (CT, label map, MR) and trains a private step
  (mutation: dropping the third tensor makes ``pair_batch`` refuse the batch, test 3).
"""

from __future__ import annotations

import json

import pytest

from bench.common import RESULTS
from bench.resolution import (BENCH_OPTIONS, VOLUME_SIZE, NonPrivateTraining, case_setup, consumes_volumes,
                              plan_for, train_round)
from medgen.models.registry import RECIPES, recipe_class

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PreWorkRan(Exception):
    pass


def test_every_recipe_has_dp_and_plain_rows_at_both_sizes():
    rows = json.loads((RESULTS / "resolution.json").read_text())["rows"]
    found = {(r["recipe"], r["size"], r["mode"]): r for r in rows}
    for name in RECIPES:
        sizes = (VOLUME_SIZE,) if consumes_volumes(name) else (128, 256)
        for size in sizes:
            for mode in ("dp", "plain"):
                row = found.get((name, size, mode))
                assert row is not None, f"no {mode} row for {name} at {size}"
                assert "error" not in row, (name, size, mode, row["error"][-300:])
                assert row["cpu_s_per_step"] > 0 and row["peak_rss_gib"] > 0 and row["private_steps_taken"] == 1
                assert row.get("options", {}) == BENCH_OPTIONS.get(name, {}), (name, size, mode)


def _round(name: str, options: dict | None) -> dict:
    recipe, model, data, public, _ = case_setup(name, 32, 2, options=options)
    private = NonPrivateTraining(plan_for(recipe, len(data), 2), [], seed=0)
    return train_round(recipe, model, data, public, 1, private, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["spcycle-gan", "red-gan", "bridge-translate"])
def test_bench_options_skip_the_public_segmenter_pretraining(name, monkeypatch):
    def pretrain(*args, **kwargs):
        raise PreWorkRan(name)

    monkeypatch.setattr(recipe_class(name), "pretrain_segmenter", pretrain)
    metrics = _round(name, BENCH_OPTIONS[name])
    assert all(v == v for v in metrics.values())
    with pytest.raises(PreWorkRan):  # the recipe's defaults: round 1 pretrains S on public data
        _round(name, {})


@pytest.mark.slow
def test_bench_options_skip_blind_denoise_public_denoiser_steps():
    assert _round("blind-denoise", BENCH_OPTIONS["blind-denoise"])["denoiser_steps"] == 0
    assert _round("blind-denoise", {})["denoiser_steps"] > 0


@pytest.mark.slow
def test_da_gan_trains_on_paired_items():
    recipe, model, data, public, _ = case_setup("da-gan", 32, 2)
    assert len(data[0]) == 3 and data[0][2].shape == data[0][0].shape  # (CT, label map, MR)
    assert _round("da-gan", None)["steps"] == 1.0
