"""Everything the report reads from a run directory, read once and tolerantly.

The files are the ones server/run_log.py writes: config.toml, metrics.jsonl, DONE,
privacy.json, evaluator.json (``Evaluator.write_info``), samples/round_XXX.png with
their ``.tissue.json`` histograms, and the optional utility/translation results.
Everything is optional: a missing file is None or empty, an unreadable one adds a note
(shown in the report), never an exception.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROUND_FILE = re.compile(r"round_(\d+)\.png$")


def read_json(path: Path, notes: list[str]) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"{path.name} is unreadable ({err})")
        return None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_config(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return _flatten(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as err:
        notes.append(f"{path.name} is unreadable ({err})")
        return {}


def read_metrics(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """metrics.jsonl records with an integer round and a kind; bad lines are counted, not fatal."""
    if not path.exists():
        return []
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int) and "kind" in record:
            records.append(record)
        else:
            bad += 1
    if bad:
        notes.append(f"{bad} line(s) of {path.name} were unreadable and are left out")
    return records


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (strings, bools, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class RunFiles:
    path: Path
    config: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    privacy: Any
    evaluator: Any
    done: Any
    samples: list[Path]
    tissue: dict[str, Any] | None          # latest samples/round_XXX.tissue.json
    tissue_round: int | None
    extras: dict[str, Any] = field(default_factory=dict)   # utility, translation results
    notes: list[str] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        names = [s.strip() for s in str(self.config.get("sites", "")).split(",") if s.strip()]
        for record in self.train:
            names += [s for s in record.get("per_site", {}) if s not in names]
        for record in self.evals:
            names += [k.split("/", 1)[1] for k in record["metrics"]
                      if k.startswith(("fd/", "panel_n/")) and k.split("/", 1)[1] not in names]
        return names

    @property
    def last_eval(self) -> dict[str, Any]:
        return self.evals[-1]["metrics"] if self.evals else {}

    @property
    def panel(self) -> dict[str, Any]:
        panel = (self.evaluator or {}).get("panel") if isinstance(self.evaluator, dict) else None
        return panel if isinstance(panel, dict) else {}


def site_metrics(record: dict, site: str) -> dict:
    metrics = record.get("per_site", {}).get(site)
    return metrics if isinstance(metrics, dict) else {}


def read_run(run_dir: Path) -> RunFiles:
    run_dir = Path(run_dir)
    notes: list[str] = []
    records = read_metrics(run_dir / "metrics.jsonl", notes)
    train = sorted((r for r in records if r["kind"] == "train" and isinstance(r.get("per_site", {}), dict)
                    and isinstance(r.get("excluded", []), list) and isinstance(r.get("aggregate", {}), dict)),
                   key=lambda r: r["round"])
    evals = sorted((r for r in records if r["kind"] == "eval" and isinstance(r.get("metrics"), dict)),
                   key=lambda r: r["round"])
    samples_dir = run_dir / "samples"
    samples = sorted(p for p in samples_dir.glob("round_*.png") if ROUND_FILE.search(p.name)) \
        if samples_dir.is_dir() else []
    tissue, tissue_round = None, None
    for grid in reversed(samples):
        side = grid.with_suffix(".tissue.json")
        if side.exists():
            tissue = read_json(side, notes)
            tissue_round = int(ROUND_FILE.search(grid.name).group(1))
            break
    extras = {name: read_json(run_dir / f"{name}.json", notes)
              for name in ("utility", "utility-augmented", "translation", "federated_eval") if (run_dir / f"{name}.json").exists()}
    return RunFiles(path=run_dir, config=read_config(run_dir / "config.toml", notes), train=train,
                    evals=evals, privacy=read_json(run_dir / "privacy.json", notes),
                    evaluator=read_json(run_dir / "evaluator.json", notes),
                    done=read_json(run_dir / "DONE", notes), samples=samples,
                    tissue=tissue if isinstance(tissue, dict) else None, tissue_round=tissue_round,
                    extras=extras, notes=notes)
