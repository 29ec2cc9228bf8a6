"""The one-screen summary at the top of a report: what ran, what it cost, how good it is.

Three blocks, readable without scrolling:

- what was trained: recipe, sites, rounds, image size, status;
- privacy spent per site, with the accountant, unit and sampling named;
- the headline metrics of the last evaluation per site, each beside its real-vs-real floor
  and interval, and a plain verdict per site.

Verdicts (``site_verdict``): "worse than real" when any headline metric is outside its
floor's interval on the worse side; "at floor" when none is AND the site had at least
``REQUIRED_SAMPLES`` images (fewer cannot even tell a mildly blurred copy from real, so
"at floor" then reads "inconclusive"); "not evaluated" otherwise.
"""

from __future__ import annotations

from html import escape
from typing import Any

from medgen.config import RunConfig
from medgen.evaluation.html_parts import Raw, fmt, table, verdict_cell
from medgen.evaluation.quantities import HEADLINE, REQUIRED_SAMPLES, quantity
from medgen.evaluation.run_files import RunFiles, number, site_metrics


def headline_keys(run: RunFiles) -> list[str]:
    """The headline quantities the run's evaluator recorded (else today's list)."""
    keys = run.panel.get("headline")
    return [str(k) for k in keys] if isinstance(keys, list) and keys else list(HEADLINE)


def interval_text(metrics: dict[str, Any], key: str, site: str, floor: bool = False) -> str:
    stem = f"{key}_floor" if floor else key
    value, low, high = (number(metrics.get(f"{stem}{suffix}/{site}")) for suffix in ("", "_lo", "_hi"))
    if value is None:
        return "n/a"
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]" if low is not None and high is not None else fmt(value)


def worse_than_floor(metrics: dict[str, Any], key: str, site: str) -> bool | None:
    value = number(metrics.get(f"{key}/{site}"))
    low, high = number(metrics.get(f"{key}_floor_lo/{site}")), number(metrics.get(f"{key}_floor_hi/{site}"))
    if value is None or low is None or high is None:
        return None
    try:
        higher_is_worse = quantity(key).higher_is_worse
    except KeyError:
        higher_is_worse = True
    return value > high if higher_is_worse else value < low


def site_verdict(run: RunFiles, site: str) -> tuple[str, bool | None]:
    metrics = run.last_eval
    if not metrics:
        return "not evaluated", None
    checks = {key: worse_than_floor(metrics, key, site) for key in headline_keys(run)}
    if all(v is None for v in checks.values()):
        return ("no headline metric recorded (a run from before the metric panel; "
                "FD_medgenenc-v1 is not a headline metric)"), None
    worse = [k for k, v in checks.items() if v]
    n = number(metrics.get(f"panel_n/{site}")) or 0
    if worse:
        return f"worse than real held-out scans on {', '.join(worse)} (N={fmt(n)})", False
    if n < REQUIRED_SAMPLES:
        return (f"inconclusive: at floor, but N={fmt(n)} images is below the {REQUIRED_SAMPLES} "
                "needed to tell even a mildly blurred copy from real"), None
    return f"indistinguishable from real held-out scans on every headline metric (N={fmt(n)})", True


def site_epsilon(run: RunFiles, site: str) -> tuple[float | None, float | None, int]:
    """(epsilon, delta, rounds trained) as the site reported it (privacy.json, else metrics)."""
    reported = (run.privacy or {}).get("reported_by_sites", {}) if isinstance(run.privacy, dict) else {}
    entry = reported.get(site) if isinstance(reported, dict) else None
    rounds = sum(1 for r in run.train if site in r.get("per_site", {}))
    if isinstance(entry, dict) and number(entry.get("epsilon")) is not None:
        return number(entry.get("epsilon")), number(entry.get("delta")), int(entry.get("rounds", rounds) or 0)
    values = [number(site_metrics(r, site).get("epsilon")) for r in run.train]
    deltas = [number(site_metrics(r, site).get("delta")) for r in run.train]
    values = [v for v in values if v is not None]
    return (max(values) if values else None), next((d for d in deltas if d is not None), None), rounds


def accountant_line(run: RunFiles) -> str:
    privacy = run.privacy if isinstance(run.privacy, dict) else {}
    accountant = privacy.get("accountant", run.config.get("accountant", "unknown"))
    unit = privacy.get("unit", "patient")
    target = privacy.get("target_epsilon", run.config.get("target-epsilon", "unknown"))
    return (f"Opacus {str(accountant).upper()} accountant; record-level DP per site, unit: {unit}; "
            f"Poisson sampling; composed over every round a site trained; target epsilon {fmt(target)}")


def _trained(run: RunFiles) -> str:
    c, done = run.config, run.done if isinstance(run.done, dict) else {}
    final = done.get("final_round", run.train[-1]["round"] if run.train else 0)
    status = done.get("status", "no DONE marker (running, or stopped early)")
    parts = [f"recipe <b>{escape(str(c.get('recipe', 'unknown')))}</b>",
             f"{len(run.sites)} site(s): {escape(', '.join(run.sites) or 'unknown')}",
             f"round {escape(fmt(final))} of {escape(fmt(c.get('num-rounds', '?')))} "
             f"({escape(fmt(c.get('local-steps', '?')))} local steps, batch {escape(fmt(c.get('batch-size', '?')))})",
             f"{escape(fmt(c.get('image-size', '?')))} px images, classes: "
             f"{escape(str(c.get('label-names', RunConfig.label_names)))}",
             f"status: <b>{escape(str(status))}</b>"]
    return "<ul>" + "".join(f"<li>{p}</li>" for p in parts) + "</ul>"


def summary_block(run: RunFiles) -> str:
    sites = run.sites
    privacy_rows = []
    for site in sites:
        epsilon, delta, rounds = site_epsilon(run, site)
        privacy_rows.append([site, f"{epsilon:.4g}" if epsilon is not None else "n/a",
                             delta if delta is not None else "n/a", rounds])
    keys = headline_keys(run)
    metrics = run.last_eval
    metric_rows = []
    for site in sites:
        text, good = site_verdict(run, site)
        row: list[Any] = [site, number(metrics.get(f"panel_n/{site}")) or "n/a"]
        for key in keys:
            row += [interval_text(metrics, key, site), interval_text(metrics, key, site, floor=True)]
        metric_rows.append(row + [verdict_cell(text, good)])
    headers = ["site", "N"] + [h for key in keys for h in (f"{key} (generated)", f"{key} floor")] + ["verdict"]
    round_text = f"evaluation of round {run.evals[-1]['round']}" if run.evals else "no evaluation yet"
    return (f'<div class="summary"><div><h3>What was trained</h3>{_trained(run)}</div>'
            f'<div><h3>Privacy spent per site</h3>'
            + table(["site", "epsilon", "delta", "rounds trained"], privacy_rows)
            + f'<p class="note">{escape(accountant_line(run))}.</p></div></div>'
            + f"<h3>Headline metrics vs the real-vs-real floor ({escape(round_text)})</h3>"
            + table(headers, metric_rows)
            + Raw('<p class="note">Each number: value [95 % bootstrap interval]. The floor is the same '
                  "metric between two halves of real held-out patients at the same N: what a perfect "
                  "generator scores. Headline metrics are the ones that saw every degradation of real "
                  "images in the sanity suite (docs/evaluation.md); lower is better for all of them.</p>"))
