"""PrivacyRound: one call plans, refuses before training, commits on a clean exit only,
and the ledger is the one store of a release's values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medgen.privacy.accounting import epsilon_of, sample_rate_for
from medgen.privacy.dp_step import DPModule
from medgen.privacy.ledger import BudgetExceeded, PrivacyLedger
from medgen.privacy.round import PrivacyRound, PrivacySchedule

torch.set_num_threads(1)
N, BATCH, STEPS = 20, 5, 3
RELEASE = (2.0, 1.0, 1)


def schedule(rounds=2, releases=()):
    return PrivacySchedule(target_epsilon=10.0, delta=1e-5, accountant="rdp",
                           sample_rate=sample_rate_for(N, BATCH), total_steps=rounds * STEPS,
                           max_grad_norm=1.0, releases=releases)


def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 4, generator=g), torch.randint(0, 2, (N,), generator=g))


def train(private, release=False):
    """What a recipe does with the training object: a release, then STEPS DP-SGD steps."""
    if release:
        private.gaussian_release(torch.rand(N, 3), math.sqrt(3), RELEASE[0])
    net = nn.Linear(4, 2)
    with DPModule(private, net, torch.optim.SGD(net.parameters(), lr=0.1), data(), BATCH) as d:
        for x, y in d.batches(STEPS):
            d.zero_grad()
            if len(x):
                nn.functional.cross_entropy(d.module(x), y).backward()
            d.step()
    return net


def open_round(path, server_round, **kwargs):
    args = dict(run_id="run", server_round=server_round, steps=STEPS, cap_epsilon=10.0, seed=server_round)
    return PrivacyRound.at(path, "A", kwargs.pop("schedule", schedule()), **{**args, **kwargs})


def test_a_clean_round_commits_its_history_once_and_reports_its_epsilon(tmp_path):
    path = tmp_path / "ledger.json"
    privacy = open_round(path, 1)
    with privacy as private:
        train(private)
        assert not path.exists()  # nothing is written before the round ends
    plan = privacy.plan
    ledger = PrivacyLedger.open(path, site="A")
    assert ledger.plan == plan and ledger.history == [(plan.noise_multiplier, plan.sample_rate, STEPS)]
    assert privacy.epsilon == ledger.spent_epsilon() == epsilon_of(ledger.history, 1e-5, "rdp") > 0
    assert privacy.steps_taken == STEPS and ledger.rounds[0]["steps"] == STEPS
    second = open_round(path, 2)
    with second as private:  # resumes the stored history: the accountant composes
        train(private)
    assert PrivacyLedger.open(path, site="A").history == [(plan.noise_multiplier, plan.sample_rate, 2 * STEPS)]


def test_over_budget_round_is_refused_before_any_training_and_writes_nothing(tmp_path):
    path = tmp_path / "ledger.json"
    with open_round(path, 1, schedule=schedule(rounds=1)) as private:
        train(private)
    before = path.read_bytes()
    entered = []
    with pytest.raises(BudgetExceeded, match="'A'"):
        with open_round(path, 2, schedule=schedule(rounds=1)):
            entered.append(True)
    assert entered == [] and path.read_bytes() == before


def test_a_crash_leaves_the_ledger_untouched_and_the_module_unwrapped(tmp_path):
    path = tmp_path / "ledger.json"
    with open_round(path, 1) as private:
        train(private)
    before = path.read_bytes()
    net = nn.Linear(4, 2)
    with pytest.raises(RuntimeError, match="simulated"):
        with open_round(path, 2, schedule=schedule(releases=())) as private:
            with DPModule(private, net, torch.optim.SGD(net.parameters(), lr=0.1), data(), BATCH) as d:
                for x, y in d.batches(STEPS):
                    nn.functional.cross_entropy(d.module(x), y).backward()
                    d.step()
                    raise RuntimeError("simulated crash mid-round")
    assert path.read_bytes() == before  # the noised step never left: nothing to account
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in net.modules())
    assert all(getattr(p, "grad_sample", None) is None for p in net.parameters())
    # a crash in a site's very first round does not even leave a plan behind
    fresh = tmp_path / "fresh.json"
    with pytest.raises(RuntimeError):
        with open_round(fresh, 1):
            raise RuntimeError("crash before training")
    assert not fresh.exists()


def test_a_release_is_stored_once_by_the_ledger_and_reused_for_free(tmp_path):
    path = tmp_path / "ledger.json"
    releasing = schedule(releases=(RELEASE,))
    with open_round(path, 1, schedule=releasing) as private:
        train(private, release=True)
        made = private.new_releases
    ledger = PrivacyLedger.open(path, site="A")
    assert list(ledger.released) == list(made) and len(made) == 1
    assert ledger.history[0] == RELEASE and ledger.rounds[0]["steps"] == STEPS + 1
    with open_round(path, 2, schedule=releasing) as private:
        values = private.gaussian_release(torch.rand(N, 3), math.sqrt(3), RELEASE[0])
        train(private)
        assert private.new_releases == () and private.accounted_steps == STEPS
    assert values.tolist() == list(made[0].values)  # the stored values, nothing spent
    assert PrivacyLedger.open(path, site="A").released == ledger.released
