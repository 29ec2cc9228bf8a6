"""Forward models of the restoration tasks: clean image -> what a restoration method is given.

Not to be confused with evaluation/degradations.py (failures a *generator* may produce, for
the metric sanity suite). Here each task is an inverse problem with an exact ground truth:

    denoise  MR (per-volume percentile units): Rician noise, magnitude of a complex signal
             with Gaussian noise of std ``sigma`` on both channels, on the [0, 1] intensity.
             CT (a fixed HU window): correlated Gaussian noise of std ``noise_hu`` HU per
             pixel, white noise blurred by a Gaussian of ``grain_px`` (the low-dose grain of
             a reconstruction kernel), scaled by the kernel's L2 norm so the std is exact.
    sr2/sr4  area down-sampling by 2 or 4 (the mean of each f x f block: what a detector
             of f x f larger pixels measures); the measurement is the low-res image.
    inpaint  a square hole of side ``hole_fraction`` x size at a random position inside the
             central half of the image, its pixels unknown (the mask says which).

Images are [N,1,H,W] in the network range [-1, 1]. Every random draw comes from the
``torch.Generator`` passed in (CPU): the same generator state gives the same degraded
images, so evaluation is reproducible and a site's training pairs use only public,
data-independent randomness. The noise level is stated in the data's physical units and
converted through its intensity policy (``noise_model_for``): a site's manifest says
whether it is CT in HU or MR in arbitrary units, never a constant here.

``Degraded.condition`` is what a learned method is conditioned on, at full size: the noisy
image; the low-res image upsampled bicubically (so a network learns only the correction
to the classical answer); the image with the hole at 0 plus the known-pixel mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

TASKS = ("denoise", "sr2", "sr4", "inpaint")
SR_FACTORS = {"sr2": 2, "sr4": 4}


@dataclass(frozen=True)
class NoiseModel:
    """Additive noise in network units: Rician (MR) or correlated Gaussian (CT)."""

    kind: str          # "rician" or "correlated"
    sigma: float       # rician: std on the [0, 1] intensity; correlated: std in [-1, 1] units
    grain_px: float = 0.0  # correlated only: Gaussian sigma (pixels) of the noise texture


def noise_model_for(intensity: Any, mr_sigma: float, ct_noise_hu: float, ct_grain_px: float) -> NoiseModel:
    """The noise of a site whose intensity policy (a manifest's ``intensity``) is ``intensity``:
    a fixed window (CT in HU) gets correlated noise of ``ct_noise_hu`` HU converted to network
    units (the window [lo, hi] spans 2); any other policy gets Rician noise ``mr_sigma``."""
    if getattr(intensity, "normalisation", "percentile") == "window":
        lo, hi = intensity.window
        return NoiseModel("correlated", 2.0 * ct_noise_hu / (hi - lo), ct_grain_px)
    return NoiseModel("rician", mr_sigma)


def gaussian_kernel(sigma_px: float) -> torch.Tensor:
    """A normalised 2D Gaussian [1,1,k,k] (k = 2 ceil(3 sigma) + 1); [[1]] for sigma 0."""
    if sigma_px <= 0:
        return torch.ones(1, 1, 1, 1)
    radius = max(1, math.ceil(3 * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma_px) ** 2)
    k = torch.outer(g, g)
    return (k / k.sum()).float()[None, None]


def add_noise(clean: torch.Tensor, noise: NoiseModel, generator: torch.Generator) -> torch.Tensor:
    """``clean`` [N,1,H,W] in [-1, 1] plus the noise model's noise, clipped to [-1, 1]."""
    if noise.kind == "rician":
        x01 = (clean + 1.0) / 2.0
        n1, n2 = (torch.randn(clean.shape, generator=generator).to(clean) for _ in range(2))
        y01 = torch.sqrt((x01 + noise.sigma * n1) ** 2 + (noise.sigma * n2) ** 2)
        return (2.0 * y01 - 1.0).clamp(-1.0, 1.0)
    if noise.kind == "correlated":
        kernel = gaussian_kernel(noise.grain_px).to(clean)
        white = torch.randn(clean.shape, generator=generator).to(clean)
        # circular padding keeps the texture stationary up to the border; the L2 norm of the
        # kernel is the std of blurred unit white noise, so dividing by it makes std exact
        pad = kernel.shape[-1] // 2
        grain = F.conv2d(F.pad(white, (pad,) * 4, mode="circular"), kernel) / kernel.norm()
        return (clean + noise.sigma * grain).clamp(-1.0, 1.0)
    raise ValueError(f"unknown noise kind {noise.kind!r}; expected 'rician' or 'correlated'")


def area_downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The mean of each ``factor`` x ``factor`` block: [N,1,H,W] -> [N,1,H/f,W/f]."""
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by {factor}")
    return F.avg_pool2d(images, factor)


def upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic up-sampling to ``size`` (the learned method's condition), clipped to [-1, 1]."""
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def hole_masks(n: int, size: int, hole_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Known-pixel masks [N,1,S,S] (1 known, 0 missing): one square hole each, its corner drawn
    uniformly so the hole lies inside the central half (on the anatomy, not the background)."""
    side = max(1, round(hole_fraction * size))
    lo, hi = size // 4, max(size // 4, 3 * size // 4 - side)
    corners = torch.randint(lo, hi + 1, (n, 2), generator=generator)
    mask = torch.ones(n, 1, size, size)
    for i, (r, c) in enumerate(corners.tolist()):
        mask[i, :, r:r + side, c:c + side] = 0.0
    return mask


@dataclass(frozen=True)
class Degraded:
    """One batch of a task's inverse problem."""

    measurement: torch.Tensor  # what an observer has: noisy [N,1,S,S], low-res [N,1,S/f,S/f], or masked
    condition: torch.Tensor    # the learned method's input at full size [N,C,S,S]
    known: torch.Tensor | None = None  # inpaint: known-pixel mask [N,1,S,S]


@dataclass(frozen=True)
class Degradation:
    """A task's forward model: ``apply(clean, generator) -> Degraded``."""

    task: str
    noise: NoiseModel
    hole_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown restoration task {self.task!r}; expected one of {TASKS}")

    @property
    def condition_channels(self) -> int:
        return 2 if self.task == "inpaint" else 1

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> Degraded:
        if self.task == "denoise":
            noisy = add_noise(clean, self.noise, generator)
            return Degraded(noisy, noisy)
        if self.task in SR_FACTORS:
            low = area_downsample(clean, SR_FACTORS[self.task])
            return Degraded(low, upsample(low, clean.shape[-1]))
        known = hole_masks(clean.shape[0], clean.shape[-1], self.hole_fraction, generator).to(clean)
        masked = clean * known
        return Degraded(masked, torch.cat([masked, known], dim=1), known)

    def base(self, degraded: Degraded) -> torch.Tensor:
        """The classical starting point a residual network corrects: channel 0 of the condition."""
        return degraded.condition[:, :1]


def flat_noise_patches(images: torch.Tensor, patch: int, count: int,
                       blur_px: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise of each image, read from its flattest regions: blind denoising's real sample.

    Every ``patch`` x ``patch`` window at stride ``patch // 2`` of each image [N,1,H,W] is
    scored by the std of the image blurred by a Gaussian of ``blur_px`` inside it (the
    anatomy's structure, with most of the noise averaged out, so selecting flat windows
    biases the noise they hold little); a window with a clipped pixel (|x| = 1: the window's
    edge, e.g. CT air or the MR background after percentile mapping) holds truncated noise
    and is never chosen. The ``count`` flattest windows per image, minus their own mean,
    are returned as noise [N,count,1,P,P] with a validity mask [N,count] (0 where an image
    has fewer usable windows). A function of each image alone, no randomness.
    """
    n, stride = images.shape[0], max(1, patch // 2)
    kernel = gaussian_kernel(blur_px).to(images)
    pad = kernel.shape[-1] // 2
    smooth = F.conv2d(F.pad(images, (pad,) * 4, mode="replicate"), kernel)
    windows = F.unfold(images, patch, stride=stride)           # [N, P*P, L]
    structure = F.unfold(smooth, patch, stride=stride).std(dim=1)
    clipped = (windows.abs() >= 1.0 - 1e-6).any(dim=1)
    if windows.shape[-1] < count:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} have {windows.shape[-1]} windows "
                         f"of {patch} px; options.patches-per-record ({count}) must not exceed that")
    score = torch.where(clipped, torch.full_like(structure, float("inf")), structure)
    best = score.topk(count, dim=1, largest=False)
    chosen = windows.gather(2, best.indices[:, None, :].expand(-1, windows.shape[1], -1))
    noise = (chosen - chosen.mean(dim=1, keepdim=True)).permute(0, 2, 1).reshape(n, count, 1, patch, patch)
    return noise, torch.isfinite(best.values).to(images.dtype)
