"""A self-contained HTML report of one run directory, for people.

Order: a one-screen summary (what was trained, privacy per site, headline metrics with
floors and a verdict per site; report_summary.py), then the sample grids with zoomed
crops, the metric panel with floors, the per-tissue intensity histograms, training
curves, the privacy ledger, exclusions, the older trained-encoder metrics, optional
utility and translation results, and provenance. Reads what the server writes
(run_files.py); a missing or unreadable piece becomes a note in its section, never a
crash. Images are base64 data URIs, charts inline SVG; no script, nothing fetched, and
every string from the run is escaped.
"""

from __future__ import annotations

import time
from html import escape
from pathlib import Path

from medgen.atomic import atomic_write_text
from medgen.evaluation.html_parts import empty, note, page, section
from medgen.evaluation.report_federated import federated_eval_section
from medgen.evaluation.report_evaluation import (evaluator_section, old_metrics_section,
                                                 panel_section)
from medgen.evaluation.report_sections import (config_section, excluded_section, privacy_section,
                                               samples_section, training_section)
from medgen.evaluation.report_summary import accountant_line, summary_block
from medgen.evaluation.report_tissue import tissue_section
from medgen.evaluation.run_files import RunFiles, read_run


def _nested(obj) -> str:
    """A JSON value of unknown shape as nested tables (utility results)."""
    if isinstance(obj, dict):
        if not obj:
            return '<span class="empty">(empty)</span>'
        return "<table>" + "".join(f"<tr><th>{escape(str(k))}</th><td>{_nested(v)}</td></tr>"
                                   for k, v in obj.items()) + "</table>"
    if isinstance(obj, list):
        return "<br>".join(_nested(v) for v in obj) or '<span class="empty">(none)</span>'
    return escape(str(round(obj, 4) if isinstance(obj, float) else obj))


def _translation_section(results) -> str:
    # torch and MONAI load only for a report that has a translation section (LAZY_IMPORTS)
    from medgen.evaluation.translation import render_section
    try:
        return render_section(results)
    except Exception as err:  # noqa: BLE001 - a malformed results file must not cost the report
        return empty(f"translation.json could not be rendered: {err}")


def _contents(run: RunFiles) -> str:
    audited = isinstance(run.privacy, dict) and "membership_inference" in run.privacy
    items = ["privacy per site, accountant named; " + ("membership-inference audit" if audited
                                                       else "no empirical audit"),
             "training curves", "excluded replies"]
    if run.evals:
        items += ["metric panel with real-vs-real floors and bootstrap intervals",
                  "trained-encoder FD/KID and site-classifier accuracy (not headline)"]
    if run.tissue:
        items.append("per-tissue intensity histograms")
    items += [f"{name} ({name}.json)" for name in run.extras]
    return ("<p>This report contains: " + "; ".join(escape(i) for i in items) + f". Run directory "
            f"<code>{escape(str(run.path))}</code>; written "
            f"{escape(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))}; {len(run.train)} training "
            f"round(s), {len(run.evals)} evaluation round(s).</p>"
            + "".join(note(n) for n in run.notes))


def render_report(run_dir: Path) -> str:
    run = read_run(Path(run_dir))
    extras = []
    for name, title in (("utility", "Utility: train on synthetic, test on real (utility.json)"),
                        ("utility-augmented", "Utility, every arm trained with bias-field and noise "
                                              "augmentation (utility-augmented.json)")):
        if name in run.extras:
            extras.append(section(name, title, _nested(run.extras[name])))
    if "federated_eval" in run.extras:
        extras.append(section("federated-eval", "Federated evaluation at the sites (federated_eval.json)",
                              federated_eval_section(run.extras["federated_eval"])))
    if "translation" in run.extras:
        extras.append(section("translation", "Translation against ground truth (translation.json)",
                              _translation_section(run.extras["translation"])))
    sections = [
        section("summary", "Summary", summary_block(run) + _contents(run)),
        section("samples", "Real vs generated", samples_section(run)),
        section("evaluation", "Quality against real held-out scans", panel_section(run)),
        section("tissue", "Per-tissue intensity histograms", tissue_section(run)),
        section("training", "Training", training_section(run)),
        section("privacy", "Privacy", privacy_section(run, accountant_line(run))),
        section("excluded", "Excluded replies", excluded_section(run)),
        section("trained-encoder", "Trained-encoder metrics (not headline)", old_metrics_section(run)),
        *extras,
        section("evaluator", "Evaluator provenance", evaluator_section(run)),
        section("config", "Run configuration", config_section(run)),
    ]
    return page(f"medgen report: {run.path.name}", "\n".join(sections))


def write_report(run_dir: Path) -> Path:
    """Render run_dir/report.html atomically and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    return atomic_write_text(run_dir / "report.html", render_report(run_dir))
