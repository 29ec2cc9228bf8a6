"""Paired but misaligned MR/CT of the same patient: the head federation's paired sites.

A paired CT site (``HeadSimConfig.paired_sites``) holds, for every patient, the site's CT
(exactly the image an unpaired build writes) and an MR of the same anatomy acquired in
another pose: the anatomy is warped by a smooth random deformation before the MR site's
physics renders it (sim/physics.py preset A, 3T T1w, the M site's scanner). That is the
DA-GAN setting (Xin et al. 2024): pairs exist, but no pixel of the MR sits where the same
anatomy sits in the CT.

The deformation is sim/random_deformation.py's model (a random affine composed with a
smooth displacement on a coarse control grid), with ranges in millimetres scaled by one
knob, ``misregistration_mm``: shift and control-point displacement of that size, rotation
``misregistration_mm / 100`` rad (6 mm -> 3.4 degrees, about 5 mm at the skull), scale
within +-1.5 %, 4 x 4 control cells (smooth, low-frequency: a repositioned, breathing-like
motion rather than a local tear). It is drawn per patient and site from
``SeedSequence([deformation seed, 2, site])``: a stream that neither the subject's
deformation (stream 0/1 of the same seed) nor any scan noise uses.

Ground truth (held-out folders only, for evaluation; a training site never sees it):
the displacement ``ddf`` [2, S, S] in output pixels, rows then columns, in MONAI's
``Warp`` convention: MR pixel x shows the anatomy that the CT shows at x + ddf(x), so
``Warp()(ct, ddf)`` is the CT in the MR's pose. The renderer also writes the clean CT and
the labels of the warped anatomy (the true aligned CT a synthetic CT is scored against).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medgen.sim.random_deformation import RandomDeformation, random_sampling_grid
from medgen.sim.subjects import area_pool

DEFORMATION_STREAM = 2
"""SeedSequence([deformation seed, DEFORMATION_STREAM, site]): the misregistration's draws."""


def misregistration_ranges(misregistration_mm: float, pixel_mm: float) -> RandomDeformation:
    """The deformation ranges in pixels of a grid with ``pixel_mm`` pixels (module doc)."""
    return RandomDeformation(rotation_rad=misregistration_mm / 100.0, scale=0.015,
                             shift_px=misregistration_mm / pixel_mm,
                             elastic_px=misregistration_mm / pixel_mm, elastic_cells=4)


def misregistration_grid(deformation_seed: int, site: int, grid_size: int, pixel_mm: float,
                         misregistration_mm: float) -> torch.Tensor:
    """The patient's ``grid_sample`` grid [1, R, R, 2] (align_corners=False) on the R-grid."""
    state = np.random.SeedSequence([int(deformation_seed), DEFORMATION_STREAM, int(site)])
    gen = torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0]) % 2**63)
    ranges = misregistration_ranges(misregistration_mm, pixel_mm)
    return random_sampling_grid(1, grid_size, grid_size, gen, ranges)


def warp_maps(maps: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """Class fractions and T1 [..., C, R, R] resampled through ``grid`` (bilinear, zero
    outside the field of view: air), every leading index (slab level) with the same grid."""
    lead, (c, r, _) = maps.shape[:-3], maps.shape[-3:]
    flat = torch.from_numpy(np.ascontiguousarray(maps.reshape(1, -1, r, r), dtype=np.float32))
    warped = F.grid_sample(flat, grid.to(flat.dtype), mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return np.clip(warped.numpy()[0], 0.0, None).reshape(*lead, c, r, r).astype(np.float32)


def displacement_field(grid: torch.Tensor, image_size: int) -> np.ndarray:
    """float32 [2, S, S]: ``grid``'s displacement in output pixels at output pixel centres
    (rows, columns; MONAI ``Warp``'s convention), area-averaged from the R-grid."""
    r = grid.shape[1]
    if r % image_size:
        raise ValueError(f"render grid {r} is not a multiple of the output size {image_size}")
    index = torch.arange(r, dtype=torch.float64)
    cols = ((grid[0, ..., 0].double() + 1.0) * r - 1.0) / 2.0 - index[None, :]
    rows = ((grid[0, ..., 1].double() + 1.0) * r - 1.0) / 2.0 - index[:, None]
    per_pixel = torch.stack([rows, cols]).numpy() * (image_size / r)  # render px -> output px
    return np.stack([area_pool(channel, image_size) for channel in per_pixel]).astype(np.float32)
