"""Subjects of the head federation: one real head, many smooth deformations (2D or 3D).

As for the brain (sim/subjects.py), a subject is its deformation seed. 2D: the seed
picks an axial level; the slab of levels around it (enough for the thickest slice of
the build) is resampled in-plane to the render grid and deformed by one MONAI
``Rand2DElastic`` draw (the brain federation's control spacing, magnitude, rotation,
scale and shift, in millimetres), so every level of the slab moves together. 3D: the
whole cube is area-resampled to the output grid and deformed by one ``Rand3DElastic``
draw plus the same affine ranges. Channels are class fractions, so resampling and
deformation give honest partial volume; labels are the argmax over (air, classes) of
the maps at output size (for 2D the slab's centre level), exact for what is rendered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medgen.sim.head_anatomy import CUBE, FOV_MM, HeadAnatomy
from medgen.sim.subjects import (CONTROL_SPACING_MM, MAGNITUDE_MM, MAX_ROTATION_RAD,
                                 MAX_SCALE, MAX_SHIFT_MM, area_pool)

ELASTIC_SIGMA_MM = 12.0
"""3D: smoothing of the random offsets (MONAI's sigma), about the brain's 2D spacing / 2.3."""
ELASTIC_MAGNITUDE_MM = (60.0, 120.0)
"""3D: offset magnitude before smoothing; gives 2-4 mm displacements after it."""


@dataclass(frozen=True)
class HeadSlice:
    """maps float32 [L, C, R, R] (slab levels, class fractions + T1); labels uint8 [S, S]."""

    maps: np.ndarray
    labels: np.ndarray
    level: int

    @property
    def centre(self) -> np.ndarray:
        return self.maps[self.maps.shape[0] // 2]


@dataclass(frozen=True)
class HeadVolume:
    """maps float32 [D, C, H, W] at output size; labels uint8 [D, H, W]."""

    maps: np.ndarray
    labels: np.ndarray


def render_grid(image_size: int) -> int:
    """2D render grid: a multiple of the output size close to the atlas's 1.5 mm."""
    return image_size * max(1, int(round(CUBE / image_size)))


def labels_from_maps(maps: np.ndarray) -> np.ndarray:
    """Argmax over (air, non-air fractions) of maps [..., C, H, W] (T1 last)."""
    fractions = maps[..., :-1, :, :]
    air = np.clip(1.0 - fractions.sum(axis=-3, keepdims=True), 0.0, 1.0)
    return np.argmax(np.concatenate([air, fractions], axis=-3), axis=-3).astype(np.uint8)


def deform_head_slice(anatomy: HeadAnatomy, seed: int, image_size: int,
                      half_width: int) -> HeadSlice:
    """Pick the level, resample the slab to the render grid, deform it as one."""
    import torch
    import torch.nn.functional as F
    from monai.transforms import Rand2DElastic

    level = anatomy.levels[int(np.random.default_rng([seed, 0]).integers(len(anatomy.levels)))]
    slab = anatomy.channels(list(range(level - half_width, level + half_width + 1)))
    levels, channels = slab.shape[:2]
    grid = render_grid(image_size)
    source = torch.from_numpy(slab.reshape(levels * channels, CUBE, CUBE))
    if grid != CUBE:
        source = F.interpolate(source[None], size=(grid, grid), mode="bilinear",
                               align_corners=False, antialias=grid < CUBE)[0]
    px = FOV_MM / grid
    elastic = Rand2DElastic(
        spacing=CONTROL_SPACING_MM / px, magnitude_range=(MAGNITUDE_MM[0] / px, MAGNITUDE_MM[1] / px),
        prob=1.0, rotate_range=MAX_ROTATION_RAD, scale_range=(MAX_SCALE, MAX_SCALE),
        translate_range=(MAX_SHIFT_MM / px, MAX_SHIFT_MM / px), mode="bilinear",
        padding_mode="zeros")
    elastic.set_random_state(state=np.random.RandomState(np.random.MT19937([seed, 1])))
    deformed = np.asarray(elastic(source).detach().cpu().numpy(), np.float32)
    maps = np.clip(deformed, 0.0, None).reshape(levels, channels, grid, grid)
    labels = labels_from_maps(area_pool(maps[half_width], image_size))
    return HeadSlice(maps=maps, labels=labels, level=level)


def volume_channels(anatomy: HeadAnatomy, size: int) -> np.ndarray:
    """float32 [C, size, size, size]: the cube's channels area-averaged to the output grid."""
    import torch
    import torch.nn.functional as F

    out = []
    for channel in np.moveaxis(anatomy.channels(), 1, 0):  # one channel at a time: memory
        volume = torch.from_numpy(np.ascontiguousarray(channel))[None, None]
        out.append(F.interpolate(volume, size=(size,) * 3, mode="area")[0, 0].numpy())
    return np.stack(out).astype(np.float32)


def deform_head_volume(channels: np.ndarray, seed: int) -> HeadVolume:
    """One elastic + affine draw over the whole volume [C, D, H, W] -> [D, C, H, W]."""
    from monai.transforms import Rand3DElastic

    voxel = FOV_MM / channels.shape[-1]
    elastic = Rand3DElastic(
        sigma_range=(ELASTIC_SIGMA_MM / voxel, ELASTIC_SIGMA_MM / voxel),
        magnitude_range=(ELASTIC_MAGNITUDE_MM[0] / voxel, ELASTIC_MAGNITUDE_MM[1] / voxel),
        prob=1.0, rotate_range=(MAX_ROTATION_RAD / 3, MAX_ROTATION_RAD / 3, MAX_ROTATION_RAD),
        scale_range=(MAX_SCALE,) * 3, translate_range=(MAX_SHIFT_MM / voxel,) * 3,
        mode="bilinear", padding_mode="zeros")
    elastic.set_random_state(state=np.random.RandomState(np.random.MT19937([seed, 1])))
    deformed = np.asarray(elastic(channels).detach().cpu().numpy(), np.float32)
    maps = np.ascontiguousarray(np.moveaxis(np.clip(deformed, 0.0, None), 0, 1))
    return HeadVolume(maps=maps, labels=labels_from_maps(maps))
