"""The prepared GPU check runs to completion as its CPU dry run (``--device cpu``): every
stage (DP steps through the recipe's train_local, sampling, evaluation features) on the
asked device, finite, with the private steps taken and accounted. A recipe that fails is
recorded and makes the script exit 1 (mutation: swallowing a recipe's error as success
fails the second test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def gpu_check(out: Path, *args: str) -> tuple[int, list[dict]]:
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.with_suffix(".json").exists(), done.stderr[-2000:]
    return done.returncode, json.loads(out.with_suffix(".json").read_text())["rows"]


@pytest.mark.slow
def test_cpu_dry_run_of_a_slice_and_a_volume_recipe(tmp_path):
    code, rows = gpu_check(tmp_path / "dry", "--recipes", "dp-cgan", "volume-gan", "--size", "16",
                           "--volume-size", "16", "--batch", "2", "--steps", "1", "--samples", "2")
    assert code == 0, rows
    for row in rows:
        assert row["private_steps"] == 1 and row["epsilon_spent"] > 0
        assert row["finite"] and row["sample_on_device"] and row["parameters_on_device"]
        assert row["train_images_per_s"] > 0 and row["peak_memory_gib"] > 0
    assert [r["volumes"] for r in rows] == [False, True]


@pytest.mark.slow
def test_a_failing_recipe_is_recorded_and_fails_the_run(tmp_path):
    code, rows = gpu_check(tmp_path / "broken", "--recipes", "no-such-recipe")
    assert code == 1 and "unknown recipe 'no-such-recipe'" in rows[0]["error"]
