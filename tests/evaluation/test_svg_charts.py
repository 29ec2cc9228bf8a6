"""Inline SVG charts: points land inside the frame in the right order; text is escaped."""

from __future__ import annotations

import re

from medgen.evaluation.svg_charts import BOTTOM, HEIGHT, LEFT, RIGHT, TOP, WIDTH, Chart, Series, render_chart


def polylines(svg: str) -> list[list[tuple[float, float]]]:
    return [[tuple(map(float, p.split(","))) for p in pts.split()]
            for pts in re.findall(r'<polyline points="([^"]+)"', svg)]


def test_points_are_inside_the_frame_and_monotone_data_maps_to_monotone_pixels():
    chart = Chart("fd <b>", "FD", series=[
        Series("A", [(3, 1.0), (1, 9.0), (2, 4.0), (4, float("nan"))]),
        Series("A floor", [(1, 0.5), (4, 0.5)], dashed=True)])
    svg = render_chart(chart)
    lines = polylines(svg)
    assert len(lines) == 2 and len(lines[0]) == 3  # the NaN point is dropped
    for line in lines:
        for x, y in line:
            assert LEFT <= x <= WIDTH - RIGHT and TOP <= y <= HEIGHT - BOTTOM
    xs, ys = zip(*lines[0])
    assert list(xs) == sorted(xs)              # sorted by round
    assert ys[0] < ys[1] < ys[2]               # 9 > 4 > 1: higher values are higher up (smaller y)
    floor_y = lines[1][0][1]
    assert ys[2] < floor_y                     # 1.0 is above the 0.5 floor
    assert "fd &lt;b&gt;" in svg and "<b>" not in svg
    assert 'stroke-dasharray' in svg


def test_chart_without_finite_data_is_a_note():
    assert "no data" in render_chart(Chart("eps", "epsilon", series=[Series("A", [(1, float("inf"))])]))
    assert "no data" in render_chart(Chart("eps", "epsilon"))


def test_single_point_and_constant_series_render():
    svg = render_chart(Chart("one", "y", series=[Series("A", [(1, 2.0)])]))
    (x, y), = polylines(svg)[0]
    assert LEFT <= x <= WIDTH - RIGHT and TOP <= y <= HEIGHT - BOTTOM
