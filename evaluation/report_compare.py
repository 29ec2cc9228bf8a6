"""Several runs side by side: ``medgen report RUN1 RUN2 ...``.

One table with a column per run (what was trained, privacy, evaluation size, the headline
metrics per site beside their floors with the verdict colour), then one chart per
headline quantity with a line per run (mean over the run's sites; dashed: the mean
floor), epsilon per run, and each run's latest sample grid in a row. Runs are labelled
"1: <dir name>", "2: ...", so two runs with the same folder name stay apart.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from medgen.evaluation.html_parts import empty, file_bytes, fmt, img, page, section, table, verdict_stack
from medgen.evaluation.report_evaluation import site_results
from medgen.evaluation.report_summary import headline_keys, site_epsilon, site_verdict
from medgen.evaluation.run_files import RunFiles, number, read_run, site_metrics
from medgen.evaluation.svg_charts import PALETTE, Chart, Series, render_chart


def _label(index: int, run: RunFiles) -> str:
    return f"{index + 1}: {run.path.name}"


def _mean_series(runs: list[RunFiles], key: str) -> list[Series]:
    out = []
    for i, run in enumerate(runs):
        colour, label = PALETTE[i % len(PALETTE)], _label(i, run)
        for stem, dashed in ((key, False), (f"{key}_floor", True)):
            points = []
            for record in run.evals:
                values = [number(record["metrics"].get(f"{stem}/{s}")) for s in run.sites]
                values = [v for v in values if v is not None]
                if values:
                    points.append((record["round"], sum(values) / len(values)))
            out.append(Series(label + (" floor" if dashed else ""), points, dashed=dashed, colour=colour))
    return out


def _epsilon_series(runs: list[RunFiles]) -> list[Series]:
    return [Series(_label(i, run), [(r["round"], max(v)) for r in run.train
                                    if (v := [x for s in run.sites
                                              if (x := number(site_metrics(r, s).get("epsilon"))) is not None])],
                   colour=PALETTE[i % len(PALETTE)]) for i, run in enumerate(runs)]


def comparison_table(runs: list[RunFiles]) -> str:
    def row(name: str, values: list[Any]) -> list[Any]:
        return [name, *values]

    keys = sorted({k for run in runs for k in headline_keys(run)})
    rows = [row("recipe", [str(r.config.get("recipe", "?")) for r in runs]),
            row("status", [str((r.done or {}).get("status", "no DONE")) if isinstance(r.done, dict) else "no DONE"
                           for r in runs]),
            row("rounds", [r.train[-1]["round"] if r.train else 0 for r in runs]),
            row("sites", [", ".join(r.sites) for r in runs]),
            row("accountant", [str((r.privacy or {}).get("accountant", r.config.get("accountant", "?")))
                               if isinstance(r.privacy, dict) else str(r.config.get("accountant", "?")) for r in runs]),
            row("largest epsilon (site)", [_largest_epsilon(r) for r in runs]),
            row("evaluated images per site", [", ".join(f"{s}: {fmt(number(r.last_eval.get(f'panel_n/{s}')) or 'n/a')}"
                                                         for s in r.sites) for r in runs])]
    rows.append(["verdict per site", *[verdict_stack([_verdict(r, s) for s in r.sites]) for r in runs]])
    for key in keys:
        rows.append([f"{key} vs floor", *[verdict_stack(site_results(r, key)) for r in runs]])
    return table(["", *[_label(i, r) for i, r in enumerate(runs)]], rows)


def _verdict(run: RunFiles, site: str) -> tuple[str, bool | None]:
    text, good = site_verdict(run, site)
    return f"{site}: {text}", good


def _largest_epsilon(run: RunFiles) -> str:
    values = [(e, s) for s in run.sites if (e := site_epsilon(run, s)[0]) is not None]
    if not values:
        return "n/a"
    value, site = max(values)
    return f"{value:.3g} ({site})"


def render_comparison(run_dirs: list[Path]) -> str:
    runs = [read_run(Path(p)) for p in run_dirs]
    keys = sorted({k for run in runs for k in headline_keys(run)})
    charts = "".join(render_chart(Chart(f"{key}: mean over sites (dashed: floor)", key,
                                        series=_mean_series(runs, key))) for key in keys)
    charts += render_chart(Chart("largest epsilon over sites", "epsilon", series=_epsilon_series(runs)))
    grids = []
    for i, run in enumerate(runs):
        data = file_bytes(run.samples[-1]) if run.samples else None
        grids.append(f"<div><h3>{escape(_label(i, run))}</h3>"
                     + (img(data, run.samples[-1].name) if data else empty("no sample grid")) + "</div>")
    body = (section("runs", "Runs side by side", comparison_table(runs))
            + section("curves", "Headline metrics and privacy over rounds", f'<div class="charts">{charts}</div>')
            + section("grids", "Latest sample grids",
                      f'<div class="grid" style="display:grid;grid-template-columns:repeat({len(runs)},1fr);'
                      f'gap:8px">{"".join(grids)}</div>'))
    return page(f"medgen: {len(runs)} runs compared", body)
