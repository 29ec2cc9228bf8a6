"""Report sections about quality: the metric panel and the older metrics
(per-tissue histograms: report_tissue.py).

Headline metrics (those that passed the sanity suite) come first, each in its own chart:
the generated set per site (solid), its floor's interval (shaded) and floor (dashed). The
diagnostic metrics follow in one table with the same floors. The trained-encoder numbers
(FD_medgenenc-v1, KID, site accuracy) stay, below, for comparison with older runs.
"""

from __future__ import annotations

from html import escape
from typing import Any

from medgen.evaluation.html_parts import empty, fmt, note, table, verdict_cell
from medgen.evaluation.quantities import quantity
from medgen.evaluation.report_summary import headline_keys, interval_text, worse_than_floor
from medgen.evaluation.run_files import RunFiles, number
from medgen.evaluation.svg_charts import PALETTE, Chart, Series, render_chart

PANEL_ORDER = ("tissue_bands", "swd", "psd", "tissue_w1", "tissue_texture", "kid_rand",
               "precision", "recall", "density", "coverage")
OLD_FAMILIES = ("fd", "fd_floor", "kid", "kid_lo", "kid_hi", "kid_floor", "site_acc",
                "nonfinite", "n_gen", "n_ref", "seed")


def _title(key: str) -> str:
    try:
        return quantity(key).title
    except KeyError:
        return key


def _series(run: RunFiles, key: str) -> list[Series]:
    out = []
    for i, site in enumerate(run.sites):
        colour = PALETTE[i % len(PALETTE)]
        points = [(r["round"], v) for r in run.evals if (v := number(r["metrics"].get(f"{key}/{site}"))) is not None]
        band = [(r["round"], lo, hi) for r in run.evals
                if (lo := number(r["metrics"].get(f"{key}_floor_lo/{site}"))) is not None
                and (hi := number(r["metrics"].get(f"{key}_floor_hi/{site}"))) is not None]
        floor = [(r["round"], v) for r in run.evals
                 if (v := number(r["metrics"].get(f"{key}_floor/{site}"))) is not None]
        out += [Series(site, points, colour=colour, band=band),
                Series(f"{site} floor", floor, dashed=True, colour=colour)]
    return out


def panel_section(run: RunFiles) -> str:
    if not run.evals:
        return empty("No evaluation rounds recorded (eval-every=0 or no held-out data).")
    metrics = run.last_eval
    present = [k for k in PANEL_ORDER if any(f"{k}/{s}" in metrics for s in run.sites)]
    if not present:
        return note("This run's evaluations predate the metric panel: only the trained-encoder "
                    "metrics below exist, and they are not headline metrics.")
    headline = [k for k in headline_keys(run) if k in present]
    units = run.panel.get("tissue_units", {})
    body = ("<p>Every metric compares the generated images of a site (conditioned on label maps of "
            "half of its held-out patients) with real images of the other half; the floor is the same "
            "metric between the two real halves. A generated set whose value is outside the shaded "
            "floor interval is measurably worse than real.</p>")
    charts = []
    for key in headline + [k for k in ("swd", "psd", "coverage") if k in present and k not in headline]:
        tag = "headline" if key in headline else "diagnostic"
        charts.append(render_chart(Chart(f"{key} ({tag}) per site", key, series=_series(run, key))))
    body += f'<div class="charts">{"".join(charts)}</div>'
    rows = []
    for key in present:
        row: list[Any] = [key, "headline" if key in headline else "diagnostic"]
        for site in run.sites:
            worse = worse_than_floor(metrics, key, site)
            text = f"{interval_text(metrics, key, site)} | floor {interval_text(metrics, key, site, floor=True)}"
            row.append(verdict_cell(text, None if worse is None else not worse))
        rows.append(row + [_title(key) + (f" ({', '.join(f'{s}: {u}' for s, u in units.items())})"
                                          if key == "tissue_w1" and units else "")])
    body += (f"<h3>Round {run.evals[-1]['round']}: generated [interval] | floor [interval], per site</h3>"
             + table(["metric", "role", *run.sites, "what it measures"], rows))
    body += note("Green: inside or better than the floor's interval; red: worse. Diagnostic metrics are "
                 "shown because each sees some failures well, but the sanity suite found at least one "
                 "degradation of real images each one misses (docs/evaluation.md).")
    return body


def old_metrics_section(run: RunFiles) -> str:
    metrics = run.last_eval
    if not any(k.startswith("fd/") for k in metrics):
        return empty("No trained-encoder metrics recorded.")
    name = (run.evaluator or {}).get("extractor_name", "FD_medgenenc-v1") if isinstance(run.evaluator, dict) \
        else "FD_medgenenc-v1"

    def series(family: str) -> list[Series]:
        return [s for s in _series(run, family) if not s.dashed] + [
            Series(f"{site} floor", [(r["round"], v) for r in run.evals
                                     if (v := number(r["metrics"].get(f"{family}_floor/{site}"))) is not None],
                   dashed=True, colour=PALETTE[i % len(PALETTE)]) for i, site in enumerate(run.sites)]

    body = note(f"{name}: Frechet distance on the project's own encoder, trained on heldout/fit to tell "
                "sites and anatomy apart. Kept for comparison with earlier runs; NOT a headline metric: in "
                "the sanity suite it stayed at the floor for real images with added noise or with every "
                "tissue flattened to its mean (it learned to ignore texture).")
    body += '<div class="charts">' + render_chart(Chart(f"{name} per site (dashed: floor)", "FD", series=series("fd")))
    body += render_chart(Chart("KID (trained encoder) per site", "KID", series=series("kid")))
    body += render_chart(Chart("site-classifier accuracy on generated images", "accuracy",
                               series=[s for s in _series(run, "site_acc") if not s.dashed])) + "</div>"
    rows = [[site, *[metrics.get(f"{f}/{site}", "") for f in OLD_FAMILIES]] for site in run.sites]
    return body + table(["site", *OLD_FAMILIES], rows)


def evaluator_section(run: RunFiles) -> str:
    info = run.evaluator if isinstance(run.evaluator, dict) else None
    if info is None:
        return empty("evaluator.json not found (weights hashes unknown).")
    panel = run.panel
    rows = [[k, info.get(k, "")] for k in ("extractor_name", "extractor_sha256", "classifier_sha256",
                                           "evaluator_seed", "medgen_version", "kid_bootstrap", "conditioning")]
    rows += [[f"panel {k}", fmt(panel[k]) if not isinstance(panel[k], (dict, list)) else str(panel[k])]
             for k in ("headline", "random_features", "random_features_sha256", "floor_bootstrap",
                       "eval_bootstrap", "panel_samples", "tissue_units", "classes") if k in panel]
    body = table(["field", "value"], rows)
    acc = info.get("classifier_real_acc", {})
    if isinstance(acc, dict) and acc:
        body += "<h3>Site classifier accuracy on real heldout/test images (its own quality)</h3>"
        body += table(["site", "accuracy"], [[s, v] for s, v in acc.items()])
    return body


def site_results(run: RunFiles, key: str) -> list[tuple[str, bool | None]]:
    """Per site: "<site>: value [interval] (floor <= high)" and whether it is at floor."""
    metrics = run.last_eval
    out = []
    for site in run.sites:
        worse = worse_than_floor(metrics, key, site)
        high = number(metrics.get(f"{key}_floor_hi/{site}"))
        out.append((f"{site}: {interval_text(metrics, key, site)} (floor <= {fmt(high) if high is not None else 'n/a'})",
                    None if worse is None else not worse))
    return out
