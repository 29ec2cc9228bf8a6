"""The survey benches' non-private ceiling arms really drop the noise, and only there.

- ``noise_free`` turns a run config into its ceiling: the calibrated DP-SGD noise falls
  from ~1 to < 1e-2 while the clip bound, steps and batch stay (mutation: returning the
  config unchanged fails the first test);
- ``privacy_record`` reads each site's own ledger, so an arm's recorded noise is what the
  sites planned, not what the bench meant (mutation: recording the config's epsilon
  instead of the ledger's plan fails the second test);
- every committed result of these benches names a ceiling arm whose ledgers planned noise
  < 1e-2, and every private arm's ledgers planned noise >= 0.3 and spent epsilon <= 10
  (mutation: running the ceiling arm without ``noise_free``, or a private arm with it,
  fails the third test on the rerun's JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import NOISE_FREE_ARM, NOISE_FREE_EPSILON, noise_free, privacy_record
from medgen.config import RunConfig
from medgen.privacy.accounting import calibrate_noise
from medgen.privacy.ledger import PrivacyLedger

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
TRAINED_BENCHES = ["redgan", "two_stage", "adaptive_schedule", "controls", "style_content_ct", "volume_consistency"]


def test_noise_free_drops_the_noise_and_keeps_the_rest():
    base = RunConfig(recipe="site-gan", num_rounds=3, local_steps=15, batch_size=8, target_epsilon=10.0,
                     accountant="prv", max_grad_norm=1.0)
    ceiling = noise_free(base)
    assert ceiling.target_epsilon == NOISE_FREE_EPSILON and ceiling.accountant == "rdp"
    assert ceiling.replace(target_epsilon=10.0, accountant="prv") == base  # nothing else changed
    steps = base.num_rounds * base.local_steps
    private = calibrate_noise(base.target_epsilon, base.delta, 0.2, steps, "rdp")
    free = calibrate_noise(ceiling.target_epsilon, ceiling.delta, 0.2, steps, ceiling.accountant)
    assert private > 0.5 and free < 1e-2, (private, free)


def test_privacy_record_reads_each_sites_ledger(tmp_path):
    for site, epsilon in (("A", 10.0), ("B", NOISE_FREE_EPSILON)):
        ledger = PrivacyLedger.open(tmp_path / site / "privacy_ledger.json", site=site)
        ledger.ensure_plan(target_epsilon=epsilon, delta=1e-5, accountant="rdp", sample_rate=0.2,
                           total_steps=30, max_grad_norm=1.0)
    record = privacy_record(tmp_path)
    assert set(record) == {"A", "B"}
    assert record["A"]["noise_multiplier"] > 0.5 and record["B"]["noise_multiplier"] < 1e-2
    assert record["B"]["target_epsilon"] == NOISE_FREE_EPSILON and record["A"]["max_grad_norm"] == 1.0


def _privacy_records(node, path=()):
    """Every ("privacy" record, path to it) in a result JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "privacy" and isinstance(value, dict):
                yield value, path
            else:
                yield from _privacy_records(value, path + (str(key),))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _privacy_records(value, path + (str(i),))


@pytest.mark.parametrize("bench", TRAINED_BENCHES)
def test_committed_result_has_a_noise_free_ceiling_and_private_arms(bench):
    result = json.loads((RESULTS / f"{bench}.json").read_text())
    records = list(_privacy_records(result))
    ceilings = [(r, p) for r, p in records if any(NOISE_FREE_ARM in part for part in p)]
    private = [(r, p) for r, p in records if not any(NOISE_FREE_ARM in part for part in p)]
    assert ceilings and private, f"bench/results/{bench}.json: need a {NOISE_FREE_ARM} arm and a private arm"
    for record, path in ceilings:
        assert record, path
        for site, plan in record.items():
            assert plan["noise_multiplier"] < 1e-2 and plan["target_epsilon"] == NOISE_FREE_EPSILON, (path, site)
    for record, path in private:
        assert record, path
        for site, plan in record.items():
            assert plan["noise_multiplier"] >= 0.3 and plan["epsilon_spent"] <= 10.0 + 1e-6, (path, site)
            assert plan["unit"] == "patient", (path, site)


def test_unistable_ceiling_is_named_and_trained_on_real_pairs():
    """unistable is public-only (epsilon 0): its ceiling is S on the sites' real pairs."""
    result = json.loads((RESULTS / "unistable_300steps.json").read_text())
    assert result["epsilon"] == 0.0 and result["real_pairs_for_ceiling"] > 0
    assert {"plain", "high_contrast", "real_pairs_non_private"} <= set(result["arms"])
