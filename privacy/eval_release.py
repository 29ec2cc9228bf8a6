"""One federated evaluation at a site = one Gaussian release, planned, checked, then accounted.

What a site's evaluation releases is a sum of per-patient vectors (evaluation/
federated_eval.py says which), clipped to L2 norm C, plus N(0, (sigma C)^2 I): the Gaussian
mechanism at noise multiplier sigma, the accountant entry ``(sigma, 1.0, 1)``, exactly like
a recipe's one-off release (privacy/releases.py), but one per evaluation round and never
reused (each evaluates a different global model).

Order, so that nothing is spent that the site cannot afford:

1. plan: the site's plan is made (or read) with the SAME schedule its training uses, whose
   ``releases`` include every planned evaluation (``planned_eval_releases``): the DP-SGD
   noise is calibrated for training AND evaluation together, so evaluating does not push a
   later training round over the cap;
2. budget check BEFORE any noise is drawn: the history with this release added, plus every
   planned release still pending after it, must stay within min(site cap, plan target);
   otherwise ``BudgetExceeded`` and the ledger is untouched;
3. release: clip, sum, noise (Opacus' noise source; seeded in simulation, secure in
   deployment);
4. commit: the extended history as one ledger entry under the evaluation's own request id
   (``eval:<request>``), written atomically; its values are NOT kept in the ledger's
   ``released`` store (nothing may reuse them: a later model needs a fresh evaluation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from medgen.config import ConfigError, RunConfig
from medgen.privacy.accounting import epsilon_of, extend_history
from medgen.privacy.ledger import EPSILON_TOLERANCE, EVAL_PREFIX, BudgetExceeded, PrivacyLedger, RoundSpend
from medgen.privacy.releases import check_release_arguments, gaussian_sum
from medgen.privacy.round import PrivacySchedule



def planned_eval_releases(config: RunConfig,
                          recipe_releases: tuple[tuple[float, float, int], ...] = ()
                          ) -> tuple[tuple[float, float, int], ...]:
    """The run's evaluation releases as accountant entries (empty when evaluation is off).

    A recipe's own release at the same sigma would be indistinguishable in the history
    (both are ``(sigma, 1.0, 1)``), and the recipe then could not tell whether its one-off
    release was spent: refused with the field named.
    """
    rounds = config.federated_eval_rounds
    if not rounds:
        return ()
    sigma = float(config.federated_eval_noise)
    if any(float(s) == sigma and float(q) == 1.0 for s, q, _ in recipe_releases):
        raise ConfigError(f"run-config field 'federated-eval-noise' ({sigma}) equals the noise "
                          f"multiplier of one of the recipe's own releases {list(recipe_releases)}; "
                          "pick another value so the ledger can tell them apart")
    return ((sigma, 1.0, len(rounds)),)


@dataclass(frozen=True)
class EvalRelease:
    """What one evaluation released and what the site has spent after it."""

    values: torch.Tensor      # the noisy sum [d], float64 (a DP output)
    epsilon: float            # the site's total epsilon after this release
    delta: float
    accountant: str


def release_for_evaluation(ledger: PrivacyLedger, schedule: PrivacySchedule, vectors: torch.Tensor, *,
                           clip_norm: float, noise_multiplier: float, request: str, server_round: int,
                           cap_epsilon: float, generator: torch.Generator | None = None,
                           secure_mode: bool = False) -> EvalRelease:
    """Steps 1-4 of the module docstring. ``vectors`` [patients, d]: one row per patient."""
    check_release_arguments(vectors, clip_norm, noise_multiplier)
    sigma = float(noise_multiplier)
    plan = ledger.ensure_plan(**asdict(schedule), save=False)
    after = extend_history(ledger.history, sigma, 1.0, 1)
    projected = epsilon_of(after + plan.pending_releases(after), plan.delta, plan.accountant)
    cap = min(float(cap_epsilon), plan.target_epsilon)
    if projected > cap + EPSILON_TOLERANCE:
        raise BudgetExceeded(
            f"site {ledger.site!r}: an evaluation release (noise multiplier {sigma:g}) would reach "
            f"epsilon {projected:.4f} > cap {cap:.4f} (spent {ledger.spent_epsilon():.4f}, delta "
            f"{plan.delta:g}, {plan.accountant} accountant, unit {plan.unit}); this site refuses "
            f"to evaluate (ledger {ledger.path})")
    values = gaussian_sum(vectors, clip_norm, sigma, generator=generator, secure_mode=secure_mode)
    epsilon = ledger.commit_round(run_id=EVAL_PREFIX + request, server_round=server_round,
                                  spend=RoundSpend(after, 1))
    return EvalRelease(values, epsilon, plan.delta, plan.accountant)
