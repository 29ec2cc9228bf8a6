"""CT scanner physics for the head federation: tissue HU, kernel, dose, slice, calibration.

A site is a CT scanner (or, in the federation, one MR site rendered by sim/physics.py).
Rendering of one subject, on the ~1.5-1.9 mm render grid, then the output grid:

1. Tissue HU. Each class fraction (partial volume of the deformed maps) times the
   subject's HU for that class, drawn once per subject within TISSUE_HU (physiology,
   not scanner: every site sees the same subject with the same HU). Texture from the
   real T1: within-tissue T1 deviation times a small gain; bone HU runs from the subject's
   dense-cortex value (darkest T1) down to 700 HU in the marrow-rich diploe (brightest T1).
2. Slice thickness: the axial levels of the slab (1.5 mm apart) are averaged with a box
   profile of the slice thickness (through-plane partial volume; 3D: a box along z).
3. Beam-hardening cupping: inside the head, -cupping x (1 - (r / R)^2) HU with r the
   distance from the head's centroid and R its equivalent radius (the centre reads low).
4. Reconstruction kernel: Gaussian PSF (psf_mm) and, for sharp kernels, edge enhancement
   (unsharp mask, gain edge_gain, 1 mm): overshoot at bone edges.
5. Calibration offset: offset_hu added everywhere (water reads offset_hu).
6. Area pooling to the output grid, then noise (scans only): white noise on the output
   grid, shaped by the kernel (smooth: Gaussian grain; sharp: high-pass emphasis, noise
   minus highpass x its 1-pixel blur), scaled to exactly noise_hu standard deviation per
   output pixel, then clipped to [-1024, 3071] and rounded to int16 HU.

The clean rendering (held-out evaluation) is steps 1-6 without the noise, float32 HU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medgen.sim.head_tissues import AIR, BONE, CSF, FAT, GM, HEAD_CLASSES, SOFT_TISSUE, WM

TISSUE_HU = {  # per-subject HU drawn uniformly in [lo, hi] (DATA.md, typical values)
    "air": (-1000.0, -1000.0), "soft_tissue": (20.0, 60.0), "fat": (-100.0, -50.0),
    "bone": (1200.0, 1600.0), "csf": (0.0, 15.0), "gm": (35.0, 45.0), "wm": (20.0, 30.0)}
BONE_MARROW_HU = 700.0
TEXTURE_HU = {"soft_tissue": 40.0, "fat": 30.0, "csf": 10.0, "gm": 15.0, "wm": 15.0}
"""HU per unit of normalised-T1 deviation from the class mean (small: CT is flat)."""
HU_MIN, HU_MAX = -1024.0, 3071.0
EDGE_MM = 1.0


@dataclass(frozen=True)
class CTSitePhysics:
    name: str
    kernel: str  # "smooth", "standard", "sharp" (what psf/edge/noise shape imitate)
    psf_mm: float  # Gaussian sigma of the reconstruction PSF
    edge_gain: float  # unsharp-mask gain of sharp kernels (0: none)
    noise_hu: float  # noise standard deviation per output pixel (dose)
    noise_grain_px: float  # Gaussian sigma (output pixels) of the noise texture
    noise_highpass: float  # high-pass emphasis of the noise texture (sharp kernels)
    slice_mm: float  # slice thickness (through-plane box)
    offset_hu: float  # calibration offset
    cupping_hu: float  # beam-hardening depression at the head's centre
    description: str = ""
    kind: str = "CT"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CT_PRESETS: dict[str, CTSitePhysics] = {
    "A": CTSitePhysics("A", "standard", psf_mm=0.7, edge_gain=0.0, noise_hu=6.0,
                       noise_grain_px=0.6, noise_highpass=0.0, slice_mm=3.0, offset_hu=0.0,
                       cupping_hu=0.0, description="standard kernel, routine dose, 3 mm"),
    "B": CTSitePhysics("B", "sharp", psf_mm=0.3, edge_gain=0.8, noise_hu=20.0,
                       noise_grain_px=0.0, noise_highpass=0.7, slice_mm=1.5, offset_hu=4.0,
                       cupping_hu=8.0, description="sharp (bone) kernel, thin 1.5 mm slices"),
    "C": CTSitePhysics("C", "smooth", psf_mm=1.5, edge_gain=0.0, noise_hu=4.0,
                       noise_grain_px=1.2, noise_highpass=0.0, slice_mm=6.0, offset_hu=-3.0,
                       cupping_hu=15.0, description="smooth (soft-tissue) kernel, thick 6 mm slices"),
    "D": CTSitePhysics("D", "standard", psf_mm=1.0, edge_gain=0.2, noise_hu=35.0,
                       noise_grain_px=0.8, noise_highpass=0.0, slice_mm=5.0, offset_hu=8.0,
                       cupping_hu=30.0, description="low dose, older scanner: strong cupping"),
}


def subject_hu(seed: int) -> np.ndarray:
    """float64 [classes]: this subject's tissue HU, drawn within TISSUE_HU."""
    rng = np.random.default_rng([seed, 7])
    return np.array([rng.uniform(*TISSUE_HU[name]) for name in HEAD_CLASSES])


def tissue_hu(maps: np.ndarray, hu: np.ndarray, class_t1: tuple[float, ...],
              bone_t1: tuple[float, float]) -> np.ndarray:
    """HU image [..., H, W] from maps [..., C, H, W] (non-air fractions, then T1)."""
    fractions, t1 = maps[..., :-1, :, :], maps[..., -1, :, :]
    air = np.clip(1.0 - fractions.sum(axis=-3), 0.0, 1.0)
    image = air * hu[AIR]
    for k in (SOFT_TISSUE, FAT, CSF, GM, WM):
        gain = TEXTURE_HU[HEAD_CLASSES[k]]
        image = image + fractions[..., k - 1, :, :] * (hu[k] + gain * (t1 - class_t1[k]))
    marrow = np.clip((t1 - bone_t1[0]) / (bone_t1[1] - bone_t1[0]), 0.0, 1.0)
    image = image + fractions[..., BONE - 1, :, :] * (hu[BONE] - (hu[BONE] - BONE_MARROW_HU) * marrow)
    return image.astype(np.float32)


def slice_profile(slice_mm: float, level_mm: float, half_width: int) -> np.ndarray:
    """Weights of levels -K..K (level_mm apart) for a box of ``slice_mm`` centred on 0."""
    offsets = np.arange(-half_width, half_width + 1) * level_mm
    lo = np.maximum(offsets - level_mm / 2, -slice_mm / 2)
    hi = np.minimum(offsets + level_mm / 2, slice_mm / 2)
    weights = np.clip(hi - lo, 0.0, None)
    if weights.sum() <= 0:
        raise ValueError(f"slice thickness {slice_mm} mm covers no level")
    return weights / weights.sum()


def half_width_for(slice_mm: float, level_mm: float) -> int:
    """Levels needed on each side of the centre to cover a slice of ``slice_mm``."""
    return max(0, int(np.ceil((slice_mm / 2 - level_mm / 2) / level_mm - 1e-9)))


def cupping(objectness: np.ndarray, depth_hu: float) -> np.ndarray:
    """Beam-hardening offset per axial image [..., H, W] (step 3), 0 outside the head."""
    if depth_hu == 0:
        return np.zeros_like(objectness)
    out = np.zeros_like(objectness)
    rows, cols = np.indices(objectness.shape[-2:], dtype=np.float64)
    for index in np.ndindex(objectness.shape[:-2]):
        inside = objectness[index]
        area = float(inside.sum())
        if area < 1.0:
            continue
        cy, cx = (rows * inside).sum() / area, (cols * inside).sum() / area
        radius = np.sqrt(area / np.pi)
        r2 = ((rows - cy) ** 2 + (cols - cx) ** 2) / radius ** 2
        out[index] = -depth_hu * np.clip(1.0 - r2, 0.0, None) * inside
    return out.astype(np.float32)


def reconstruct(image: np.ndarray, physics: CTSitePhysics, pixel_mm: float) -> np.ndarray:
    """Kernel PSF and edge enhancement, in-plane only (step 4), calibration offset (5)."""
    in_plane = (0.0,) * (image.ndim - 2)
    out = ndimage.gaussian_filter(image, in_plane + (physics.psf_mm / pixel_mm,) * 2)
    if physics.edge_gain > 0:
        blurred = ndimage.gaussian_filter(out, in_plane + (EDGE_MM / pixel_mm,) * 2)
        out = out + physics.edge_gain * (out - blurred)
    return (out + physics.offset_hu).astype(np.float32)


def ct_noise(shape: tuple[int, ...], physics: CTSitePhysics, seed: int) -> np.ndarray:
    """Kernel-shaped noise on the output grid with exactly ``noise_hu`` std (step 6)."""
    rng = np.random.default_rng([seed, 11])
    noise = rng.standard_normal(shape)
    in_plane = (0.0,) * (len(shape) - 2)
    if physics.noise_grain_px > 0:
        noise = ndimage.gaussian_filter(noise, in_plane + (physics.noise_grain_px,) * 2, mode="wrap")
    if physics.noise_highpass > 0:
        noise = noise - physics.noise_highpass * ndimage.gaussian_filter(
            noise, in_plane + (1.0, 1.0), mode="wrap")
    return (noise / noise.std() * physics.noise_hu).astype(np.float32)


def stored_hu(image: np.ndarray) -> np.ndarray:
    """Scanner output: clipped to the 12-bit CT range and rounded to int16 HU."""
    return np.rint(np.clip(image, HU_MIN, HU_MAX)).astype(np.int16)
