"""A PNG grid of generated samples: the same anatomy rendered in every site's style.

Layout (cells of the image size, enlarged to at least 64 px with nearest neighbour):

    (legend)      label map 1   label map 2   ...
    site A real   G(map 1, A)   G(map 2, A)   ...
    site B real   G(map 1, B)   G(map 2, B)   ...

The first column of a site row is that site's real held-out scan of the anatomy of
label map 1, so its style can be compared with the generated row at a glance.

Grey levels (``GrayDisplay``): a site with a fixed physical scale (CT in HU) is shown
through one fixed display window from its manifest, the same for every CT site and for
real and generated images, so a grey level means one HU everywhere on the grid; a site
without one (per-volume normalised MR) shows the whole normalised range [-1, 1].
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from medgen.atomic import atomic_write_bytes
from medgen.evaluation.grid_zoom import GAP, MARGIN
from medgen.evaluation.tissue_intensity import TissueUnits

# one colour per label value (class 0, the background, black); a schema with more classes
# than colours reuses the last ones (the legend row is for orientation, not measurement)
LABEL_COLOURS = np.array([[0, 0, 0], [60, 120, 230], [150, 150, 150], [245, 245, 235],
                          [220, 90, 60], [250, 200, 80], [90, 190, 110], [170, 90, 200],
                          [80, 200, 210], [200, 120, 160]], dtype=np.uint8)
MIN_CELL = 64


@dataclass(frozen=True)
class GrayDisplay:
    """How a normalised image [-1, 1] becomes grey levels: through ``window`` (physical
    units, via ``units``' inverse map) or, without one, over the whole normalised range."""

    units: TissueUnits = TissueUnits()
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"display window {self.window} must be [lo, hi] with lo < hi")

    def gray(self, image: torch.Tensor) -> np.ndarray:
        """[H, W] normalised -> uint8 RGB."""
        if self.window is None:
            values = ((image.clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
        else:
            low, high = self.window
            physical = self.units.to_physical(image.clamp(-1, 1).numpy().astype(np.float64))
            values = (np.clip((physical - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)
        return np.repeat(values[..., None], 3, axis=-1)

    def caption(self) -> str:
        if self.window is None:
            return "whole normalised range [-1, 1] (per-volume normalised; no physical unit)"
        low, high = self.window
        unit = self.units.name
        return (f"fixed window [{low:g}, {high:g}] {unit} (level {(low + high) / 2:g}, "
                f"width {high - low:g} {unit}): black at or below {low:g}, white at or above {high:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"window": list(self.window) if self.window else None, "units": self.units.name,
                "caption": self.caption()}


FULL_RANGE = GrayDisplay()


def _labels(label_map: torch.Tensor) -> np.ndarray:
    return LABEL_COLOURS[label_map.clamp(0, len(LABEL_COLOURS) - 1).numpy()]


def render_grid(label_maps: torch.Tensor, rows: list[tuple[str, torch.Tensor, torch.Tensor]],
                path: Path, displays: Mapping[str, GrayDisplay] | None = None) -> None:
    """label_maps [C,H,W]; rows: (site name, real image [H,W], generated [C,H,W]); atomic PNG.
    ``displays``: the grey mapping per site (default: the whole normalised range)."""
    displays = displays or {}
    cols, height, width = label_maps.shape
    scale = max(1, -(-MIN_CELL // max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    canvas = Image.new("RGB", (MARGIN + (cols + 1) * (cell_w + GAP), (len(rows) + 1) * (cell_h + GAP)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def paste(rgb: np.ndarray, row: int, col: int) -> None:
        tile = Image.fromarray(rgb).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(tile, (MARGIN + col * (cell_w + GAP), row * (cell_h + GAP)))

    draw.text((2, cell_h // 2), "maps", fill=(0, 0, 0), font=font)
    draw.text((MARGIN + 2, 2), "real", fill=(0, 0, 0), font=font)
    for c in range(cols):
        paste(_labels(label_maps[c]), 0, c + 1)
    for r, (site, real, generated) in enumerate(rows, start=1):
        if generated.shape != label_maps.shape:
            raise ValueError(f"site {site}: generated {tuple(generated.shape)} vs maps {tuple(label_maps.shape)}")
        draw.text((2, r * (cell_h + GAP) + cell_h // 2), str(site)[:6], fill=(0, 0, 0), font=font)
        display = displays.get(site, FULL_RANGE)
        paste(display.gray(real), r, 0)
        for c in range(cols):
            paste(display.gray(generated[c]), r, c + 1)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())

