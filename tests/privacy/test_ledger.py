"""PrivacyLedger: persistence, atomic commits, budget refusal, replay, corrupt files."""

import json
import os

import pytest

from medgen.privacy.accounting import epsilon_of, extend_history
from medgen.privacy.ledger import BudgetExceeded, LedgerError, PrivacyLedger, RoundSpend

PLAN = dict(target_epsilon=3.0, delta=1e-5, accountant="rdp", sample_rate=0.1,
            total_steps=100, max_grad_norm=1.0)


def _planned(path, site="hospital-A"):
    ledger = PrivacyLedger.open(path, site=site)
    ledger.ensure_plan(**PLAN)
    return ledger


def _train(ledger, steps):
    """What PrivateTraining produces: the stored history plus `steps` plan steps."""
    p = ledger.plan
    return extend_history(ledger.history, p.noise_multiplier, p.sample_rate, steps)


def test_plan_is_calibrated_once_and_spending_survives_reopen(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, site="hospital-A")
    assert ledger.plan is None and ledger.spent_epsilon() == 0.0 and not path.exists()
    plan = ledger.ensure_plan(**PLAN)
    # the full schedule lands at (just under) the target: calibrated for all 100 steps
    full = epsilon_of([(plan.noise_multiplier, 0.1, 100)], 1e-5, "rdp")
    assert 2.95 < full <= 3.0
    eps = ledger.commit_round(run_id="r1", server_round=1, spend=RoundSpend(_train(ledger, 20), 20))
    assert eps == epsilon_of([(plan.noise_multiplier, 0.1, 20)], 1e-5, "rdp") > 0

    again = PrivacyLedger.open(path, site="hospital-A")
    assert again.plan == plan
    assert again.spent_epsilon() == eps and again.steps == 20
    # a later, different request keeps the stored plan (noise is never re-calibrated)
    assert again.ensure_plan(**{**PLAN, "target_epsilon": 8.0, "total_steps": 10}) == plan


def test_crash_during_commit_leaves_the_old_ledger(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    ledger = _planned(path)
    eps1 = ledger.commit_round(run_id="r1", server_round=1, spend=RoundSpend(_train(ledger, 10), 10))
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated power loss")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ledger.commit_round(run_id="r1", server_round=2, spend=RoundSpend(_train(ledger, 10), 10))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert PrivacyLedger.open(path, site="hospital-A").spent_epsilon() == eps1
    assert ledger.spent_epsilon() == eps1  # memory rolled back to match the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_budget_refusal_names_the_site_and_respects_the_stricter_cap(tmp_path):
    ledger = _planned(tmp_path / "ledger.json")
    ledger.commit_round(run_id="r1", server_round=1, spend=RoundSpend(_train(ledger, 90), 90))
    projected = ledger.check_budget(10, cap_epsilon=100.0)  # the plan's own schedule fits
    assert projected <= 3.0 + 1e-9
    with pytest.raises(BudgetExceeded) as err:
        ledger.check_budget(11, cap_epsilon=100.0)  # one step past the plan's target
    assert "hospital-A" in str(err.value) and "3.0000" in str(err.value)
    with pytest.raises(BudgetExceeded, match="hospital-A"):
        ledger.check_budget(1, cap_epsilon=ledger.spent_epsilon())  # a stricter site cap wins


def test_replayed_round_is_not_charged_twice_but_retraining_is(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _planned(path)
    history = _train(ledger, 10)
    eps = ledger.commit_round(run_id="r1", server_round=1, spend=RoundSpend(history, 10))
    # the same commit replayed (e.g. retried after a server restart): no new charge
    assert ledger.commit_round(run_id="r1", server_round=1, spend=RoundSpend(history, 10)) == eps
    reopened = PrivacyLedger.open(path, site="hospital-A")
    assert reopened.has_round("r1", 1) and not reopened.has_round("r1", 2)
    assert reopened.commit_round(run_id="r1", server_round=1, spend=RoundSpend(history, 10)) == eps
    assert reopened.steps == 10 and reopened.summary()["rounds_trained"] == 1
    # training the round AGAIN drew fresh noise on real records: that is charged
    eps2 = reopened.commit_round(run_id="r1", server_round=1, spend=RoundSpend(_train(reopened, 10), 10))
    assert eps2 > eps and reopened.steps == 20


def test_stale_or_inconsistent_commits_are_refused(tmp_path):
    ledger = _planned(tmp_path / "ledger.json")
    ledger.commit_round(run_id="r1", server_round=1, spend=RoundSpend(_train(ledger, 10), 10))
    with pytest.raises(LedgerError, match="does not extend"):
        ledger.commit_round(run_id="r1", server_round=2, spend=RoundSpend([(9.0, 0.1, 11)], 1))
    with pytest.raises(LedgerError, match="grew by"):
        ledger.commit_round(run_id="r1", server_round=2, spend=RoundSpend(_train(ledger, 3), 2))
    assert ledger.steps == 10  # refused commits charge nothing


def test_corrupt_ledger_is_an_error_and_is_never_overwritten(tmp_path):
    path = tmp_path / "ledger.json"
    _planned(path).commit_round(run_id="r1", server_round=1, spend=RoundSpend([], 0))
    torn = path.read_text()[:40]
    path.write_text(torn)
    with pytest.raises(LedgerError, match=str(path)) as err:
        PrivacyLedger.open(path, site="hospital-A")
    assert "never reset" in str(err.value)
    assert path.read_text() == torn


def test_a_ledger_of_another_site_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    _planned(path, site="hospital-A")
    with pytest.raises(LedgerError, match="hospital-A"):
        PrivacyLedger.open(path, site="hospital-B")


def test_summary_is_json_scalars_only(tmp_path):
    ledger = _planned(tmp_path / "ledger.json")
    ledger.commit_round(run_id="r1", server_round=1, spend=RoundSpend(_train(ledger, 10), 10))
    summary = json.loads(json.dumps(ledger.summary()))
    assert summary["site"] == "hospital-A" and summary["unit"] == "patient"
    assert summary["accountant"] == "rdp" and summary["delta"] == 1e-5
    assert summary["steps"] == 10 and summary["rounds_trained"] == 1
    assert summary["epsilon"] == ledger.spent_epsilon()
    assert "history" not in summary
