"""Privacy accounting over Opacus accountants, with the accountant always named.

The accountant state is Opacus' own tiny history: a list of
``(noise_multiplier, sample_rate, steps)`` triples. Everything here is a pure function of
that history, so epsilon can be recomputed exactly at any time from what the ledger
stores (docs/privacy.md). ``PrivacyEngine()`` defaults to PRV while
``get_noise_multiplier()`` defaults to RDP (DP.md): every function here takes the
accountant name explicitly and refuses anything but "prv" or "rdp".
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import numpy as np

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from medgen.config import ACCOUNTANTS

History = list[tuple[float, float, int]]

_ACCOUNTANT_CLASSES: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}


def make_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant for ``name`` ("prv" or "rdp")."""
    if name not in _ACCOUNTANT_CLASSES:
        raise ValueError(f"privacy field 'accountant' must be one of {ACCOUNTANTS}, got {name!r}")
    return _ACCOUNTANT_CLASSES[name]()


def sample_rate_for(num_records: int, batch_size: int) -> float:
    """Opacus' Poisson sample rate for a loader over ``num_records`` at ``batch_size``.

    ``PrivacyEngine.make_private`` uses ``1 / len(data_loader)`` with ``drop_last=False``,
    i.e. ``1 / ceil(N / B)`` (2,000 records at batch 32: q = 1/63). Plans must use the
    same number or the accounting would not match the sampling actually done.
    """
    if num_records < 1:
        raise ValueError(f"privacy field 'num_records' must be >= 1, got {num_records}")
    if batch_size < 1:
        raise ValueError(f"privacy field 'batch_size' must be >= 1, got {batch_size}")
    return 1.0 / math.ceil(num_records / batch_size)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float,
                    total_steps: int, accountant: str,
                    releases: Iterable[tuple[float, float, int]] = ()) -> float:
    """Noise multiplier reaching ``target_epsilon`` after ``total_steps`` steps at ``sample_rate``.

    Calibrate ONCE for the whole schedule (rounds x local steps), never per round.

    ``releases`` are the recipe's one-off Gaussian releases as accountant entries
    ``(noise_multiplier, sample_rate, steps)`` (``Recipe.one_off_releases``; a Gaussian
    mechanism on a sum of clipped per-patient vectors is ``(sigma, 1.0, 1)``). Without
    them this is Opacus' ``get_noise_multiplier`` unchanged; with them the DP-SGD sigma is
    found by the same doubling + bisection (same tolerance, 0.01) on the epsilon of the
    COMPOSED history ``releases + [(sigma, sample_rate, total_steps)]``, so the whole
    site (releases and DP-SGD) meets the target.
    """
    make_accountant(accountant)  # validates the name with our error message
    _check_positive("target_epsilon", target_epsilon)
    if not 0 < delta < 1:
        raise ValueError(f"privacy field 'delta' must be in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"privacy field 'sample_rate' must be in (0, 1], got {sample_rate}")
    if total_steps < 1:
        raise ValueError(f"privacy field 'total_steps' must be >= 1, got {total_steps}")
    releases = normalize_history(releases)
    if releases:
        return _calibrate_with_releases(target_epsilon, delta, sample_rate, int(total_steps),
                                        accountant, releases)
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=int(total_steps),
                                      accountant=accountant))


def _calibrate_with_releases(target_epsilon: float, delta: float, sample_rate: float,
                             total_steps: int, accountant: str, releases: History,
                             epsilon_tolerance: float = 0.01, max_sigma: float = 1e6) -> float:
    """Opacus' get_noise_multiplier search, on the epsilon of releases + DP-SGD schedule."""
    def composed(sigma: float) -> float:
        return epsilon_of(releases + [(sigma, sample_rate, total_steps)], delta, accountant)

    alone = epsilon_of(releases, delta, accountant)
    if alone >= target_epsilon:
        raise ValueError(f"the recipe's one-off releases {releases} alone spend epsilon "
                         f"{alone:.4f} >= the target {target_epsilon}: raise their noise "
                         "multiplier or the target")
    eps_high, sigma_low, sigma_high = math.inf, 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = composed(sigma_high)
        if sigma_high > max_sigma:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = composed(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return float(sigma_high)


def epsilon_of(history: Iterable[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon spent by ``history`` at ``delta`` under the named accountant (0.0 if empty).

    An entry with sample_rate 1.0 (a plain Gaussian mechanism, e.g. a one-off release) is
    exact in both accountants: RDP has the q = 1 case in closed form; Opacus' PRV
    (PoissonSubsampledGaussianPRV) reduces at q = 1 to the Gaussian privacy-loss
    distribution N(1/(2 sigma^2), 1/sigma^2), evaluating log(1 - q) = -inf on the way
    (numpy's divide-by-zero warning, silenced here; the value is the intended threshold).
    """
    acct = make_accountant(accountant)
    acct.history = normalize_history(history)
    if not acct.history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in acct.history):
        return math.inf  # a noiseless step releases the clipped gradient itself: no guarantee
    if not any(q == 1.0 for _, q, _ in acct.history):
        return float(acct.get_epsilon(delta=delta))
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        if accountant == "prv":  # PRV sizes its domain with an RDP bound at delta/(8 steps),
            # which for a q = 1 entry wants orders past Opacus' alphas: only the (safe,
            # larger) domain is affected, not the epsilon
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acct.get_epsilon(delta=delta))


def project_epsilon(history: Iterable[tuple[float, float, int]], noise_multiplier: float,
                    sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon if ``steps`` more steps at (``noise_multiplier``, ``sample_rate``) were taken."""
    if steps < 0:
        raise ValueError(f"privacy field 'steps' must be >= 0, got {steps}")
    return epsilon_of(extend_history(history, noise_multiplier, sample_rate, steps), delta, accountant)


def extend_history(history: Iterable[tuple[float, float, int]], noise_multiplier: float,
                   sample_rate: float, steps: int) -> History:
    """``history`` plus ``steps`` steps, merged exactly as Opacus' ``step()`` merges them."""
    out = normalize_history(history)
    if steps == 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(steps))
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


def normalize_history(history: Iterable[tuple[float, float, int]]) -> History:
    """A validated copy as a list of (float, float, int) tuples (JSON gives lists back)."""
    out: History = []
    for i, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(f"privacy history entry {i} must be (noise_multiplier, sample_rate, "
                             f"steps), got {entry!r}")
        sigma, q, steps = float(entry[0]), float(entry[1]), entry[2]
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"privacy history entry {i}: steps must be an integer >= 1, got {steps!r}")
        if not (sigma >= 0 and math.isfinite(sigma)) or not 0 < q <= 1:
            raise ValueError(f"privacy history entry {i}: need noise_multiplier >= 0 and "
                             f"sample_rate in (0, 1], got {entry!r}")
        out.append((sigma, q, int(steps)))
    return out


def history_steps(history: Iterable[tuple[float, float, int]]) -> int:
    return sum(int(entry[2]) for entry in history)


def _check_positive(field: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"privacy field '{field}' must be > 0, got {value}")
