"""The zoomed crop under a sample grid: real and generated centres side by side, enlarged.

Reads the PNG that sample_grid.py draws (so the report needs no torch): its layout is
(sites + 1) rows of square cells of side ``cell``, ``GAP`` px apart, after a ``MARGIN`` px
column of site names; the first column of a site row is that site's real scan of the
first label map, the second the generated image of the same map.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

GAP = 2        # px between grid cells (sample_grid.py draws with these)
MARGIN = 40    # px of the site-name column

ZOOM_FRACTION = 0.5   # the central half of each side: the brain's interior at any size
ZOOM_SCALE = 4


def zoom_from_grid(grid_png: bytes, num_sites: int, fraction: float = ZOOM_FRACTION,
                   scale: int = ZOOM_SCALE) -> bytes:
    """For every site row of a sample grid PNG: the real scan's central crop beside the first
    generated image's (the same anatomy), enlarged ``scale`` times; sites left to right.

    The layout is recovered from the grid's size: (num_sites + 1) rows of square cells.
    """
    grid = Image.open(io.BytesIO(grid_png)).convert("RGB")
    cell = grid.height // (num_sites + 1) - GAP
    if cell < 4 or MARGIN + 2 * (cell + GAP) > grid.width:
        raise ValueError(f"a {grid.width}x{grid.height} grid does not hold {num_sites} site rows")
    side = max(2, int(cell * fraction))
    offset = (cell - side) // 2
    tile, label_h, pair_gap = side * scale, 16, 12
    pair_w = 2 * tile + GAP
    canvas = Image.new("RGB", (num_sites * (pair_w + pair_gap), tile + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r in range(num_sites):
        top = (r + 1) * (cell + GAP) + offset
        x0 = r * (pair_w + pair_gap)
        name = grid.crop((0, top - offset + cell // 2 - 1, MARGIN - 2, top - offset + cell // 2 + 11))
        canvas.paste(name, (x0, 2))
        draw.text((x0 + MARGIN, 3), "real | generated", fill=(0, 0, 0), font=font)
        for c in range(2):
            left = MARGIN + c * (cell + GAP) + offset
            crop = grid.crop((left, top, left + side, top + side)).resize((tile, tile), Image.NEAREST)
            canvas.paste(crop, (x0 + c * (tile + GAP), label_h))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
