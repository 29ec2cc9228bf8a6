"""Report section: the sites' federated evaluation (run-dir/federated_eval.json).

Each site scored the global generator against its own evaluation patients and released the
score and its real-vs-real floor under DP (evaluation/federated_eval.py); the coordinator
logged the accepted scalars per round (server/federated_eval.py). A site's scalars carry
the DP noise's own spread (``-sd``: the standard deviation of the score under fresh noise
of the same sigma), so the verdict says "worse than real" only when the score exceeds the
floor by more than twice their combined spread, "not distinguishable" when twice that
spread is as large as the floor itself (with few evaluation patients the noise, not the
generator, decides: docs/evaluation.md), and "within the noise of its floor" otherwise.
"""

from __future__ import annotations

import math
from typing import Any

from medgen.evaluation.html_parts import Raw, fmt, note, table, verdict_cell

SCORE, FLOOR = "fed-tissue-bands", "fed-tissue-bands-floor"
MARGIN_SDS = 2.0


def federated_verdict(scalars: dict[str, Any]) -> tuple[str, bool | None]:
    """(text, good): good True = within the floor's noise, False = worse, None = too noisy."""
    score, floor = float(scalars[SCORE]), float(scalars[FLOOR])
    spread = math.hypot(float(scalars.get(f"{SCORE}-sd", 0.0)), float(scalars.get(f"{FLOOR}-sd", 0.0)))
    if score - floor > MARGIN_SDS * spread:
        return "worse than its real patients", False
    if MARGIN_SDS * spread > abs(floor):  # no power: a score twice the floor could hide in the noise
        return "not distinguishable: the DP noise is as large as the floor", None
    return "within the noise of its floor", True


def federated_eval_section(results: dict[str, Any]) -> str:
    rows, excluded = [], []
    for round_, entry in sorted(results.items(), key=lambda kv: int(kv[0])):
        for site, scalars in sorted(entry.get("per_site", {}).items()):
            try:
                text, good = federated_verdict(scalars)
            except (KeyError, TypeError, ValueError):
                rows.append([int(round_), site, "-", "-", "-", verdict_cell("scalars missing", None)])
                continue
            rows.append([int(round_), site,
                         f"{fmt(float(scalars[SCORE]))} ± {fmt(float(scalars.get(f'{SCORE}-sd', 0.0)))}",
                         f"{fmt(float(scalars[FLOOR]))} ± {fmt(float(scalars.get(f'{FLOOR}-sd', 0.0)))}",
                         fmt(float(scalars.get("fed-noise-multiplier", float("nan")))),
                         verdict_cell(text, good)])
        excluded += [[int(round_), e.get("site", "?"), e.get("reason", "?")] for e in entry.get("excluded", [])]
    body = note("Each site scored the global generator against its own evaluation patients (never "
                "trained on) and released only these scalars, with Gaussian noise, accounted in its "
                "ledger (privacy section). ± is the spread the DP noise alone gives a score.")
    body += table(["round", "site", "tissue_bands (site's patients)", "its floor", "noise multiplier",
                   "verdict"], rows) if rows else note("No site's evaluation was accepted.")
    if excluded:
        body += "<h3>Evaluations refused</h3>" + table(["round", "site", "reason"], excluded)
    return Raw(body)
