"""Inline SVG line charts for the HTML report (no plotting library, no JavaScript).

Every text that enters the SVG is escaped. Non-finite points are dropped. A chart with
no data renders a short note instead of an empty frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 60, 110, 28, 36


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    dashed: bool = False
    colour: str | None = None


@dataclass
class Chart:
    title: str
    y_label: str
    x_label: str = "round"
    series: list[Series] = field(default_factory=list)


def _finite(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return sorted((float(x), float(y)) for x, y in points
                  if isinstance(x, (int, float)) and isinstance(y, (int, float))
                  and math.isfinite(x) and math.isfinite(y))


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
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def render_chart(chart: Chart) -> str:
    series = [(s, _finite(s.points)) for s in chart.series]
    series = [(s, pts) for s, pts in series if pts]
    if not series:
        return f'<p class="empty">{escape(chart.title)}: no data.</p>'
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(chart.title)}">',
           f'<text x="{WIDTH / 2:.0f}" y="16" text-anchor="middle" font-size="13" '
           f'font-weight="bold">{escape(chart.title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for tick in _ticks(y_lo, y_hi):
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
    for i, (s, pts) in enumerate(series):
        colour = escape(s.colour or PALETTE[i % len(PALETTE)])
        dash = ' stroke-dasharray="5,4"' if s.dashed else ""
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.8"{dash}/>')
        if not s.dashed:
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts)
        ly = TOP + 12 + 14 * i
        out.append(f'<line x1="{LEFT + plot_w + 8}" x2="{LEFT + plot_w + 26}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{colour}" stroke-width="2"{dash}/><text x="{LEFT + plot_w + 30}" y="{ly}" '
                   f'font-size="10">{escape(s.name[:18])}</text>')
    out.append("</svg>")
    return "\n".join(out)
