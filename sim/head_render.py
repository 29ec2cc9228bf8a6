"""Render one head subject at one site: a CT scanner in HU, or the MR site (T1w).

The CT path composes sim/ct_physics.py's steps in order; the MR path hands the same
deformed anatomy (real T1 plus the CSF/GM/WM fractions) to the brain federation's MR
physics (sim/physics.py, preset A: 3T T1w), so an MR and a CT image of one subject
share the anatomy voxel for voxel: MR<->CT translation has ground truth.

2D takes a ``HeadSlice`` (a slab of levels on the render grid, pooled to the output
size after the through-plane average); 3D takes a ``HeadVolume`` at output size (slice
thickness as a box along z). ``scan_seed=None`` gives the clean rendering.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medgen.sim.ct_physics import (CTSitePhysics, cupping, ct_noise, reconstruct,
                                   slice_profile, stored_hu, tissue_hu)
from medgen.sim.head_anatomy import HeadAnatomy
from medgen.sim.head_subjects import HeadSlice, HeadVolume
from medgen.sim.head_tissues import CSF, GM, WM
from medgen.sim.physics import SitePhysics, render_clean, render_scan, scanner_units
from medgen.sim.subjects import area_pool


def render_ct_slice(subject: HeadSlice, physics: CTSitePhysics, anatomy: HeadAnatomy,
                    hu: np.ndarray, pixel_mm: float, image_size: int,
                    scan_seed: int | None) -> np.ndarray:
    """HU [S, S]: int16 stored scan, or float32 clean rendering when scan_seed is None."""
    levels = subject.maps.shape[0]
    weights = slice_profile(physics.slice_mm, anatomy.voxel_mm, levels // 2)
    per_level = tissue_hu(subject.maps, hu, anatomy.class_t1, anatomy.bone_t1_range)
    image = np.tensordot(weights, per_level, axes=1)
    objectness = np.tensordot(weights, subject.maps[:, :-1].sum(axis=1), axes=1)
    image = image + cupping(np.clip(objectness, 0.0, 1.0), physics.cupping_hu)
    image = area_pool(reconstruct(image, physics, pixel_mm), image_size)
    if scan_seed is None:
        return image.astype(np.float32)
    return stored_hu(image + ct_noise(image.shape, physics, scan_seed))


def render_ct_volume(subject: HeadVolume, physics: CTSitePhysics, anatomy: HeadAnatomy,
                     hu: np.ndarray, voxel_mm: float, scan_seed: int | None) -> np.ndarray:
    """HU [D, H, W] of a volume at output size (clean float32 when scan_seed is None)."""
    half = max(0, int(np.ceil(physics.slice_mm / voxel_mm / 2)))
    weights = slice_profile(physics.slice_mm, voxel_mm, half)
    image = tissue_hu(subject.maps, hu, anatomy.class_t1, anatomy.bone_t1_range)
    objectness = subject.maps[:, :-1].sum(axis=1)
    if half:
        image = ndimage.convolve1d(image, weights, axis=0, mode="nearest")
        objectness = ndimage.convolve1d(objectness, weights, axis=0, mode="nearest")
    image = reconstruct(image + cupping(np.clip(objectness, 0.0, 1.0), physics.cupping_hu),
                        physics, voxel_mm)
    if scan_seed is None:
        return image.astype(np.float32)
    return stored_hu(image + ct_noise(image.shape, physics, scan_seed))


def mr_maps(maps: np.ndarray) -> np.ndarray:
    """(T1, CSF, GM, WM) stack that sim/physics.py renders, from [..., C, H, W] maps."""
    index = [-1, CSF - 1, GM - 1, WM - 1]  # channel k - 1 holds class k (air has none)
    return np.ascontiguousarray(maps[..., index, :, :])


def render_mr(maps: np.ndarray, physics: SitePhysics, anatomy: HeadAnatomy, pixel_mm: float,
              image_size: int, scan_seed: int | None) -> np.ndarray:
    """MR image of the same anatomy; maps [C, R, R] (2D centre level) or [D, C, H, W].

    Scans are the site's stored integers; the clean rendering is in the same scanner
    units, unrounded (as in the brain federation).
    """
    stack = mr_maps(maps)
    if stack.ndim == 4:  # a volume: (T1, CSF, GM, WM) first, then D, H, W
        stack = np.ascontiguousarray(np.moveaxis(stack, 1, 0))
    tissue_t1 = tuple(anatomy.class_t1[k] for k in (CSF, GM, WM))
    if scan_seed is None:
        clean = render_clean(stack, physics, tissue_t1, pixel_mm, image_size)
        return scanner_units(clean, physics.bits)
    return render_scan(stack, physics, tissue_t1, pixel_mm, image_size, scan_seed)
