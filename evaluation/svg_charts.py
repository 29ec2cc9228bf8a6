"""Inline SVG line charts for the HTML report (no plotting library, no JavaScript).

One quantity per chart: the report never puts counts and losses on one axis. The y axis
is logarithmic when every value is positive and they span more than ``LOG_SPAN``
(two decades), unless the chart says otherwise (``Chart.log_y``). A series may carry an
interval band (``Series.band``: x, low, high), drawn as a shaded area: the floor's
bootstrap interval beside a metric, for instance.

Every text that enters the SVG is escaped. Non-finite points are dropped (and, on a log
axis, non-positive ones, with a note). A chart with no data renders a short note
instead of an empty frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 60, 120, 28, 36
LOG_SPAN = 100.0


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    dashed: bool = False
    colour: str | None = None
    band: list[tuple[float, float, float]] = field(default_factory=list)  # (x, low, high)


@dataclass
class Chart:
    title: str
    y_label: str
    x_label: str = "round"
    series: list[Series] = field(default_factory=list)
    log_y: bool | None = None    # None: automatic (positive data spanning > LOG_SPAN)
    markers: bool = True         # dots on solid lines (off for dense curves such as histograms)


def _finite(points) -> list[tuple[float, ...]]:
    return sorted(tuple(float(v) for v in p) for p in points
                  if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p))


def _ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    if high == low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    if integer:  # rounds are whole numbers
        step = max(1.0, round(step))
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.1e}"


def _uses_log(chart: Chart, ys: list[float]) -> bool:
    if chart.log_y is not None:
        return chart.log_y
    positive = [y for y in ys if y > 0]
    return len(positive) == len(ys) and max(ys) / min(ys) > LOG_SPAN


def render_chart(chart: Chart) -> str:
    series = [(s, _finite(s.points), _finite(s.band)) for s in chart.series]
    series = [(s, pts, band) for s, pts, band in series if pts or band]
    if not series:
        return f'<p class="empty">{escape(chart.title)}: no data.</p>'
    ys = [y for _, pts, _ in series for _, y in pts] + [v for _, _, b in series for _, lo, hi in b for v in (lo, hi)]
    log = _uses_log(chart, ys)
    dropped = 0
    if log:
        before = sum(len(p) + len(b) for _, p, b in series)
        series = [(s, [p for p in pts if p[1] > 0], [b for b in band if b[1] > 0 and b[2] > 0])
                  for s, pts, band in series]
        dropped = before - sum(len(p) + len(b) for _, p, b in series)
        ys = [y for y in ys if y > 0] or [1.0]
    xs = [x for _, pts, band in series for x, *_ in pts + band]
    tf = math.log10 if log else (lambda v: v)
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = tf(min(ys)), tf(max(ys))
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (tf(y) - y_lo) / (y_hi - y_lo)) * plot_h

    title = chart.title + (" (log scale)" if log else "")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
           f'<text x="{(LEFT + plot_w / 2):.0f}" y="16" text-anchor="middle" font-size="13" '
           f'font-weight="bold">{escape(title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    y_ticks = ([10.0 ** e for e in range(math.ceil(y_lo), math.floor(y_hi) + 1)] if log
               else _ticks(y_lo, y_hi))
    if log and len(y_ticks) < 2:
        y_ticks = [10.0 ** y_lo, 10.0 ** y_hi]
    for tick in y_ticks:
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" '
                   f'stroke="#eee"/><text x="{LEFT - 4}" y="{py(tick) + 4:.1f}" font-size="10" '
                   f'text-anchor="end">{escape(_fmt(tick))}</text>')
    for tick in _ticks(x_lo, x_hi, integer=all(float(x).is_integer() for x in xs)):
        out.append(f'<text x="{px(tick):.1f}" y="{TOP + plot_h + 14}" font-size="10" '
                   f'text-anchor="middle">{escape(_fmt(tick))}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 4}" font-size="11" '
               f'text-anchor="middle">{escape(chart.x_label)}</text>')
    out.append(f'<text x="12" y="{TOP + plot_h / 2:.0f}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {TOP + plot_h / 2:.0f})">{escape(chart.y_label)}</text>')
    for i, (s, pts, band) in enumerate(series):
        colour = escape(s.colour or PALETTE[i % len(PALETTE)])
        if band:
            edge = [f"{px(x):.1f},{py(hi):.1f}" for x, _, hi in band]
            edge += [f"{px(x):.1f},{py(lo):.1f}" for x, lo, _ in reversed(band)]
            out.append(f'<polygon points="{" ".join(edge)}" fill="{colour}" fill-opacity="0.12" stroke="none"/>')
        dash = ' stroke-dasharray="5,4"' if s.dashed else ""
        if pts:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.8"{dash}/>')
        if pts and chart.markers and not s.dashed:
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts)
        ly = TOP + 12 + 14 * i
        out.append(f'<line x1="{LEFT + plot_w + 8}" x2="{LEFT + plot_w + 26}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{colour}" stroke-width="2"{dash}/><text x="{LEFT + plot_w + 30}" y="{ly}" '
                   f'font-size="10">{escape(s.name[:20])}</text>')
    if dropped:
        out.append(f'<text x="{LEFT + 4}" y="{TOP + plot_h - 4}" font-size="9" fill="#777">'
                   f'{dropped} non-positive value(s) not shown on the log axis</text>')
    out.append("</svg>")
    return "\n".join(out)
