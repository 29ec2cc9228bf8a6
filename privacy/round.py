"""One privacy round at a site, behind one call: plan, budget check, training, atomic commit.

    privacy = PrivacyRound(ledger, schedule, run_id=request, server_round=3, steps=20,
                           cap_epsilon=cap, seed=seed)
    with privacy as private:          # plan + budget check: BudgetExceeded before any training
        recipe.train_local(model, RoundContext(..., private=private, ...))
    privacy.epsilon                   # committed: the ledger now holds this round

Why one object: the plan, the history the training resumes from, the release values it
may reuse, and what the commit must be told all come from the same ledger state; split
over the caller they drifted apart (three values handed back, releases kept in three
places). Here the ledger is read once on entry and written once on a clean exit:

- entry: ``ensure_plan`` (noise calibrated once for the whole schedule; a new plan is not
  written yet), ``check_budget`` (raises ``BudgetExceeded`` for a round that would pass
  the site's cap: nothing trains, nothing is written), then ``PrivateTraining`` resuming
  the ledger's history and its stored release values;
- clean exit: the training object is closed (hooks removed) and its ``spend()`` (history,
  steps, new release values) is committed atomically with the plan, in one file write;
- an exception: the training object is closed and the ledger is left as it was on disk.
  Noise drawn in a crashed round was never released (nothing left the node), so there is
  nothing to account; the retried round trains afresh and is charged then.

Replays (the same request again) never reach this object: the node answers them from
its reply store (client/local_state.py) without training.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.ledger import PrivacyLedger
from medgen.privacy.plan import PrivacyPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacySchedule:
    """What a site's plan is calibrated for: its whole schedule, fixed for the study."""

    target_epsilon: float
    delta: float
    accountant: str
    sample_rate: float
    total_steps: int
    max_grad_norm: float
    #: the recipe's one-off releases as accountant entries (``Recipe.one_off_releases``)
    releases: tuple[tuple[float, float, int], ...] = ()


class PrivacyRound:
    """One round of a site's DP spending; use it as a context manager (module docstring)."""

    def __init__(self, ledger: PrivacyLedger, schedule: PrivacySchedule, *, run_id: str,
                 server_round: int, steps: int, cap_epsilon: float, seed: int | None = None,
                 secure_rng: bool = False):
        self.ledger = ledger
        self.schedule = schedule
        self.run_id = str(run_id)
        self.server_round = int(server_round)
        self.steps = int(steps)
        self.cap_epsilon = float(cap_epsilon)
        self.seed = seed
        self.secure_rng = secure_rng
        self.training: PrivateTraining | None = None
        self.epsilon: float | None = None  # set by the commit

    @classmethod
    def at(cls, ledger_path: Path, site: str, schedule: PrivacySchedule, **round_args) -> "PrivacyRound":
        """The round on the site's ledger file (opened, or started empty if absent)."""
        return cls(PrivacyLedger.open(ledger_path, site=site), schedule, **round_args)

    @property
    def plan(self) -> PrivacyPlan:
        if self.ledger.plan is None:
            raise RuntimeError("the privacy round has not started: use it in a `with` block")
        return self.ledger.plan

    @property
    def steps_taken(self) -> int:
        return self.training.steps_taken if self.training is not None else 0

    def __enter__(self) -> PrivateTraining:
        if self.training is not None:
            raise RuntimeError("a PrivacyRound runs once; open a new one for the next round")
        plan = self.ledger.ensure_plan(**asdict(self.schedule), save=False)
        self.ledger.check_budget(self.steps, self.cap_epsilon)  # raises BudgetExceeded
        self.training = PrivateTraining(plan, self.ledger.history, seed=self.seed,
                                        secure_rng=self.secure_rng, released=self.ledger.released)
        return self.training

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        self.training.close()  # Opacus' and the guard's hooks off the recipe's module
        if exc_type is not None:
            log.warning("site %s: round %d failed (%s); its privacy ledger is unchanged",
                        self.ledger.site, self.server_round, exc_type.__name__)
            return False
        self.epsilon = self.ledger.commit_round(run_id=self.run_id, server_round=self.server_round,
                                                spend=self.training.spend())
        return False
