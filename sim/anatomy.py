"""The real anatomy behind the simulated federation: the MNI ICBM152 2009a template.

Source: the symmetric ICBM152 2009a nonlinear template (T1 plus GM and WM probability
maps, 1 mm isotropic), as shipped inside the nilearn package:

    Fonov V, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average
    age-appropriate brain templates from birth to adulthood. NeuroImage 47 (2009) S102.
    Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL. Unbiased average
    age-appropriate atlases for pediatric studies. NeuroImage 54(1) (2011) 313-327.

We read the files with nibabel from the installed package instead of importing nilearn
(its import pulls in pandas, sklearn, ... and takes seconds).

What this module returns is a stack of tissue channels per usable axial level, cropped to
one fixed square field of view (the union brain box of every level plus a margin for the
deformations) and resampled to the render grid:

    channel 0  T1    the real template T1 (this template is brain-extracted), in [0, 1]
    channel 1  CSF   brain mask minus GM minus WM
    channel 2  GM    template GM probability
    channel 3  WM    template WM probability

Brain mask. The template ships GM and WM only. The brain-extracted T1 is non-zero exactly
inside the brain (including ventricles and sulcal CSF, which are dark but not zero), so the
mask is (T1 > 2 % of max) OR (GM + WM > 0.1), with holes filled slice by slice so that the
ventricles (low T1, no GM/WM) are inside. CSF = clip(mask - GM - WM, 0, 1); the three tissue
probabilities are then renormalised to sum to 1 inside the mask, and background = 1 - mask.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEMPLATE_NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
FOV_MM = 200.0
"""Side of the square field of view (mm): the template's brain box is 145 x 182 mm; the
margin keeps a brain that the deformation scales up by 10 % inside the image."""
MIN_LEVEL_AREA = 0.65
"""An axial level is usable when its brain area is at least this fraction of the largest."""


class AnatomyMissingError(FileNotFoundError):
    """The MNI template files are not installed."""


@dataclass(frozen=True)
class Anatomy:
    """Tissue stacks of the usable axial levels on the render grid.

    maps: float32 [levels, 4, R, R] = (T1, CSF, GM, WM), anterior at the top (row 0).
    levels: the template z index (1 mm axial level) of each stack.
    pixel_mm: pixel size of the render grid (FOV_MM / R).
    tissue_t1: mean template T1 of (CSF, GM, WM), for the residual texture (physics.py).
    """

    maps: np.ndarray
    levels: tuple[int, ...]
    pixel_mm: float
    tissue_t1: tuple[float, float, float]

    @property
    def grid(self) -> int:
        return int(self.maps.shape[-1])


def template_dir() -> Path:
    """Folder holding the MNI files inside the installed nilearn package (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise AnatomyMissingError(
            "the MNI ICBM152 template ships with nilearn, which is not installed; "
            "run `pip install nilearn==0.13.1`")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def template_paths() -> dict[str, Path]:
    folder = template_dir()
    paths = {kind: folder / TEMPLATE_NAME.format(kind) for kind in ("t1", "gm", "wm")}
    for path in paths.values():
        if not path.is_file():
            raise AnatomyMissingError(
                f"MNI template file {path} is missing; reinstall nilearn with "
                "`pip install --force-reinstall nilearn==0.13.1`")
    return paths


def load_anatomy(grid: int) -> Anatomy:
    """Load the template and return the usable axial levels resampled to grid x grid."""
    import nibabel as nib
    from scipy import ndimage

    volumes = {kind: np.asanyarray(nib.load(str(path)).dataobj)
               for kind, path in template_paths().items()}
    # the mask and the level choice on the whole volume; float work only on usable levels
    t1_raw, gm_raw, wm_raw = volumes["t1"], volumes["gm"], volumes["wm"]
    t1_max, prob_max = float(t1_raw.max()), float(max(gm_raw.max(), wm_raw.max()))
    mask = (t1_raw > 0.02 * t1_max) | ((gm_raw.astype(np.float32) + wm_raw) > 0.1 * prob_max)
    area = mask.sum(axis=(0, 1))
    levels = tuple(int(z) for z in np.flatnonzero(area >= MIN_LEVEL_AREA * area.max()))
    xs, ys = np.nonzero(mask.any(axis=2))
    cx, cy = (xs.min() + xs.max()) / 2.0, (ys.min() + ys.max()) / 2.0

    picked = list(levels)
    mask = np.stack([ndimage.binary_fill_holes(mask[:, :, z]) for z in picked], axis=-1)
    t1 = t1_raw[..., picked].astype(np.float32) / t1_max
    gm = gm_raw[..., picked].astype(np.float32) / prob_max
    wm = wm_raw[..., picked].astype(np.float32) / prob_max
    mask_f = mask.astype(np.float32)
    csf = np.clip(mask_f - gm - wm, 0.0, 1.0)
    total = csf + gm + wm
    scale = np.where(total > 1e-6, mask_f / np.maximum(total, 1e-6), 0.0).astype(np.float32)
    csf, gm, wm = csf * scale, gm * scale, wm * scale
    tissue_t1 = tuple(float(t1[p > 0.9].mean()) for p in (csf, gm, wm))

    # one fixed field of view for every level: the union brain box, centred, FOV_MM wide
    stacks = np.stack([t1, csf, gm, wm])  # [4, X, Y, L]
    crop = _crop_square(stacks, cx, cy, FOV_MM)  # [4, F, F, L] (x, y)
    # image orientation: rows = anterior -> posterior, columns = x
    crop = np.transpose(crop, (3, 0, 2, 1))[:, :, ::-1, :]  # [L, 4, y, x] with y flipped
    maps = _resample(np.ascontiguousarray(crop), grid)
    return Anatomy(maps=maps, levels=levels, pixel_mm=FOV_MM / grid, tissue_t1=tissue_t1)


def _crop_square(stacks: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
    """Crop (zero-padding where the box leaves the volume) a side x side box centred at c."""
    n = int(round(side))
    x0, y0 = int(round(cx - n / 2)), int(round(cy - n / 2))
    out = np.zeros(stacks.shape[:1] + (n, n) + stacks.shape[3:], np.float32)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + n, stacks.shape[1]), min(y0 + n, stacks.shape[2])
    out[:, sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0] = stacks[:, sx0:sx1, sy0:sy1]
    return out


def _resample(maps: np.ndarray, grid: int) -> np.ndarray:
    """Resample [L, 4, F, F] to [L, 4, grid, grid] (antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(maps)
    if tensor.shape[-1] == grid:
        return maps.astype(np.float32)
    out = F.interpolate(tensor, size=(grid, grid), mode="bilinear", align_corners=False,
                        antialias=grid < tensor.shape[-1])
    return out.clamp_(0.0, 1.0).numpy().astype(np.float32)
