"""One-off Gaussian releases (Recipe.one_off_releases -> PrivacyPlan.releases ->
PrivateTraining.gaussian_release): accounted in the same history as DP-SGD, calibrated
together with it, checked against Opacus' own accountants."""

import math
import warnings

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy.optimize import brentq
from scipy.stats import norm
from torch import nn
from torch.utils.data import TensorDataset

from medgen.privacy.accounting import calibrate_noise, epsilon_of, sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.ledger import PrivacyLedger, PrivacyPlan

DELTA = 1e-5
Q = 1 / 7  # 200 patients at batch 32: the default federation
RELEASE = (2.0, 1.0, 1)
OPACUS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018: the exact epsilon of the Gaussian mechanism (sensitivity 1)."""
    def delta_of(eps):
        return norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
    return brentq(lambda e: delta_of(e) - delta, 0.0, 100.0)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.0])
def test_prv_accepts_a_full_batch_gaussian_entry_and_matches_the_exact_mechanism(sigma):
    """Opacus' PoissonSubsampledGaussianPRV at q = 1 is the Gaussian mechanism's privacy-loss
    distribution: its (upper-bound) epsilon is the exact one within its eps_error (0.01)."""
    exact = _analytic_gaussian_epsilon(sigma, DELTA)
    prv = epsilon_of([(sigma, 1.0, 1)], DELTA, "prv")
    assert exact <= prv <= exact + 0.02
    assert epsilon_of([(sigma, 1.0, 1)], DELTA, "rdp") >= prv  # RDP: valid, looser


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_composed_epsilon_equals_opacus_accountant_stepped_the_same_way(accountant):
    history = [RELEASE, (1.03, Q, 100)]
    acct = OPACUS[accountant]()
    acct.step(noise_multiplier=RELEASE[0], sample_rate=1.0)  # the release, as Opacus records it
    for _ in range(100):
        acct.step(noise_multiplier=1.03, sample_rate=Q)
    assert acct.history == history
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore")  # PRV's log(1 - q) at q = 1 (see epsilon_of)
        oracle = acct.get_epsilon(delta=DELTA)
    assert epsilon_of(history, DELTA, accountant) == oracle
    # the release costs something, and less than on its own plus DP-SGD on its own
    alone = epsilon_of([(1.03, Q, 100)], DELTA, accountant)
    assert alone < oracle < alone + epsilon_of([RELEASE], DELTA, accountant)


@pytest.mark.parametrize("accountant,steps", [("prv", 100), ("rdp", 200)])
def test_calibration_with_a_release_is_noisier_and_meets_the_target(accountant, steps):
    plain = calibrate_noise(10.0, DELTA, Q, steps, accountant)
    assert plain == get_noise_multiplier(target_epsilon=10.0, target_delta=DELTA, sample_rate=Q,
                                         steps=steps, accountant=accountant)  # unchanged without releases
    sigma = calibrate_noise(10.0, DELTA, Q, steps, accountant, releases=[RELEASE])
    assert sigma > plain
    composed = epsilon_of([RELEASE, (sigma, Q, steps)], DELTA, accountant)
    assert 10.0 - 0.02 <= composed <= 10.0
    assert epsilon_of([RELEASE, (sigma * 0.98, Q, steps)], DELTA, accountant) > 10.0
    with pytest.raises(ValueError, match="alone spend"):
        calibrate_noise(1.0, DELTA, Q, steps, accountant, releases=[(0.5, 1.0, 1)])


def test_plan_json_is_unchanged_without_releases_and_round_trips_with_them():
    base = dict(target_epsilon=10.0, delta=DELTA, accountant="prv", sample_rate=Q, total_steps=100,
                noise_multiplier=1.0, max_grad_norm=1.0)
    plain = PrivacyPlan(**base)
    assert "releases" not in plain.to_json() and PrivacyPlan.from_json(plain.to_json()) == plain
    with_release = PrivacyPlan(**base, releases=[list(RELEASE)])
    assert with_release.releases == (RELEASE,)
    assert PrivacyPlan.from_json(with_release.to_json()) == with_release
    assert with_release.pending_releases([]) == [RELEASE]
    assert with_release.pending_releases([RELEASE, (1.0, Q, 20)]) == []
    assert with_release.pending_releases([(1.0, Q, 20)]) == [RELEASE]


def _dataset(n=20, dim=3, seed=0):
    return torch.rand(n, dim, generator=torch.Generator().manual_seed(seed))


def _plan(releases=(RELEASE,), n=20, batch=5):
    return PrivacyPlan(target_epsilon=10.0, delta=DELTA, accountant="rdp",
                       sample_rate=sample_rate_for(n, batch), total_steps=50, noise_multiplier=1.1,
                       max_grad_norm=1.0, releases=releases)


def test_release_sensitivity_is_the_clip_bound():
    """Same seed, same noise: replacing or removing one patient moves the release by <= C."""
    c = math.sqrt(3.0)
    data = _dataset()
    out = PrivateTraining(_plan(), [], seed=3).gaussian_release(data, c, 2.0)
    changed = data.clone()
    changed[7] = torch.tensor([100.0, -50.0, 30.0])  # an outlier patient: clipped to norm C
    out_changed = PrivateTraining(_plan(), [], seed=3).gaussian_release(changed, c, 2.0)
    removed = torch.cat([data[:7], data[8:]])
    out_removed = PrivateTraining(_plan(), [], seed=3).gaussian_release(removed, c, 2.0)
    assert float((out - out_removed).norm()) <= c + 1e-9
    assert float((out - out_changed).norm()) <= 2 * c + 1e-9  # replace = remove + add
    assert float((out_changed - out_removed).norm()) == pytest.approx(c, rel=1e-9)
    # in-range vectors are never clipped: the pre-noise sum is the plain sum
    noise = out - data.double().sum(0)
    zero = PrivateTraining(_plan(), [], seed=3).gaussian_release(torch.zeros_like(data), c, 2.0)
    assert torch.allclose(noise, zero, atol=1e-9)


def test_release_noise_has_the_declared_scale():
    c = 2.0
    draws = torch.stack([PrivateTraining(_plan(), [], seed=s).gaussian_release(torch.zeros(4, 5), c, 2.0)
                         for s in range(200)])
    assert float(draws.std()) == pytest.approx(2.0 * c, rel=0.1)
    assert abs(float(draws.mean())) < 0.3


def test_release_is_accounted_in_the_same_history_and_the_ledger_composes_it(tmp_path):
    n, batch = 20, 5
    data = TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,)))
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", site="A")
    plan = ledger.ensure_plan(target_epsilon=10.0, delta=DELTA, accountant="rdp",
                              sample_rate=sample_rate_for(n, batch), total_steps=30,
                              max_grad_norm=1.0, releases=[RELEASE])
    assert plan.releases == (RELEASE,)
    assert plan.noise_multiplier > calibrate_noise(10.0, DELTA, plan.sample_rate, 30, "rdp")
    # round 1's projection includes the pending release
    assert ledger.check_budget(10, 10.0) == pytest.approx(
        epsilon_of([RELEASE, (plan.noise_multiplier, plan.sample_rate, 10)], DELTA, "rdp"))

    def one_round(server_round, release):
        private = PrivateTraining(ledger.plan, ledger.history, seed=server_round)
        if release:
            private.gaussian_release(torch.rand(n, 3), math.sqrt(3), RELEASE[0])
        net = nn.Linear(4, 2)
        net, opt, loader = private.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), data, batch)
        for x, y in [b for _ in range(3) for b in loader][:10]:  # Poisson batches, 3 epochs
            if len(x):
                nn.functional.cross_entropy(net(x), y).backward()
            private.step(opt)
        private.close()
        return private, ledger.commit_round(run_id="r", server_round=server_round, spend=private.spend())

    private, eps1 = one_round(1, release=True)
    assert private.steps_taken == 10 and private.accounted_steps == 11
    assert ledger.history == [RELEASE, (plan.noise_multiplier, plan.sample_rate, 10)]
    oracle = RDPAccountant()
    oracle.step(noise_multiplier=RELEASE[0], sample_rate=1.0)
    for _ in range(10):
        oracle.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert eps1 == oracle.get_epsilon(delta=DELTA)
    # a restart: the reopened ledger remembers the release and its values; a second
    # release returns those values and spends nothing, and without them it is refused
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", site="A")
    assert ledger.plan.pending_releases(ledger.history) == []
    assert len(ledger.released) == 1 and ledger.released[0].noise_multiplier == RELEASE[0]
    again = PrivateTraining(ledger.plan, ledger.history, released=ledger.released)
    values = again.gaussian_release(torch.rand(n, 3), math.sqrt(3), RELEASE[0])
    assert values.tolist() == list(ledger.released[0].values)
    assert again.history == ledger.history and again.accounted_steps == 0 and again.new_releases == ()
    with pytest.raises(RuntimeError, match="already in this site's privacy history"):
        PrivateTraining(ledger.plan, ledger.history).gaussian_release(torch.rand(n, 3), 1.0, RELEASE[0])
    one_round(2, release=False)
    one_round(3, release=False)
    assert ledger.spent_epsilon() <= 10.0 + 1e-9
    assert ledger.spent_epsilon() == pytest.approx(10.0, abs=0.05)  # the schedule + release is the budget


def test_undeclared_release_is_refused():
    with pytest.raises(ValueError, match="declares no release"):
        PrivateTraining(_plan(releases=()), []).gaussian_release(_dataset(), 1.0, 2.0)
    with pytest.raises(ValueError, match="declares no release"):
        PrivateTraining(_plan(), []).gaussian_release(_dataset(), 1.0, 3.0)
