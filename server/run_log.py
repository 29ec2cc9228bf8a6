"""The run directory and its metrics log (JSON lines), shared by server, harness and report.

Layout of a run directory (the report, evaluation/report.py, reads the same files):

    config.toml            the RunConfig of the run (written at every start)
    metrics.jsonl          one JSON object per line:
                           {"round", "kind": "train", "per_site": {site: {...}},
                            "excluded": [{"site", "reason", optional "node", "epsilon", "delta"}],
                            "aggregate": {...}}
                           {"round", "kind": "eval", "metrics": {...}}
    samples/round_XXX.png  sample grids (one row per site)
    checkpoint.pt/.json    last good global shared weights (server/checkpoint.py)
    privacy.json           per-site epsilon (from client metrics) and node ledger summaries
    report.html            the self-contained report
    DONE                   written last by the ServerApp: {"status": "ok"|"failed",
                           "coordinator": id, "final_round", "untrained_rounds", ...}
    .coordinator/          the coordinator's lock, process records and supervisor log
                           (server/run_lock.py, server/supervisor.py)

metrics.jsonl is append-only with an fsync per line (medgen.atomic.append_line): a crash
loses at most the line being written, and readers skip a torn last line.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from medgen.atomic import append_line, atomic_write_json, atomic_write_text
from medgen.config import RunConfig

METRICS_FILE = "metrics.jsonl"
DONE_FILE = "DONE"
PRIVACY_FILE = "privacy.json"
CONFIG_FILE = "config.toml"
SAMPLES_DIR = "samples"


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN/inf; a metric that went non-finite is logged as null, not dropped
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _finite_or_none(obj)


@dataclass(frozen=True)
class RunDir:
    """Paths and writers of one run directory."""

    path: Path

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def done(self) -> Path:
        return self.path / DONE_FILE

    @property
    def privacy(self) -> Path:
        return self.path / PRIVACY_FILE

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    def sample_grid(self, server_round: int) -> Path:
        return self.path / SAMPLES_DIR / f"round_{server_round:03d}.png"

    def write_config(self, config: RunConfig) -> None:
        atomic_write_text(self.config, config.to_toml())

    def log_train(self, server_round: int, per_site: Mapping[str, Mapping[str, float]],
                  excluded: list[Mapping[str, str]], aggregate: Mapping[str, float]) -> None:
        self._append({"round": server_round, "kind": "train", "time": time.time(),
                      "per_site": per_site, "excluded": excluded, "aggregate": aggregate})

    def log_eval(self, server_round: int, metrics: Mapping[str, float]) -> None:
        self._append({"round": server_round, "kind": "eval", "time": time.time(),
                      "metrics": metrics})

    def write_done(self, status: str, **details: Any) -> None:
        atomic_write_json(self.done, _clean({"status": status, "time": time.time(), **details}))

    def read_done(self, coordinator_id: str | None = None) -> dict[str, Any] | None:
        """The DONE marker; with ``coordinator_id``, only one written for that coordinator
        (a DONE left by another coordinator of this directory says nothing about this run)."""
        try:
            done = json.loads(self.done.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if coordinator_id is not None and done.get("coordinator") != coordinator_id:
            return None
        return done

    def clear_done(self) -> None:
        self.done.unlink(missing_ok=True)

    def restart_metrics(self, from_round: int) -> None:
        """Make metrics.jsonl agree with the checkpoint a run (re)starts from.

        Lines of rounds after ``from_round`` (logged, then lost in a crash before their
        checkpoint) are dropped, so a resumed run does not report a round twice; a fresh
        start (``from_round`` 0) keeps the previous log as metrics.<time>.jsonl.
        """
        if not self.metrics.exists():
            return
        if from_round == 0:
            self.metrics.rename(self.path / f"metrics.{int(time.time())}.jsonl")
            return
        kept = [r for r in read_metrics(self.metrics) if int(r.get("round", 0)) <= from_round]
        atomic_write_text(self.metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def _append(self, record: Mapping[str, Any]) -> None:
        append_line(self.metrics, json.dumps(_clean(record), sort_keys=True))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics.jsonl (a torn last line after a crash is skipped)."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def show_new_records(metrics: Path, shown: int, num_rounds: int,
                     progress: Callable[[str], None]) -> int:
    """Print the progress lines of records after the first ``shown``; returns the new count."""
    records = read_metrics(metrics)
    for record in records[shown:]:
        progress(format_progress(record, num_rounds))
    return len(records)


def format_progress(record: Mapping[str, Any], num_rounds: int) -> str:
    """One human line per metrics record (the harness prints these while a run goes)."""
    prefix = f"round {record.get('round')}/{num_rounds}"
    if record.get("kind") == "train":
        per_site = record.get("per_site", {})
        eps = ", ".join(f"{site} eps={m.get('epsilon', float('nan')):.2f}"
                        for site, m in sorted(per_site.items()) if isinstance(m, Mapping)
                        and isinstance(m.get("epsilon"), (int, float)))
        excluded = record.get("excluded", [])
        text = f"{prefix} train: {len(per_site)} site(s) answered"
        if eps:
            text += f" ({eps})"
        if excluded:
            text += "; excluded: " + "; ".join(f"{e.get('site')}: {e.get('reason')}"
                                               for e in excluded)
        return text
    if record.get("kind") == "eval":
        metrics = record.get("metrics", {})
        fds = ", ".join(f"{k}={v:.2f}" for k, v in sorted(metrics.items())
                        if k.startswith("fd/") and isinstance(v, (int, float)))
        return f"{prefix} eval: {fds or 'no FD metrics'}"
    return f"{prefix} {record.get('kind')}"
