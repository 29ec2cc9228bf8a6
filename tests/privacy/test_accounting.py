"""Accounting: our functions against fresh Opacus accountants, and DP.md's worked example."""

import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from medgen.privacy.accounting import (calibrate_noise, epsilon_of, extend_history, make_accountant,
                                       project_epsilon, sample_rate_for)

Q = 1 / 63
DELTA = 1e-5
OPACUS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def _stepped(accountant: str, schedule: list[tuple[float, float, int]]):
    acct = OPACUS[accountant]()
    for sigma, q, steps in schedule:
        for _ in range(steps):
            acct.step(noise_multiplier=sigma, sample_rate=q)
    return acct


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_of_equals_a_fresh_opacus_accountant_stepped_the_same_way(accountant):
    schedule = [(1.1, Q, 40), (0.9, 1 / 50, 25), (1.1, Q, 10)]
    acct = _stepped(accountant, schedule)
    assert acct.history == schedule  # Opacus merges equal consecutive steps exactly like this
    assert epsilon_of(schedule, DELTA, accountant) == acct.get_epsilon(delta=DELTA)
    assert make_accountant(accountant).mechanism() == accountant


def test_accountant_name_is_never_defaulted():
    with pytest.raises(ValueError, match="'accountant'"):
        make_accountant("gdp")
    with pytest.raises(ValueError, match="'accountant'"):
        epsilon_of([(1.0, Q, 1)], DELTA, "")
    with pytest.raises(ValueError, match="'accountant'"):
        calibrate_noise(3.0, DELTA, Q, 100, "RDP")


def test_empty_history_spends_nothing_and_prv_is_tighter_than_rdp():
    assert epsilon_of([], DELTA, "prv") == 0.0
    assert epsilon_of([], DELTA, "rdp") == 0.0
    h = [(1.0, Q, 63)]
    assert 0 < epsilon_of(h, DELTA, "prv") < epsilon_of(h, DELTA, "rdp")


@pytest.mark.parametrize("accountant,expected", [("prv", 1.069), ("rdp", 1.125)])
def test_calibration_reproduces_the_worked_example(accountant, expected):
    # DP.md: target eps 3 over 1,260 steps at q = 1/63, delta 1e-5
    sigma = calibrate_noise(3.0, DELTA, Q, 1260, accountant)
    assert sigma == pytest.approx(expected, abs=0.005)
    # the calibrated sigma reaches the target, and a 3% smaller sigma overshoots it
    assert epsilon_of([(sigma, Q, 1260)], DELTA, accountant) <= 3.0
    assert epsilon_of([(sigma * 0.97, Q, 1260)], DELTA, accountant) > 3.0


@pytest.mark.parametrize("accountant,round1,round20", [("rdp", 1.455, 3.769), ("prv", 0.994, 3.409)])
def test_restoring_the_history_every_round_equals_one_shot(accountant, round1, round20):
    # 20 rounds of 63 steps at sigma 1.0; each round a new accountant resumes a JSON copy
    saved = None
    for server_round in range(1, 21):
        acct = make_accountant(accountant)
        if saved is not None:
            acct.load_state_dict(json.loads(saved))
        for _ in range(63):
            acct.step(noise_multiplier=1.0, sample_rate=Q)
        saved = json.dumps(acct.state_dict())
        if server_round == 1:
            assert epsilon_of(acct.history, DELTA, accountant) == pytest.approx(round1, abs=1e-3)
    restored = json.loads(saved)["history"]
    one_shot = _stepped(accountant, [(1.0, Q, 1260)]).get_epsilon(delta=DELTA)
    assert epsilon_of(restored, DELTA, accountant) == one_shot
    assert one_shot == pytest.approx(round20, abs=1e-3)


def test_projection_equals_actually_taking_the_steps():
    history = [(1.0, Q, 63)]
    projected = project_epsilon(history, 1.0, Q, 63, DELTA, "rdp")
    assert projected == _stepped("rdp", [(1.0, Q, 126)]).get_epsilon(delta=DELTA)
    assert project_epsilon(history, 1.0, Q, 0, DELTA, "rdp") == epsilon_of(history, DELTA, "rdp")
    assert extend_history(history, 1.2, Q, 5) == [(1.0, Q, 63), (1.2, Q, 5)]
    assert history == [(1.0, Q, 63)]  # input never modified


def test_sample_rate_matches_opacus_loader_rule():
    assert sample_rate_for(2000, 32) == Q
    assert sample_rate_for(64, 32) == 0.5
    with pytest.raises(ValueError, match="batch_size"):
        sample_rate_for(10, 0)


def test_zero_noise_has_no_guarantee():
    assert epsilon_of([(0.0, Q, 1)], DELTA, "rdp") == float("inf")
