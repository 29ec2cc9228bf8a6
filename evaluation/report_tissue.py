"""Report section: per-tissue intensity distributions, generated vs real, at every site.

Reads samples/round_XXX.tissue.json (one entry per site: its units, bin centres, and per
class the real and generated densities; tissue_intensity.pooled_histograms). Sites are
grouped by unit, so a CT site's HU and the MR site's normalised values never share an
axis. On a physical scale (CT in HU) each chart is cropped to where the pixels are (the
training window spans 3000 HU; grey and white matter differ by 15) and a table gives the
mean of every tissue, generated beside real, per site; in normalised units (MR) the
charts show the whole range, as they always have.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medgen.evaluation.html_parts import empty, fmt, note, table
from medgen.evaluation.run_files import RunFiles
from medgen.evaluation.svg_charts import PALETTE, Chart, Series, render_chart
from medgen.evaluation.quantities import NORMALISED  # torch-free: the report loads no network code

CROP_MASS = 0.005        # drop this fraction of the pooled pixels at each end of a cropped axis
CROP_MARGIN_BINS = 2


def _density(entry: dict[str, Any], kind: str, name: str) -> np.ndarray:
    values = entry.get(kind, {}).get(name, [])
    return np.asarray(values if isinstance(values, list) else [], np.float64)


def tissue_means(entry: dict[str, Any], kind: str) -> dict[str, float]:
    """Mean intensity per class from the histogram (within half a bin of the pixel mean)."""
    centres = np.asarray(entry.get("centres", []), np.float64)
    out = {}
    for name in entry.get(kind, {}):
        density = _density(entry, kind, name)
        if len(density) == len(centres) and density.sum() > 0:
            out[name] = float(density @ centres / density.sum())
    return out


def _crop(entries: list[dict[str, Any]], name: str) -> slice:
    """The bins holding all but CROP_MASS of the pooled (real and generated) pixels at each end."""
    stacks = [d for e in entries for k in ("real", "generated") if len(d := _density(e, k, name))]
    lengths = {len(d) for d in stacks}
    if not stacks or len(lengths) != 1:
        return slice(None)
    pooled = np.sum(stacks, axis=0)
    if pooled.sum() <= 0:
        return slice(None)
    cdf = np.cumsum(pooled) / pooled.sum()
    first = int(np.searchsorted(cdf, CROP_MASS))
    last = int(np.searchsorted(cdf, 1 - CROP_MASS))
    return slice(max(0, first - CROP_MARGIN_BINS), min(len(pooled), last + CROP_MARGIN_BINS + 1))


def _schema_order(run: RunFiles, classes: list[str]) -> list[str]:
    """The run's label schema order (the JSON file's keys are sorted), when it names them all."""
    schema = [c.strip() for c in str(run.config.get("label-names", "")).split(",") if c.strip()]
    return schema if sorted(schema) == sorted(classes) else classes


def _unit_groups(run: RunFiles, sites: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for site in sites:
        groups.setdefault(str(run.tissue[site].get("units", NORMALISED)), []).append(site)
    return groups


def _charts(run: RunFiles, classes: list[str], units: str, sites: list[str], several: bool) -> list[str]:
    charts = []
    for name in classes:
        entries = [run.tissue[s] for s in sites]
        window = _crop(entries, name) if units != NORMALISED else slice(None)
        series = []
        for site in sites:
            entry, colour = run.tissue[site], PALETTE[run.sites.index(site) % len(PALETTE)]
            centres = entry.get("centres", [])[window]
            for kind, dashed in (("generated", False), ("real", True)):
                values = entry.get(kind, {}).get(name, [])[window]
                series.append(Series(f"{site} {kind}", list(zip(centres, values)), dashed=dashed, colour=colour))
        title = f"{name}: intensity distribution" + (f" ({units})" if several else "")
        charts.append(render_chart(Chart(title, "fraction of pixels", x_label=f"intensity ({units})",
                                         series=series, log_y=False, markers=False)))
    return charts


def _means_table(run: RunFiles, classes: list[str], units: str, sites: list[str]) -> str:
    rows = []
    for site in sites:
        generated, real = tissue_means(run.tissue[site], "generated"), tissue_means(run.tissue[site], "real")
        rows.append([site, *[f"{fmt(generated[c]) if c in generated else '-'} / "
                             f"{fmt(real[c]) if c in real else '-'}" for c in classes]])
    centres = run.tissue[sites[0]].get("centres", [])
    width = abs(centres[1] - centres[0]) if len(centres) > 1 else float("nan")
    return (f"<h3>Mean intensity per tissue, generated / real ({units})</h3>"
            + table(["site", *classes], rows)
            + note(f"Means from the histograms (bins {fmt(width)} {units} wide, so within "
                   f"{fmt(width / 2)} {units} of the pixel means); generated images are clipped to "
                   "the training window, as the real ones are."))


def tissue_section(run: RunFiles) -> str:
    if not run.tissue:
        return empty("No per-tissue histograms in this run (samples/round_XXX.tissue.json).")
    sites = [s for s in run.sites if isinstance(run.tissue.get(s), dict)]
    if not sites:
        return empty("The per-tissue histogram file holds no site of this run.")
    classes = _schema_order(run, list(run.tissue[sites[0]].get("real", {})))
    groups = _unit_groups(run, sites)
    body = (f"<p>Round {run.tissue_round}: pixels of each label class, generated (solid) vs real "
            "held-out reference (dashed), per site.</p>")
    for units, members in groups.items():
        if len(groups) > 1:
            body += f"<h3>Sites in {units}: {', '.join(members)}</h3>"
        body += f'<div class="charts">{"".join(_charts(run, classes, units, members, len(groups) > 1))}</div>'
        if units != NORMALISED:
            body += _means_table(run, classes, units, members)
    return body
