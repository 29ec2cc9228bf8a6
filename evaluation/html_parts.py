"""Small HTML building blocks for the reports: escaped tables, sections, images, style.

Every string that comes from a run is escaped here (``cell`` escapes unless the value is
``Raw``, which only the report's own code constructs). No script, nothing fetched: a
report is one self-contained file that opens offline.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image

STYLE = """body{font-family:system-ui,sans-serif;max-width:1180px;margin:1em auto;padding:0 12px;color:#222}
h1{font-size:1.5em;margin:.3em 0}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:2px;margin-top:1.4em}
h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:2px 7px;font-size:13px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.empty,.note{color:#666}.note{font-size:13px}
.ok{background:#e6f4ea;color:#137333;font-weight:600}.bad{background:#fce8e6;color:#a50e0e;font-weight:600}
.warn{background:#fef7e0;color:#8a5a00}
.summary{display:grid;grid-template-columns:1fr 1fr;gap:6px 24px}.summary>div{min-width:0}
.grid img{image-rendering:pixelated;width:100%;max-width:900px;border:1px solid #ddd}
.zoom img{image-rendering:pixelated;border:1px solid #ddd}
.charts{display:flex;flex-wrap:wrap;gap:8px}
code{font-size:12px}details{margin:.4em 0}pre{font-size:11px;max-height:300px;overflow:auto;background:#f8f8f8}"""


class Raw(str):
    """HTML the report built itself (never text from a run): inserted unescaped."""


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if value.is_integer() and 1 <= abs(value) < 2 ** 53:
            return str(int(value))  # counts and seeds print exactly
        return f"{value:.3g}" if abs(value) < 1e5 else f"{value:.2e}"
    return str(value)


def cell(value: Any, css: str = "") -> str:
    body = value if isinstance(value, Raw) else escape(fmt(value))
    css = css or ("num" if isinstance(value, (int, float)) and not isinstance(value, bool) else "")
    return f'<td class="{css}">{body}</td>' if css else f"<td>{body}</td>"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if isinstance(c, Cell) else cell(c) for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class Cell(str):
    """A ready-made ``<td>`` (e.g. a coloured verdict)."""


def verdict_cell(text: str, good: bool | None) -> Cell:
    css = "ok" if good else ("bad" if good is False else "warn")
    return Cell(f'<td class="{css}">{escape(text)}</td>')


def verdict_stack(items: list[tuple[str, bool | None]]) -> Cell:
    """One cell holding several coloured lines (a run's sites, in the run comparison)."""
    css = {True: "ok", False: "bad", None: "warn"}
    return Cell("<td>" + "".join(f'<div class="{css[good]}">{escape(text)}</div>' for text, good in items)
                + "</td>")


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def empty(text: str) -> str:
    return f'<p class="empty">{escape(text)}</p>'


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(data: bytes, alt: str, zoom: float = 1.0) -> str:
    """An inline PNG; ``zoom`` > 1 sets its display width to that multiple of its own."""
    size = ""
    if zoom != 1.0:
        try:
            width = Image.open(io.BytesIO(data)).width
            size = f' width="{int(width * zoom)}"'
        except OSError:
            pass
    return f'<img src="{png_uri(data)}" alt="{escape(alt)}"{size}>'


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{escape(title)}</h1>\n{body}\n</body></html>\n")


def file_bytes(path: Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None
