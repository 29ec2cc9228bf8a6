"""What a finished run achieved, read from its run directory, in one line a person can act on.

A round "trained" when the server aggregated at least min-sites valid updates; a round in
which every site refused or failed keeps the previous weights (metrics.jsonl marks it
``kept-previous-weights``) and writes no checkpoint (server/app.py ``RoundEnd``), so the
checkpoint's round is always the last round that trained. A run is complete when that
round reaches num-rounds; otherwise ``medgen-server simulate`` exits non-zero with e.g.

    no site trained in rounds 5-6: budget exhausted at every site (A, B); the checkpoint
    stays at round 4, the last round that trained
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from medgen.server.checkpoint import SIDECAR_FILE, load_checkpoint

BUDGET_WORDS = "privacy budget"  # in a site's refusal (client/app.py: BUDGET_EXCEEDED)


def kept_previous(record: Mapping[str, Any]) -> bool:
    """A train record of a round that aggregated nothing (the weights stayed as they were)."""
    return bool((record.get("aggregate") or {}).get("kept-previous-weights"))


def untrained_rounds(records: Iterable[Mapping[str, Any]]) -> list[int]:
    """Rounds whose (last) train record kept the previous weights, in order."""
    last: dict[int, Mapping[str, Any]] = {}
    for record in records:
        if record.get("kind") == "train":
            last[int(record["round"])] = record
    return sorted(r for r, record in last.items() if kept_previous(record))


def checkpoint_round(run_dir: Path) -> int | None:
    """The round of the checkpoint in ``run_dir`` (None: no checkpoint), sidecar first."""
    try:
        return int(json.loads((Path(run_dir) / SIDECAR_FILE).read_text())["server_round"])
    except (OSError, ValueError, KeyError, TypeError):
        checkpoint = load_checkpoint(Path(run_dir))
        return checkpoint.server_round if checkpoint is not None else None


def span(rounds: list[int]) -> str:
    """[5, 6] -> '5-6'; [3] -> '3'; [2, 4] -> '2, 4'."""
    if len(rounds) > 1 and rounds == list(range(rounds[0], rounds[-1] + 1)):
        return f"{rounds[0]}-{rounds[-1]}"
    return ", ".join(str(r) for r in rounds)


def why_untrained(records: Iterable[Mapping[str, Any]], sites: tuple[str, ...], min_sites: int) -> str:
    """The reasons of the given train records, most recent per site, in words."""
    reasons: dict[str, str] = {}
    answered = 0
    for record in records:
        answered = max(answered, len(record.get("per_site") or {}))
        for item in record.get("excluded") or []:
            reasons[str(item.get("site"))] = str(item.get("reason"))
    budget = sorted(site for site, reason in reasons.items() if BUDGET_WORDS in reason)
    parts = []
    if budget and (set(sites) <= set(budget) or len(budget) >= len(sites)):  # sites or node ids
        parts.append(f"budget exhausted at every site ({', '.join(budget)})")
    elif budget:
        parts.append(f"budget exhausted at {', '.join(budget)}")
    parts += [f"{site}: {reason}" for site, reason in sorted(reasons.items()) if site not in budget]
    if answered:
        parts.append(f"only {answered} valid update(s) per round, fewer than min-sites {min_sites}")
    return "; ".join(parts) or "no site's update was accepted"


@dataclass(frozen=True)
class RunOutcome:
    final_round: int | None        # the checkpoint's round = the last round that trained
    num_rounds: int
    untrained: tuple[int, ...]     # rounds logged in metrics.jsonl that trained no site
    why: str                       # reasons for the rounds after final_round (or "")

    @property
    def complete(self) -> bool:
        return (self.final_round or 0) >= self.num_rounds

    @property
    def missing(self) -> list[int]:
        """The planned rounds after the last one that trained."""
        return list(range((self.final_round or 0) + 1, self.num_rounds + 1))

    def summary(self) -> str:
        if self.complete:
            skipped = [r for r in self.untrained if r <= self.num_rounds]
            rounds = f"rounds {span(skipped)}" if len(skipped) > 1 else f"round {span(skipped)}"
            note = f" ({rounds} trained no site and kept the weights)" if skipped else ""
            return f"finished round {self.final_round}{note}"
        where = (f"the checkpoint stays at round {self.final_round}, the last round that trained"
                 if self.final_round else
                 "no checkpoint holds trained weights" if self.final_round is None else
                 "the checkpoint holds the initial weights (round 0)")
        rounds = f"rounds {span(self.missing)}" if len(self.missing) > 1 else f"round {span(self.missing)}"
        return f"no site trained in {rounds}: {self.why or 'the rounds did not run'}; {where}"


def run_outcome(run_dir: Path, records: list[Mapping[str, Any]], num_rounds: int, sites: tuple[str, ...],
                min_sites: int) -> RunOutcome:
    final = checkpoint_round(run_dir)
    after = [r for r in records if r.get("kind") == "train" and int(r.get("round", 0)) > (final or 0)]
    return RunOutcome(final_round=final, num_rounds=num_rounds,
                      untrained=tuple(untrained_rounds(records)),
                      why=why_untrained(after, sites, min_sites) if after else "")
