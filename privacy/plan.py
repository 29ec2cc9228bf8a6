"""A site's privacy plan: the noise calibrated ONCE for its whole schedule, then fixed.

DP.md: calibrating per round (``make_private_with_epsilon`` on one epoch) picks a far
smaller sigma and silently overshoots the budget. The plan is made by the site's ledger on
its first round (``PrivacyLedger.ensure_plan``, calibrated with ``calibrate_noise`` for
rounds x local steps composed with the recipe's one-off releases) and stored with it; every
later round trains at its noise multiplier, clip bound and sample rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from medgen.privacy.accounting import History, make_accountant, normalize_history


@dataclass(frozen=True)
class PrivacyPlan:
    """Calibrated ONCE for the whole schedule, then fixed (DP.md: never per round)."""

    target_epsilon: float
    delta: float
    accountant: str
    sample_rate: float
    total_steps: int
    noise_multiplier: float
    max_grad_norm: float
    unit: str = "patient"
    #: one-off Gaussian releases (``Recipe.one_off_releases``) as accountant entries
    #: (noise_multiplier, sample_rate, steps); noise_multiplier above was calibrated for
    #: their composition with the DP-SGD schedule. Empty for recipes without releases.
    releases: tuple[tuple[float, float, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "releases", tuple(
            (float(s), float(q), int(n)) for s, q, n in normalize_history(self.releases)))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.releases:
            data["releases"] = [list(entry) for entry in self.releases]
        else:  # plans without releases keep their exact former JSON
            del data["releases"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PrivacyPlan":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data) - {"unit", "releases"}
        if missing:
            raise ValueError(f"plan lacks {sorted(missing)}")
        plan = cls(**{k: data[k] for k in names if k in data})
        make_accountant(plan.accountant)
        return plan

    def pending_releases(self, history: History) -> History:
        """The planned releases not yet in ``history`` (matched per (sigma, q) step)."""
        spent = expand_history(normalize_history(history))
        pending: History = []
        for sigma, q, steps in self.releases:
            for _ in range(steps):
                if (sigma, q) in spent:
                    spent.remove((sigma, q))
                else:
                    pending.append((sigma, q, 1))
        return pending


def expand_history(history: History) -> list[tuple[float, float]]:
    """One (sigma, q) per step: lets us compare histories however Opacus merged them."""
    return [(sigma, q) for sigma, q, steps in history for _ in range(steps)]
