"""A self-contained HTML report of one run directory.

Reads what the server writes (server/run_log.py): config.toml, metrics.jsonl,
samples/round_XXX.png, privacy.json, and evaluator.json (``Evaluator.write_info``).
Everything is optional: a missing or unreadable piece becomes a note in its section,
never a crash. Images are base64 data URIs, charts inline SVG (svg_charts.py); no
script and nothing fetched from anywhere. Every string from the run is escaped.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
import tomllib
from html import escape
from pathlib import Path
from typing import Any

from medgen.atomic import atomic_write_text
from medgen.evaluation.svg_charts import PALETTE, Chart, Series, render_chart

MAX_SAMPLE_IMAGES = 8
EPSILON_KEY = "epsilon"
EVAL_FAMILIES = ("fd", "fd_floor", "kid", "kid_lo", "kid_hi", "kid_floor", "site_acc",
                 "nonfinite", "n_gen", "n_ref", "seed")
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;
font-size:13px;text-align:left}th{background:#f3f3f3}.empty,.note{color:#777}
img{image-rendering:pixelated;max-width:100%}code{font-size:12px}"""


# -- reading the run directory ---------------------------------------------------------
def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"{path.name} is unreadable ({err})")
        return None


def _read_config(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return _flatten(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as err:
        notes.append(f"{path.name} is unreadable ({err})")
        return {}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# -- HTML helpers ----------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2 ** 53 and abs(value) >= 1:
            return str(int(value))  # counts and seeds print exactly
        return f"{value:.4g}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _nested(obj: Any) -> str:
    """Any JSON value as nested tables (for ledger summaries of unknown shape)."""
    if isinstance(obj, dict):
        if not obj:
            return '<span class="empty">(empty)</span>'
        return "<table>" + "".join(f"<tr><th>{escape(str(k))}</th><td>{_nested(v)}</td></tr>"
                                   for k, v in obj.items()) + "</table>"
    if isinstance(obj, list):
        return "<br>".join(_nested(v) for v in obj) or '<span class="empty">(none)</span>'
    return escape(_fmt(obj))


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# -- sections --------------------------------------------------------------------------
def _sites(train: list[dict], evals: list[dict], config: dict[str, Any]) -> list[str]:
    names = [s.strip() for s in str(config.get("sites", "")).split(",") if s.strip()]
    for record in train:
        names += [s for s in record.get("per_site", {}) if s not in names]
    for record in evals:
        names += [k.split("/", 1)[1] for k in record.get("metrics", {})
                  if k.startswith("fd/") and k.split("/", 1)[1] not in names]
    return names


def _site_metrics(record: dict, site: str) -> dict:
    metrics = record.get("per_site", {}).get(site)
    return metrics if isinstance(metrics, dict) else {}


def _per_site_series(train: list[dict], sites: list[str], key: str) -> list[Series]:
    return [Series(site, [(r["round"], v) for r in train
                          if (v := _number(_site_metrics(r, site).get(key))) is not None],
                   colour=PALETTE[i % len(PALETTE)]) for i, site in enumerate(sites)]


def _privacy_section(train, sites, config, privacy) -> str:
    accountant = (privacy or {}).get("accountant", config.get("accountant", "unknown"))
    delta = (privacy or {}).get("delta", config.get("delta", "unknown"))
    unit = (privacy or {}).get("unit", "patient")
    body = (f"<p>Record-level DP per site. Unit: <b>{escape(str(unit))}</b>; accountant: "
            f"<b>Opacus {escape(str(accountant))}</b>; delta = {escape(_fmt(delta))}; target epsilon "
            f"= {escape(_fmt(config.get('target-epsilon', 'unknown')))}; Poisson sampling; "
            f"composition over all rounds a site trained.</p>")
    body += render_chart(Chart("epsilon spent per site", "epsilon",
                               series=_per_site_series(train, sites, EPSILON_KEY)))
    body += "<h3>Privacy ledger summary (privacy.json)</h3>"
    body += _nested(privacy) if privacy is not None else '<p class="empty">privacy.json not found.</p>'
    return body


def _training_section(train, sites) -> str:
    if not train:
        return '<p class="empty">No training rounds recorded.</p>'
    keys = sorted({k for r in train for m in r.get("per_site", {}).values() if isinstance(m, dict)
                   for k, v in m.items() if _number(v) is not None and k != EPSILON_KEY})
    charts = [render_chart(Chart(f"{key} per site", key, series=_per_site_series(train, sites, key)))
              for key in keys if "loss" in key]
    agg_keys = sorted({k for r in train for k, v in r.get("aggregate", {}).items() if _number(v) is not None})
    agg_series = [Series(k, [(r["round"], v) for r in train
                             if (v := _number(r.get("aggregate", {}).get(k))) is not None]) for k in agg_keys]
    charts.append(render_chart(Chart("aggregate metrics", "value", series=agg_series)))
    last = train[-1]
    rows = [[site, *[_site_metrics(last, site).get(k, "") for k in keys]] for site in sites]
    return ("".join(charts) + f"<h3>Per-site metrics, round {last['round']}</h3>"
            + _table(["site", *keys], rows))


def _excluded_section(train) -> str:
    rows = [[r["round"], e.get("site", "?"), e.get("reason", "?")] for r in train
            for e in r.get("excluded", []) if isinstance(e, dict)]
    return _table(["round", "site", "reason"], rows) if rows else '<p class="note">No reply was excluded.</p>'


def _evaluation_section(evals, sites, evaluator) -> str:
    if not evals:
        return '<p class="empty">No evaluation rounds recorded (eval-every=0 or no held-out data).</p>'
    name = (evaluator or {}).get("extractor_name", "FD_medgenenc-v1")

    def series(family: str, dashed: bool = False) -> list[Series]:
        return [Series(f"{site}{' floor' if dashed else ''}",
                       [(r["round"], v) for r in evals if (v := _number(r["metrics"].get(f"{family}/{site}"))) is not None],
                       dashed=dashed, colour=PALETTE[i % len(PALETTE)]) for i, site in enumerate(sites)]

    body = (f"<p>{escape(name)}: Frechet distance in the features of the project's own encoder "
            "(trained on heldout/fit only; no Inception/ImageNet weights). Generated images are conditioned on "
            "label maps of half of the heldout/test subjects and compared with real images of the "
            "other half; the dashed line is the real-vs-real floor at the same N.</p>")
    body += render_chart(Chart(f"{name} per site (dashed: real-vs-real floor)", "FD",
                               series=series("fd") + series("fd_floor", dashed=True)))
    body += render_chart(Chart("KID per site", "KID", series=series("kid")))
    body += render_chart(Chart("site-classifier accuracy on generated images", "accuracy",
                               series=series("site_acc")))
    body += ('<p class="note">Read site accuracy together with FD: the classifier was trained on '
             "real images only, and off-distribution images (e.g. from an untrained generator) "
             "can land in one site's class by default.</p>")
    last = evals[-1]["metrics"]
    rows = [[site, *[last.get(f"{f}/{site}", "") for f in EVAL_FAMILIES]] for site in sites]
    body += (f"<h3>Round {evals[-1]['round']}: every number with its sample count and seed</h3>"
             + _table(["site", *EVAL_FAMILIES], rows))
    means = {k: v for k, v in last.items() if "/" not in k}
    if means:
        body += _table(["mean over sites", "value"], [[k, v] for k, v in sorted(means.items())])
    return body


def _evaluator_section(evaluator) -> str:
    if evaluator is None:
        return '<p class="empty">evaluator.json not found (weights hashes unknown).</p>'
    acc = evaluator.get("classifier_real_acc", {})
    body = _table(["field", "value"], [[k, evaluator.get(k, "")] for k in
                                       ("extractor_name", "extractor_sha256", "classifier_sha256",
                                        "evaluator_seed", "medgen_version", "kid_bootstrap", "conditioning")])
    if isinstance(acc, dict) and acc:
        body += "<h3>Site classifier accuracy on real heldout/test images (its own quality)</h3>"
        body += _table(["site", "accuracy"], [[s, v] for s, v in acc.items()])
    return body


def _samples_section(run_dir: Path) -> str:
    files = sorted((run_dir / "samples").glob("round_*.png")) if (run_dir / "samples").is_dir() else []
    if not files:
        return '<p class="empty">No sample grids found (samples/round_XXX.png).</p>'
    keep = files if len(files) <= MAX_SAMPLE_IMAGES else [
        files[round(i * (len(files) - 1) / (MAX_SAMPLE_IMAGES - 1))] for i in range(MAX_SAMPLE_IMAGES)]
    body = ('<p>Top row: conditioning label maps (held-out test anatomy). Each site row: that '
            "site's real held-out scan of the first map's anatomy, then generated images.</p>")
    if len(keep) < len(files):
        body += f'<p class="note">{len(keep)} of {len(files)} grids shown (evenly spaced rounds).</p>'
    for path in dict.fromkeys(keep):
        match = re.search(r"round_(\d+)", path.name)
        label = f"round {int(match.group(1))}" if match else path.name
        body += (f'<figure><img src="{_png_uri(path)}" alt="{escape(label)}">'
                 f"<figcaption>{escape(label)}</figcaption></figure>")
    return body


def _translation_section(results: Any) -> str:
    try:
        from medgen.evaluation.translation import render_section

        return render_section(results)
    except Exception as err:  # noqa: BLE001 - a malformed file must not cost the report
        return f'<p class="note">translation.json could not be rendered: {escape(str(err))}</p>'


def render_report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    notes: list[str] = []
    config = _read_config(run_dir / "config.toml", notes)
    records = read_metrics(run_dir / "metrics.jsonl", notes)
    train = sorted((r for r in records if r["kind"] == "train" and isinstance(r.get("per_site", {}), dict)
                    and isinstance(r.get("excluded", []), list) and isinstance(r.get("aggregate", {}), dict)),
                   key=lambda r: r["round"])
    evals = sorted((r for r in records if r["kind"] == "eval" and isinstance(r.get("metrics"), dict)),
                   key=lambda r: r["round"])
    privacy = _read_json(run_dir / "privacy.json", notes)
    evaluator = _read_json(run_dir / "evaluator.json", notes)
    sites = _sites(train, evals, config)
    utility = _read_json(run_dir / "utility.json", notes) if (run_dir / "utility.json").exists() else None
    utility_augmented = (_read_json(run_dir / "utility-augmented.json", notes)
                         if (run_dir / "utility-augmented.json").exists() else None)
    translation = (_read_json(run_dir / "translation.json", notes)
                   if (run_dir / "translation.json").exists() else None)
    audited = isinstance(privacy, dict) and "membership_inference" in privacy
    contains = ["privacy (epsilon per site, accountant named; "
                + ("membership-inference audit in privacy.json)" if audited else "no empirical audit)"),
                "training losses", "excluded replies"]
    if utility is not None:
        contains.append("utility: segmenter trained on synthetic pairs, tested on real (utility.json)")
    if utility_augmented is not None:
        contains.append("utility with acquisition augmentation in every arm (utility-augmented.json)")
    if translation is not None:
        contains.append("translation against ground truth (translation.json)")
    if evals:
        contains += ["feature distance with real-vs-real floor and KID with bootstrap CI",
                     "site fidelity (site-classifier accuracy)"]
    sections = [
        _section("summary", "What this report contains",
                 f"<p>Run directory <code>{escape(str(run_dir))}</code>; written "
                 f"{escape(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))}; {len(train)} training "
                 f"round(s), {len(evals)} evaluation round(s); sites: {escape(', '.join(sites) or 'unknown')}.</p>"
                 "<ul>" + "".join(f"<li>{escape(c)}</li>" for c in contains) + "</ul>"
                 + "".join(f'<p class="note">{escape(n)}</p>' for n in notes)),
        _section("config", "Run configuration (config.toml)",
                 _table(["key", "value"], [[k, v] for k, v in config.items()]) if config
                 else '<p class="empty">config.toml not found.</p>'),
        _section("samples", "Samples by site and round", _samples_section(run_dir)),
        _section("training", "Training", _training_section(train, sites)),
        _section("privacy", "Privacy", _privacy_section(train, sites, config, privacy)),
        _section("evaluation", "Evaluation on held-out data", _evaluation_section(evals, sites, evaluator)),
        _section("excluded", "Excluded replies", _excluded_section(train)),
        *([_section("utility", "Utility: train on synthetic, test on real (utility.json)", _nested(utility))]
          if utility is not None else []),
        *([_section("utility-augmented", "Utility, every arm trained with bias-field and noise "
                    "augmentation (utility-augmented.json)", _nested(utility_augmented))]
          if utility_augmented is not None else []),
        *([_section("translation", "Translation against ground truth (translation.json)",
                    _translation_section(translation))] if translation is not None else []),
        _section("evaluator", "Evaluator provenance", _evaluator_section(evaluator)),
    ]
    title = f"medgen report: {run_dir.name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def write_report(run_dir: Path) -> Path:
    """Render run_dir/report.html atomically and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    return atomic_write_text(run_dir / "report.html", render_report(run_dir))
