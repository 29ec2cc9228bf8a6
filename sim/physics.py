"""Site = scanner physics: contrast, resolution, bias field, noise and bit depth.

Presets follow DATA.md's table (A 3T T1w, B 1.5T T1w, C T2w, D low-field PD). Every
numeric parameter is a function of a severity t in [0, 1]: ``site_physics(kind, t)`` is
the linear interpolation between site A (t = 0) and the preset of ``kind`` (t = 1), so a
domain shift can be swept. Categorical parameters (noise model, bit depth) switch to the
preset's as soon as t > 0.

Contrast model (p = deformed tissue probabilities, T1 = deformed real template T1):

    image = (1 - mix) * T1 ** gamma + mix * (sum_k w_k p_k + texture * residual)
    residual = T1 - sum_k p_k * mean_T1(k)        (the real T1's within-tissue texture)

A: gamma 1, mix 0. B: gamma 1.8. C: mix 1, w = (1.0, 0.55, 0.35), texture -0.3 (inverted).
D: mix 1, w = (0.80, 0.68, 0.55), texture +0.3.

Rendering order on the ~1 mm render grid (then area-pooled to the output size):
contrast -> bias field (multiplicative, per-scan random coefficients, mean 1 over the
brain) -> blur ->
low-resolution acquisition -> Gibbs ringing -> noise -> pool -> quantise. The "clean"
rendering for evaluation is contrast -> blur -> low resolution -> Gibbs -> pool: the
deterministic part of the site, without bias, noise or quantisation.

Noise std values are per ~1 mm render pixel; area pooling to the output size then lowers
them as averaging would (DATA.md's 64 px baselines were measured the same way).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from medgen.sim.lesions import lesion_t1, lesion_weight
from medgen.sim.subjects import area_pool

HEADROOM = 1.25
"""Stored value (2**bits - 1) corresponds to intensity 1.25: room for the bias field."""


@dataclass(frozen=True)
class SitePhysics:
    name: str
    kind: str  # the preset this site interpolates toward (A, B, C, D)
    severity: float
    gamma: float = 1.0
    mix: float = 0.0
    tissue_weights: tuple[float, float, float] = (0.0, 0.0, 0.0)  # CSF, GM, WM
    texture: float = 0.0
    blur_mm: float = 0.0
    downsample: float = 1.0  # acquisition matrix / render matrix (1 = full resolution)
    gibbs: float = 0.0  # MONAI GibbsNoise alpha (fraction of k-space truncated)
    bias: float = 0.05  # bias-field coefficients drawn per scan from U(-bias, bias)
    noise: float = 0.01
    noise_model: str = "rician"  # or "gaussian"
    bits: int = 12

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, SitePhysics] = {
    "A": SitePhysics("A", "A", 1.0, bias=0.05, noise=0.01, noise_model="rician", bits=12),
    "B": SitePhysics("B", "B", 1.0, gamma=1.8, blur_mm=0.8, downsample=0.6, bias=0.25,
                     noise=0.035, noise_model="rician", bits=8),
    "C": SitePhysics("C", "C", 1.0, mix=1.0, tissue_weights=(1.0, 0.55, 0.35), texture=-0.3,
                     blur_mm=0.5, gibbs=0.35, bias=0.12, noise=0.025, noise_model="rician",
                     bits=12),
    "D": SitePhysics("D", "D", 1.0, mix=1.0, tissue_weights=(0.80, 0.68, 0.55), texture=0.3,
                     blur_mm=1.2, downsample=0.45, bias=0.35, noise=0.05,
                     noise_model="gaussian", bits=10),
}
EXTRA_KINDS = ("B", "C", "D")


def site_physics(kind: str, severity: float = 1.0, name: str | None = None) -> SitePhysics:
    """Interpolate every numeric parameter from site A (t = 0) to preset ``kind`` (t = 1)."""
    if kind not in PRESETS:
        raise ValueError(f"unknown site kind '{kind}'; known: {', '.join(PRESETS)}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity of site {name or kind} must be in [0, 1], got {severity}")
    a, target = PRESETS["A"], PRESETS[kind]
    t = 0.0 if kind == "A" else float(severity)

    def lerp(x: float, y: float) -> float:
        return float((1.0 - t) * x + t * y)

    return SitePhysics(
        name=name or kind, kind=kind, severity=t,
        gamma=lerp(a.gamma, target.gamma), mix=lerp(a.mix, target.mix),
        tissue_weights=target.tissue_weights, texture=target.texture,
        blur_mm=lerp(a.blur_mm, target.blur_mm), downsample=lerp(a.downsample, target.downsample),
        gibbs=lerp(a.gibbs, target.gibbs), bias=lerp(a.bias, target.bias),
        noise=lerp(a.noise, target.noise),
        noise_model=target.noise_model if t > 0 else a.noise_model,
        bits=target.bits if t > 0 else a.bits,
    )


def default_site(index: int, name: str) -> tuple[str, float]:
    """(kind, severity) of the site at ``index``: A-D are the presets; every further site
    cycles through B, C, D at severities 1/2, 2/3, 3/4, ... (the j-th extra site, j from 0,
    has kind EXTRA_KINDS[j % 3] and severity (r + 1) / (r + 2) with r = j // 3)."""
    if index < 4:
        return "ABCD"[index], 1.0
    j = index - 4
    r = j // 3
    return EXTRA_KINDS[j % 3], (r + 1) / (r + 2)


def render_contrast(maps: np.ndarray, physics: SitePhysics,
                    tissue_t1: tuple[float, float, float]) -> np.ndarray:
    """Noise-free contrast image [R, R] from a deformed (T1, CSF, GM, WM[, lesion]) stack
    (a lesion's T1 is painted into the T1 channel; its mixture weight: sim/lesions.py)."""
    t1, tissue = maps[0], maps[1:4]
    image = (1.0 - physics.mix) * np.power(t1, physics.gamma)
    if physics.mix > 0:
        expected_t1 = np.tensordot(np.asarray(tissue_t1, np.float32), tissue, axes=1)
        weights = np.asarray(physics.tissue_weights, np.float32)
        tissue_image = np.tensordot(weights, tissue, axes=1)
        if maps.shape[0] > 4:
            expected_t1 = expected_t1 + lesion_t1(tissue_t1) * maps[4]
            tissue_image = tissue_image + lesion_weight(physics.kind) * maps[4]
        tissue_image = tissue_image + physics.texture * (t1 - expected_t1)
        image = image + physics.mix * tissue_image
    return np.clip(image, 0.0, None).astype(np.float32)


def _resolution(image: np.ndarray, physics: SitePhysics, pixel_mm: float) -> np.ndarray:
    """Blur, low-resolution acquisition and Gibbs ringing (the deterministic scanner part)."""
    import torch
    from monai.transforms import GaussianSmooth, GibbsNoise, RandSimulateLowResolution

    x = torch.from_numpy(image[None].astype(np.float32))
    if physics.blur_mm > 0:
        x = GaussianSmooth(sigma=physics.blur_mm / pixel_mm)(x)
    if physics.downsample < 0.999:
        lowres = RandSimulateLowResolution(prob=1.0, downsample_mode="area",
                                           upsample_mode="bilinear",
                                           zoom_range=(physics.downsample, physics.downsample))
        lowres.set_random_state(0)  # prob=1 and a fixed zoom: nothing random is drawn
        x = lowres(x)
    if physics.gibbs > 0:
        x = GibbsNoise(alpha=physics.gibbs)(x)
    return np.asarray(torch.as_tensor(x).float().numpy()[0], np.float32)


def render_clean(maps: np.ndarray, physics: SitePhysics, tissue_t1, pixel_mm: float,
                 image_size: int) -> np.ndarray:
    """The noise-free site rendering at output size (float32, intensity units)."""
    image = _resolution(render_contrast(maps, physics, tissue_t1), physics, pixel_mm)
    return area_pool(image, image_size)


def render_scan(maps: np.ndarray, physics: SitePhysics, tissue_t1, pixel_mm: float,
                image_size: int, scan_seed: int) -> np.ndarray:
    """One acquisition: bias field and noise drawn from ``scan_seed``; stored integers."""
    import torch
    from monai.transforms import RandBiasField, RandGaussianNoise, RandRicianNoise

    image = render_contrast(maps, physics, tissue_t1)
    bias = RandBiasField(degree=3, coeff_range=(-physics.bias, physics.bias), prob=1.0)
    bias.set_random_state(state=np.random.RandomState(np.random.MT19937([scan_seed, 0])))
    field = np.asarray(bias(np.ones((1,) + image.shape, np.float32)), np.float32)[0]
    # the scanner's receiver-gain calibration keeps the mean brain signal: the field shades
    # the image but does not rescale it (MONAI's constant coefficient would)
    tissue = maps[1:].sum(axis=0) > 0.5  # the brain, lesion included
    image = image * (field / float(field[tissue].mean() if tissue.any() else field.mean()))
    image = _resolution(image, physics, pixel_mm)
    if physics.noise_model == "rician":
        noise = RandRicianNoise(prob=1.0, std=physics.noise, sample_std=False)
    else:
        noise = RandGaussianNoise(prob=1.0, std=physics.noise, sample_std=False)
    noise.set_random_state(state=np.random.RandomState(np.random.MT19937([scan_seed, 1])))
    image = np.asarray(torch.as_tensor(noise(image[None])).float().numpy()[0], np.float32)
    return quantise(area_pool(image, image_size), physics.bits)


def quantise(image: np.ndarray, bits: int) -> np.ndarray:
    """Scanner integers: [0, HEADROOM] -> 0 .. 2**bits - 1 (uint8 for 8 bits, else uint16)."""
    top = 2 ** bits - 1
    values = np.rint(np.clip(image / HEADROOM, 0.0, 1.0) * top)
    return values.astype(np.uint8 if bits <= 8 else np.uint16)


def scanner_units(image: np.ndarray, bits: int) -> np.ndarray:
    """Intensity -> the stored scanner scale, unrounded and unclipped (float32). The clean
    rendering is stored this way so that it shares its noisy scan's units and scaling."""
    return (image * ((2 ** bits - 1) / HEADROOM)).astype(np.float32)


def dequantise(values: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``quantise`` (to intensity units comparable with the clean rendering)."""
    return values.astype(np.float32) * (HEADROOM / (2 ** bits - 1))
