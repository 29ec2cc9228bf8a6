"""Report sections about the run itself: sample grids, training curves, privacy, exclusions.

Charts show one quantity each (svg_charts.py picks a log axis where values span
decades); a per-site quantity that never changes is a table cell, not a flat line.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from medgen.evaluation.grid_zoom import zoom_from_grid
from medgen.evaluation.html_parts import Raw, empty, file_bytes, fmt, img, note, table
from medgen.evaluation.run_files import RunFiles, number, site_metrics
from medgen.evaluation.svg_charts import PALETTE, Chart, Series, render_chart

MAX_GRIDS = 3            # the last grids in full; earlier rounds are in samples/
NOT_CHARTED = {"epsilon", "delta", "site-index"}   # privacy has its own section; ids are not data
MAX_TRAINING_CHARTS = 8


def per_site_series(run: RunFiles, key: str) -> list[Series]:
    return [Series(site, [(r["round"], v) for r in run.train
                          if (v := number(site_metrics(r, site).get(key))) is not None],
                   colour=PALETTE[i % len(PALETTE)]) for i, site in enumerate(run.sites)]


def samples_section(run: RunFiles) -> str:
    if not run.samples:
        return empty("No sample grids found (samples/round_XXX.png).")
    body = ('<p>Top row: the conditioning label maps (held-out test anatomy). Each site row: that '
            "site's REAL held-out scan of the first map's anatomy, then generated images of every map. "
            "Below each grid: the centre of the real scan beside the centre of the generated image of "
            "the same anatomy, per site, enlarged 4x: where blur, noise and texture show.</p>")
    body += _display_caption(run)
    for i, grid in enumerate(run.samples[-MAX_GRIDS:][::-1]):
        block = _grid_block(grid, len(run.sites))
        body += block if i == 0 else f"<details><summary>{escape(grid.stem.replace('_', ' '))}</summary>{block}</details>"
    if len(run.samples) > MAX_GRIDS:
        body += note(f"{len(run.samples) - MAX_GRIDS} earlier grid(s) are in {run.path / 'samples'}.")
    return body


def _display_caption(run: RunFiles) -> str:
    """How grey levels map to intensity, per site, when any site has a fixed display window
    (CT in HU); nothing for runs whose sites all show their normalised range (MR)."""
    display = (run.evaluator or {}).get("display") if isinstance(run.evaluator, dict) else None
    if not isinstance(display, dict) or not any(isinstance(d, dict) and d.get("window")
                                                for d in display.values()):
        return ""
    groups: dict[str, list[str]] = {}
    for site in run.sites:
        entry = display.get(site)
        if isinstance(entry, dict) and entry.get("caption"):
            groups.setdefault(str(entry["caption"]), []).append(site)
    lines = "".join(f"<li>{escape(', '.join(sites))}: {escape(caption)}</li>"
                    for caption, sites in groups.items())
    return ("<p>Grey levels: real and generated images of a site share one mapping, from the "
            f"dataset manifest; generated images are inverse-mapped to physical units first.</p><ul>{lines}</ul>")


def _grid_block(grid, num_sites: int) -> str:
    data = file_bytes(grid)
    if data is None:
        return empty(f"{grid.name} could not be read.")
    body = f'<h3>{escape(grid.stem.replace("_", " "))}</h3><div class="grid">{img(data, grid.name)}</div>'
    try:
        return body + f'<div class="zoom">{img(zoom_from_grid(data, num_sites), "zoomed centre crops")}</div>'
    except (ValueError, OSError) as err:
        return body + note(f"no zoomed crop: {err}")


def _varies(run: RunFiles, key: str) -> bool:
    values = {number(site_metrics(r, s).get(key)) for r in run.train for s in run.sites}
    values.discard(None)
    return len(values) > 1


def training_section(run: RunFiles) -> str:
    if not run.train:
        return empty("No training rounds recorded.")
    keys = sorted({k for r in run.train for m in r.get("per_site", {}).values() if isinstance(m, dict)
                   for k, v in m.items() if number(v) is not None and k not in NOT_CHARTED})
    charted = sorted((k for k in keys if _varies(run, k)), key=lambda k: ("loss" not in k, k))
    charts = [render_chart(Chart(f"{key} per site", key, series=per_site_series(run, key)))
              for key in charted[:MAX_TRAINING_CHARTS]]
    last = run.train[-1]
    rows = [[site, *[site_metrics(last, site).get(k, "") for k in keys]] for site in run.sites]
    aggregate = [[k, v] for k, v in sorted(last.get("aggregate", {}).items()) if number(v) is not None]
    body = f'<div class="charts">{"".join(charts)}</div>'
    if len(charted) > MAX_TRAINING_CHARTS:
        body += note(f"Not charted: {', '.join(charted[MAX_TRAINING_CHARTS:])} (see the table).")
    body += f"<h3>Per-site values, round {last['round']}</h3>" + table(["site", *keys], rows)
    if aggregate:
        body += f"<h3>Aggregate, round {last['round']}</h3>" + table(["quantity", "value"], aggregate)
    return body


def _ledger(run: RunFiles, site: str) -> dict[str, Any]:
    privacy = run.privacy if isinstance(run.privacy, dict) else {}
    node = (privacy.get("node_ledgers") or {}).get(site) or {}
    reported = (privacy.get("reported_by_sites") or {}).get(site) or {}
    plan = node.get("plan") if isinstance(node.get("plan"), dict) else {}
    return {**plan, **node, **reported}


def privacy_section(run: RunFiles, accountant_line: str) -> str:
    body = f"<p>{escape(accountant_line)}.</p>"
    columns = [("epsilon", "epsilon spent"), ("delta", "delta"), ("accountant", "accountant"),
               ("unit", "unit"), ("noise_multiplier", "noise multiplier"),
               ("max_grad_norm", "clip norm"), ("sample_rate", "sampling rate q"),
               ("steps", "steps taken"), ("total_steps", "steps planned"),
               ("rounds", "rounds reported"), ("excluded_rounds", "rounds excluded"),
               ("spent_while_excluded", "spent while excluded")]
    rows = []
    for site in run.sites:
        entry = _ledger(run, site)
        if not entry:
            entry = {"epsilon": next((v for r in reversed(run.train)
                                      if (v := number(site_metrics(r, site).get("epsilon"))) is not None), None)}
        if isinstance(entry.get("epsilon"), float):
            entry["epsilon"] = f"{entry['epsilon']:.4g}"   # 9.996, not 10: the budget is the point
        rows.append([site, *[entry.get(key, "-") if entry.get(key) is not None else "-" for key, _ in columns]])
    body += "<h3>Privacy ledger per site</h3>" + table(["site", *[title for _, title in columns]], rows)
    body += note("epsilon spent: the largest a site reported for this run (privacy.json, from the sites' "
                 "own ledgers); noise multiplier, clip norm, sampling rate and the planned steps are the "
                 "site's DP plan, calibrated once for the whole schedule. A '-' is a value this run "
                 "did not record (the node ledgers are only readable in simulation).")
    body += render_chart(Chart("epsilon spent per site", "epsilon", series=per_site_series(run, "epsilon")))
    if run.privacy is not None:
        body += ("<details><summary>privacy.json as written</summary><pre>"
                 + escape(json.dumps(run.privacy, indent=1, sort_keys=True)[:20000]) + "</pre></details>")
    else:
        body += empty("privacy.json not found.")
    return Raw(body)


def excluded_section(run: RunFiles) -> str:
    rows = [[r["round"], e.get("site", "?"), e.get("reason", "?")] for r in run.train
            for e in r.get("excluded", []) if isinstance(e, dict)]
    return table(["round", "site", "reason"], rows) if rows else note("No reply was excluded.")


def config_section(run: RunFiles) -> str:
    if not run.config:
        return empty("config.toml not found.")
    return ("<details><summary>every setting (config.toml)</summary>"
            + table(["key", "value"], [[k, fmt(v)] for k, v in run.config.items()]) + "</details>")
