"""The per-site privacy ledger: what this site has spent, persisted on the node.

One JSON file per site holds the privacy plan (noise calibrated once for the whole
schedule), the Opacus accountant history ``[(noise_multiplier, sample_rate, steps)]``
and one entry per committed round. Epsilon is always recomputed from the history, so
the file cannot disagree with itself. The file is written atomically (medgen.atomic) and
is never reset: a corrupt or foreign file is an error naming the file. Only the scalar
epsilon (``summary()``) ever leaves the node.

Commit rule (idempotent per ``(run_id, server_round)``), see docs/privacy.md:
- re-committing a round with the history already stored is a no-op (a retried commit,
  or a replayed round answered from the client's cache): nothing is charged twice;
- a history that extends the stored one means noise was drawn again on real records, so
  it IS charged (even under an already-committed round id: the ledger never
  under-reports). Clients avoid that cost by checking ``has_round`` and not re-training;
- a history that does not extend the stored one is refused (a stale or foreign writer).

A round is committed as ONE ``RoundSpend`` (``PrivateTraining.spend()``: the full history,
the accountant steps it added, the one-off releases it made). ``privacy/round.py`` wraps
plan -> budget check -> training -> commit into one call; use that, not these pieces.
The ledger is the one store of one-off release values (``released``): later rounds and
runs reuse them at no cost (privacy/releases.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgen.atomic import atomic_write_json
from medgen.privacy.accounting import (History, calibrate_noise, epsilon_of, history_steps,
                                       normalize_history, project_epsilon)
from medgen.privacy.plan import PrivacyPlan, expand_history
from medgen.privacy.releases import ReleasedValue

log = logging.getLogger(__name__)

LEDGER_FORMAT = 1
EPSILON_TOLERANCE = 1e-9


#: run-id prefix of a federated evaluation's ledger entry (privacy/eval_release.py)
EVAL_PREFIX = "eval:"


def is_evaluation(entry: dict[str, Any]) -> bool:
    """Whether a ledger round entry records a federated evaluation's release."""
    return str(entry["run_id"]).startswith(EVAL_PREFIX)


class LedgerError(ValueError):
    """The ledger file is unreadable, malformed, or belongs to another site."""


class BudgetExceeded(RuntimeError):
    """Training the requested steps would take the site past its epsilon cap."""


@dataclass(frozen=True)
class RoundSpend:
    """What one round added to a site's accounting, committed as one value."""

    history: History                          # the full accountant history after the round
    steps: int                                # accountant steps it added (DP-SGD + releases)
    releases: tuple[ReleasedValue, ...] = ()  # the one-off releases it made (values kept)


def _extends(old: History, new: History) -> bool:
    old_steps, new_steps = expand_history(old), expand_history(new)
    return len(new_steps) >= len(old_steps) and new_steps[:len(old_steps)] == old_steps


class PrivacyLedger:
    """Node-local, persistent record of one site's DP spending.

    Plan + accountant history + per-round entries, in one JSON file written atomically.
    Survives restarts. Never leaves the node except as the scalar epsilon.
    """

    def __init__(self, path: Path, site: str, plan: PrivacyPlan | None,
                 history: History, rounds: list[dict[str, Any]],
                 released: list[ReleasedValue] | None = None):
        self.path = Path(path)
        self.site = site
        self.plan = plan
        self.history = history
        self.rounds = rounds
        #: the values of one-off releases already made (DP outputs, node-local): a later run
        #: on this ledger reuses them for free instead of releasing (and spending) again
        self.released: list[ReleasedValue] = list(released or [])
        self._epsilon_cache: tuple[tuple, float] | None = None

    # -- loading -------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, *, site: str) -> "PrivacyLedger":
        """Load the site's ledger, or start an empty one in memory if the file is absent."""
        path = Path(path)
        if not site:
            raise ValueError("privacy ledger needs a non-empty 'site' name")
        if not path.exists():
            return cls(path, site, None, [], [])
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
                raise ValueError(f"not a medgen privacy ledger (format {LEDGER_FORMAT})")
            plan = PrivacyPlan.from_json(data["plan"]) if data.get("plan") is not None else None
            history = normalize_history(data["history"])
            rounds = list(data["rounds"])
            released = [ReleasedValue.from_json(r) for r in data.get("released", [])]
            stored_site = data["site"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                ValueError) as err:
            raise LedgerError(
                f"privacy ledger {path} is unreadable or corrupt ({type(err).__name__}: {err}). "
                "It is never reset automatically, because that would forget privacy already "
                "spent: restore it from a backup. Only if you are certain this site never "
                "trained may you move the file aside.") from None
        if stored_site != site:
            raise LedgerError(f"privacy ledger {path} belongs to site {stored_site!r}, not {site!r}: "
                              "point each site at its own ledger file")
        if history and plan is None:
            raise LedgerError(f"privacy ledger {path} has a history but no plan: restore it from a backup")
        return cls(path, site, plan, history, rounds, released)

    # -- the plan ------------------------------------------------------------------
    def ensure_plan(self, *, target_epsilon: float, delta: float, accountant: str,
                    sample_rate: float, total_steps: int, max_grad_norm: float,
                    releases: Any = (), save: bool = True) -> PrivacyPlan:
        """First call calibrates the noise (and saves, unless ``save=False``: then the plan
        reaches the file with the first commit); later calls return the stored plan.

        ``releases``: the recipe's one-off Gaussian releases (``Recipe.one_off_releases``),
        composed with the DP-SGD schedule in the calibration and recorded in the plan.
        """
        releases = tuple((float(s), float(q), int(n)) for s, q, n in normalize_history(releases))
        if self.plan is not None:
            requested = dict(target_epsilon=float(target_epsilon), delta=float(delta),
                             accountant=accountant, sample_rate=float(sample_rate),
                             total_steps=int(total_steps), max_grad_norm=float(max_grad_norm),
                             releases=releases)
            stored = {k: getattr(self.plan, k) for k in requested}
            if requested != stored:
                changed = {k: (stored[k], requested[k]) for k in requested if requested[k] != stored[k]}
                log.warning("site %s: keeping the stored privacy plan; the requested plan differs in "
                            "%s (stored, requested). Noise is calibrated once for the whole "
                            "schedule; start a new ledger for a new schedule.", self.site, changed)
            return self.plan
        if max_grad_norm <= 0:
            raise ValueError(f"privacy field 'max_grad_norm' must be > 0, got {max_grad_norm}")
        sigma = calibrate_noise(target_epsilon, delta, sample_rate, total_steps, accountant,
                                releases=releases)
        self.plan = PrivacyPlan(target_epsilon=float(target_epsilon), delta=float(delta),
                                accountant=accountant, sample_rate=float(sample_rate),
                                total_steps=int(total_steps), noise_multiplier=sigma,
                                max_grad_norm=float(max_grad_norm), releases=releases)
        if save:
            self._save()
        log.info("site %s: calibrated noise_multiplier=%.4f for epsilon=%.3g, delta=%.3g over %d "
                 "steps at q=%.5g (%s accountant)%s", self.site, sigma, target_epsilon, delta,
                 total_steps, sample_rate, accountant,
                 f", composed with one-off releases {list(releases)}" if releases else "")
        return self.plan

    # -- spending ------------------------------------------------------------------
    def spent_epsilon(self) -> float:
        if not self.history:
            return 0.0
        plan = self._require_plan()
        key = (tuple(self.history), plan.delta, plan.accountant)
        if self._epsilon_cache is None or self._epsilon_cache[0] != key:
            self._epsilon_cache = (key, epsilon_of(self.history, plan.delta, plan.accountant))
        return self._epsilon_cache[1]

    @property
    def steps(self) -> int:
        return history_steps(self.history)

    def check_budget(self, steps: int, cap_epsilon: float) -> float:
        """Projected epsilon after ``steps`` more plan steps; BudgetExceeded past the cap.

        The cap is min(cap_epsilon, plan.target_epsilon): a site may be stricter than the
        plan, never looser.
        """
        plan = self._require_plan()
        cap = min(float(cap_epsilon), plan.target_epsilon)
        # planned one-off releases not yet spent may be spent this round: project them too
        projected = project_epsilon(self.history + plan.pending_releases(self.history),
                                    plan.noise_multiplier, plan.sample_rate,
                                    steps, plan.delta, plan.accountant)
        if projected > cap + EPSILON_TOLERANCE:
            raise BudgetExceeded(
                f"site {self.site!r}: privacy budget exceeded. Spent epsilon "
                f"{self.spent_epsilon():.4f} (delta {plan.delta:g}, {plan.accountant} accountant, "
                f"unit {plan.unit}); {steps} more steps would reach {projected:.4f} > cap "
                f"{cap:.4f}. This site refuses to train: stop the run for this site, or raise the "
                f"site cap / start a new study with a new plan (ledger {self.path}).")
        return projected

    def has_round(self, run_id: str, server_round: int) -> bool:
        return any(e["run_id"] == run_id and e["server_round"] == int(server_round) for e in self.rounds)

    def commit_round(self, *, run_id: str, server_round: int, spend: RoundSpend) -> float:
        """Persist the round's full accountant history atomically; returns the epsilon spent.

        Idempotent per (run_id, server_round): see the module docstring for the rule.
        ``spend.releases`` are stored with the history that accounts them, so later rounds
        and runs reuse their values.
        """
        self._require_plan()
        new, steps, releases = normalize_history(spend.history), int(spend.steps), list(spend.releases)
        if releases:
            sigmas = {r.noise_multiplier for r in releases}
            grown_releases = sum(1 for e in expand_history(new) if e[1] == 1.0 and e[0] in sigmas) - \
                sum(1 for e in expand_history(self.history) if e[1] == 1.0 and e[0] in sigmas)
            if grown_releases != len(releases):
                raise LedgerError(f"privacy ledger {self.path}: round {server_round} reports "
                                  f"{len(releases)} new release(s) but the history grew by "
                                  f"{grown_releases} full-batch entries")
        if new == self.history or expand_history(new) == expand_history(self.history):
            if not self.has_round(run_id, server_round):
                if steps != 0:
                    raise LedgerError(
                        f"privacy ledger {self.path}: round {server_round} of run {run_id!r} claims "
                        f"{steps} steps but the history did not grow; commit the spend returned by "
                        "PrivateTraining.spend() after training")
                self._append_entry(run_id, server_round, 0)
                self._save()
            else:
                log.info("site %s: round %s of run %s already committed; not charged again",
                         self.site, server_round, run_id)
            return self.spent_epsilon()
        if not _extends(self.history, new):
            raise LedgerError(
                f"privacy ledger {self.path}: the committed history does not extend the stored one "
                f"({self.steps} stored steps). Another process trained from a different ledger "
                "state; reopen the ledger and retrain from it.")
        grown = history_steps(new) - self.steps
        if grown != steps:
            raise LedgerError(f"privacy ledger {self.path}: round {server_round} claims {steps} steps "
                              f"but the history grew by {grown}")
        if self.has_round(run_id, server_round):
            log.warning("site %s: round %s of run %s was trained again; the new %d steps ARE "
                        "charged (fresh noise on real records)", self.site, server_round, run_id, grown)
        old_history, old_rounds, old_released = self.history, list(self.rounds), list(self.released)
        self.history = new
        self.released.extend(releases)
        self._append_entry(run_id, server_round, grown)
        try:
            self._save()
        except BaseException:
            self.history, self.rounds, self.released = old_history, old_rounds, old_released  # memory matches the file
            raise
        return self.spent_epsilon()

    def summary(self) -> dict[str, Any]:
        """JSON-able scalars: the only part of the ledger that may leave the node."""
        plan = self.plan
        return {
            "site": self.site,
            "plan": plan.to_json() if plan else None,
            "epsilon": self.spent_epsilon(),
            "delta": plan.delta if plan else None,
            "accountant": plan.accountant if plan else None,
            "unit": plan.unit if plan else "patient",
            # a federated evaluation commits its release as an entry of its own
            # (privacy/eval_release.py): spent, but not a trained round
            "rounds_trained": sum(1 for e in self.rounds if e["steps"] > 0 and not is_evaluation(e)),
            "evaluations": sum(1 for e in self.rounds if is_evaluation(e)),
            "steps": self.steps,
        }

    # -- internals -----------------------------------------------------------------
    def _require_plan(self) -> PrivacyPlan:
        if self.plan is None:
            raise LedgerError(f"privacy ledger {self.path} has no plan yet: call ensure_plan() first")
        return self.plan

    def _append_entry(self, run_id: str, server_round: int, steps: int) -> None:
        self.rounds.append({"run_id": str(run_id), "server_round": int(server_round),
                            "steps": int(steps), "total_steps": self.steps,
                            "committed_at": time.time()})
        if self.rounds[-1]["steps"] or len(self.history):
            self.rounds[-1]["epsilon"] = self.spent_epsilon()

    def _save(self) -> None:
        atomic_write_json(self.path, {
            "format": LEDGER_FORMAT,
            "site": self.site,
            "plan": self.plan.to_json() if self.plan else None,
            "history": [list(entry) for entry in self.history],
            "rounds": self.rounds,
            **({"released": [r.to_json() for r in self.released]} if self.released else {}),
        }, mode=0o600)
