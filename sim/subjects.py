"""Subjects of the simulated federation: one real anatomy, many smooth deformations.

A subject is fully determined by its deformation seed: the seed picks the axial level (one
of the template's usable levels) and drives MONAI's ``Rand2DElastic`` (control points
about 28 mm apart, magnitude 2-4 mm, rotation up to 0.15 rad, scale up to 10 %, shift up
to 6 mm), applied to the four channels (T1, CSF, GM, WM) together. Geometry is defined in
millimetres and converted to render-grid pixels, so every image size gets the same anatomy.

The deformed maps are area-pooled to the output size and the labels are the argmax over
(background, CSF, GM, WM) of the pooled maps: labels are exact for the anatomy that every
site renders (there is no separate, slightly-off label warp).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medgen.sim.anatomy import Anatomy
from medgen.sim.lesions import MIN_DIAMETER_PX, LesionSpec, has_lesion, lesion_probability, paint_lesion

CONTROL_SPACING_MM = 28.0
MAGNITUDE_MM = (2.0, 4.0)
MAX_ROTATION_RAD = 0.15
MAX_SCALE = 0.10
MAX_SHIFT_MM = 6.0


@dataclass(frozen=True)
class Subject:
    """One simulated patient: an id for file names and the seed that makes its anatomy."""

    subject_id: str
    deformation_seed: int


@dataclass(frozen=True)
class SubjectAnatomy:
    """A subject's deformed tissue stack on the render grid and its labels at output size.

    maps: float32 [4, R, R] (T1, CSF, GM, WM), or [5, R, R] with a lesion channel last
    (sim/lesions.py); labels: uint8 [S, S] in 0..3 (0..4 with a lesion); level: the
    template's axial level (mm index).
    """

    maps: np.ndarray
    labels: np.ndarray
    level: int


def render_grid(image_size: int, fov_mm: float) -> int:
    """Render grid = an integer multiple of the output size with pixels close to 1 mm."""
    return image_size * max(1, int(round(fov_mm / image_size)))


def deform_subject(anatomy: Anatomy, seed: int, image_size: int,
                   lesions: LesionSpec | None = None) -> SubjectAnatomy:
    """Pick the level and deform the four channels jointly; paint a lesion if ``lesions``
    draws one for this seed (sim/lesions.py); labels from the pooled maps."""
    import torch
    from monai.transforms import Rand2DElastic

    level_index = int(np.random.default_rng([seed, 0]).integers(len(anatomy.levels)))
    px = anatomy.pixel_mm
    elastic = Rand2DElastic(
        spacing=CONTROL_SPACING_MM / px,
        magnitude_range=(MAGNITUDE_MM[0] / px, MAGNITUDE_MM[1] / px),
        prob=1.0,
        rotate_range=MAX_ROTATION_RAD,
        scale_range=(MAX_SCALE, MAX_SCALE),
        translate_range=(MAX_SHIFT_MM / px, MAX_SHIFT_MM / px),
        mode="bilinear",
        padding_mode="zeros",
    )
    # a private RandomState per subject: no global numpy state, reproducible per seed
    elastic.set_random_state(state=np.random.RandomState(np.random.MT19937([seed, 1])))
    source = torch.from_numpy(anatomy.maps[level_index])
    deformed = elastic(source)
    maps = np.clip(np.asarray(deformed.detach().cpu().numpy(), dtype=np.float32), 0.0, 1.0)
    if lesions is not None and has_lesion(seed, lesions):
        min_diameter = MIN_DIAMETER_PX * px * maps.shape[-1] / image_size
        maps = paint_lesion(maps, lesion_probability(maps[1:4], seed, lesions, px, min_diameter),
                            anatomy.tissue_t1)
    labels = tissue_labels(area_pool(maps, image_size))
    return SubjectAnatomy(maps=maps, labels=labels, level=anatomy.levels[level_index])


def tissue_labels(maps: np.ndarray) -> np.ndarray:
    """Argmax over (background, CSF, GM, WM[, lesion]) of a [4 or 5, H, W] stack (T1 first)."""
    tissue = maps[1:]
    background = np.clip(1.0 - tissue.sum(axis=0), 0.0, 1.0)
    return np.argmax(np.concatenate([background[None], tissue]), axis=0).astype(np.uint8)


def area_pool(image: np.ndarray, size: int) -> np.ndarray:
    """Mean over k x k blocks ([..., R, R] -> [..., size, size]); R must be a multiple."""
    grid = image.shape[-1]
    if grid % size:
        raise ValueError(f"render grid {grid} is not a multiple of the image size {size}")
    k = grid // size
    shape = image.shape[:-2] + (size, k, size, k)
    return image.reshape(shape).mean(axis=(-3, -1)).astype(np.float32)
