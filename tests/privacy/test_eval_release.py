"""The federated-evaluation release (privacy/eval_release.py): its noise, its accounting in
the site's ledger against an Opacus oracle, and a budget refusal that changes nothing."""

from __future__ import annotations

import hashlib

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

import medgen.privacy.eval_release as eval_release
from medgen.config import ConfigError, RunConfig
from medgen.privacy.accounting import extend_history
from medgen.privacy.eval_release import planned_eval_releases, release_for_evaluation
from medgen.privacy.ledger import BudgetExceeded, PrivacyLedger, RoundSpend
from medgen.privacy.round import PrivacySchedule

SIGMA = 2.0
Q, STEPS = 0.05, 30


def _schedule(evals: int, accountant: str = "rdp", target: float = 8.0) -> PrivacySchedule:
    return PrivacySchedule(target_epsilon=target, delta=1e-5, accountant=accountant, sample_rate=Q,
                           total_steps=STEPS, max_grad_norm=1.0, releases=((SIGMA, 1.0, evals),) if evals else ())


def _release(ledger, schedule, vectors, request="r", server_round=1, cap=8.0, generator=None):
    return release_for_evaluation(ledger, schedule, vectors, clip_norm=1.0, noise_multiplier=SIGMA,
                                  request=request, server_round=server_round, cap_epsilon=cap,
                                  generator=generator)


def test_release_noise_has_the_planned_std_and_rows_are_clipped(tmp_path):
    # 4 patients, d = 200,000 coordinates: the sample std of the noise is within 0.5 %
    vectors = torch.zeros(4, 200_000, dtype=torch.float64)
    vectors[:, 0] = 10.0  # each row clipped from norm 10 to 1: the sum's first entry is 4
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", site="A")
    out = _release(ledger, _schedule(1), vectors, generator=torch.Generator().manual_seed(0))
    noise = out.values - torch.cat([torch.tensor([4.0]), torch.zeros(199_999, dtype=torch.float64)])
    assert float(noise.std()) == pytest.approx(SIGMA * 1.0, rel=5e-3)
    assert abs(float(noise.mean())) < 5 * SIGMA / 200_000 ** 0.5
    assert out.epsilon == pytest.approx(ledger.spent_epsilon()) and out.delta == 1e-5


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_eval_releases_compose_in_the_ledger_like_an_opacus_accountant(tmp_path, accountant):
    schedule = _schedule(2, accountant)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", site="A")
    plan = ledger.ensure_plan(**schedule.__dict__)
    # round 1 trains 15 DP-SGD steps, then evaluates; round 2 the same
    vectors = torch.rand(6, 10, dtype=torch.float64)
    for server_round in (1, 2):
        ledger.commit_round(run_id=f"train-{server_round}", server_round=server_round,
                            spend=RoundSpend(extend_history(ledger.history, plan.noise_multiplier, Q, 15), 15))
        _release(ledger, schedule, vectors, request=f"e{server_round}", server_round=server_round)
    oracle = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(2):
        for _ in range(15):
            oracle.step(noise_multiplier=plan.noise_multiplier, sample_rate=Q)
        oracle.step(noise_multiplier=SIGMA, sample_rate=1.0)
    reopened = PrivacyLedger.open(tmp_path / "ledger.json", site="A")
    assert reopened.history == oracle.history
    assert reopened.spent_epsilon() == pytest.approx(oracle.get_epsilon(delta=1e-5), rel=1e-6)
    assert [e["run_id"] for e in reopened.rounds] == ["train-1", "eval:e1", "train-2", "eval:e2"]
    summary = reopened.summary()  # what leaves: evaluations are spent, not trained rounds
    assert summary["rounds_trained"] == 2 and summary["evaluations"] == 2
    # the plan reserved both evaluations: the whole schedule meets the target
    assert reopened.spent_epsilon() <= 8.0 + 1e-6


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_budget_refusal_comes_before_any_noise_or_ledger_change(tmp_path, monkeypatch):
    # a plan with no evaluation reserved, whose DP-SGD schedule is spent: one more release
    # passes the cap
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", site="A")
    plan = ledger.ensure_plan(**_schedule(0).__dict__)
    ledger.commit_round(run_id="t", server_round=1,
                        spend=RoundSpend(extend_history([], plan.noise_multiplier, Q, STEPS), STEPS))
    before, history = _digest(ledger.path), list(ledger.history)

    def no_noise(*args, **kwargs):
        raise AssertionError("noise drawn before the budget check")

    monkeypatch.setattr(eval_release, "gaussian_sum", no_noise)
    with pytest.raises(BudgetExceeded, match="evaluation release"):
        _release(ledger, _schedule(0), torch.rand(4, 10, dtype=torch.float64))
    assert _digest(ledger.path) == before and ledger.history == history
    assert len(ledger.rounds) == 1


def test_planned_eval_releases_follow_the_config():
    off = RunConfig(num_rounds=4)
    assert planned_eval_releases(off) == ()
    final = RunConfig(num_rounds=4, federated_eval_fraction=0.25, federated_eval_noise=2.5)
    assert final.federated_eval_rounds == (4,) and planned_eval_releases(final) == ((2.5, 1.0, 1),)
    every = final.replace(federated_eval_every=3, num_rounds=7)
    assert every.federated_eval_rounds == (3, 6, 7) and planned_eval_releases(every) == ((2.5, 1.0, 3),)
    with pytest.raises(ConfigError, match="federated-eval-noise"):
        planned_eval_releases(final, recipe_releases=((2.5, 1.0, 1),))
    with pytest.raises(ConfigError, match="federated-eval-fraction"):
        RunConfig(federated_eval_fraction=0.9)
