"""SynthSeg-style renderings of random contrasts from public tissue label maps.

A segmenter that has only ever seen images whose tissue intensities, blur, bias field and
noise were drawn at random learns to segment by shape and by intensity *differences*,
not by one scanner's contrast (Billot et al., SynthSeg, 2023). The inputs are label maps
of the public anatomy bank (docs/data-layout.md, ``public/labels``), so everything
trained on these renderings costs no privacy (DP.md "Conditioning").

One rendering, per image, all parameters drawn from the caller's ``torch.Generator``:
  1. partial volume: the one-hot map is blurred (sigma U(0.2, 1.0) px), so tissue
     boundaries get mixed intensities as in a real area-pooled scan;
  2. contrast: background (class 0) mean U(0, 0.08), each other class of the label schema
     a mean U(0.1, 1.0) (independent: T1-like, T2-like, PD-like and orderings no scanner
     has; the brain's CSF/GM/WM or the head's seven classes alike);
  3. within-tissue texture: a smooth random field (a low-resolution Gaussian field
     upsampled) times a tissue-specific gain, so tissues are not flat;
  4. gamma U(0.6, 1.8) on the contrast image;
  5. a multiplicative smooth bias field exp(U(-b, b) field), b up to 0.35;
  6. acquisition blur sigma U(0, 1.5) px (B, C, D are blurred);
  7. noise: Gaussian or Rician, std U(0, 0.06);
  8. the client's normalisation: 0.5th..99.5th percentile -> [-1, 1], clipped
     (client/site_data.py), so renderings live on the scale a site's tensors do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BRAIN_NUM_CLASSES = 4  # the embedded brain federation's schema: the default of this brain simulator
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5  # as client/site_data.robust_scaling


@dataclass(frozen=True)
class RandomContrast:
    """Ranges of the random rendering (see the module docstring for the order)."""

    partial_volume_px: tuple[float, float] = (0.2, 1.0)
    background: tuple[float, float] = (0.0, 0.08)
    tissue: tuple[float, float] = (0.1, 1.0)
    texture: tuple[float, float] = (0.0, 0.08)
    gamma: tuple[float, float] = (0.6, 1.8)
    bias: float = 0.35
    blur_px: tuple[float, float] = (0.0, 1.5)
    noise: tuple[float, float] = (0.0, 0.06)

    def __post_init__(self) -> None:
        for name in ("partial_volume_px", "background", "tissue", "texture", "gamma",
                     "blur_px", "noise"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"RandomContrast.{name} must be a range 0 <= low <= high, got {(lo, hi)}")


def _uniform(n: int, bounds: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur of [N,C,H,W] with sigma [N] (px); sigma < 0.05 is a no-op."""
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))) if sigma.numel() else 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    safe = sigma.clamp(min=0.05)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(x.dtype)[None].expand_as(kernel)
    kernel = torch.where((sigma < 0.05)[:, None], identity, kernel)  # [N, K]
    n, c, h, w = x.shape
    flat = x.reshape(1, n * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def _smooth_field(n: int, size: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-mean, unit-ish smooth random field [N,1,S,S] (bicubic upsampling of cells x cells)."""
    coarse = torch.randn(n, 1, cells, cells, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)


def robust_normalise(images: torch.Tensor) -> torch.Tensor:
    """Per image: the 0.5th..99.5th percentile range -> [-1, 1], clipped (site_data's rule)."""
    flat = images.flatten(1)
    lo = torch.quantile(flat, LOW_PERCENTILE / 100, dim=1)
    hi = torch.quantile(flat, HIGH_PERCENTILE / 100, dim=1)
    span = torch.where(hi - lo > 1e-6, hi - lo, flat.max(1).values - flat.min(1).values + 1e-6)
    scaled = (images - lo[:, None, None, None]) / span[:, None, None, None]
    return (scaled.clamp(0.0, 1.0) * 2.0 - 1.0).float()


def render_random_contrast(label_maps: torch.Tensor, gen: torch.Generator,
                           ranges: RandomContrast = RandomContrast(),
                           num_classes: int = BRAIN_NUM_CLASSES) -> torch.Tensor:
    """Images [N,1,H,W] in [-1, 1] from integer label maps [N,H,W] (values 0..num_classes-1,
    the run's label schema; class 0 is the background).

    Deterministic given ``gen``'s state; the label maps are not modified.
    """
    if label_maps.dim() != 3:
        raise ValueError(f"label maps must be [N,H,W], got shape {tuple(label_maps.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (a background and a tissue), got {num_classes}")
    if label_maps.numel() and (int(label_maps.min()) < 0 or int(label_maps.max()) >= num_classes):
        raise ValueError(f"label maps must hold values 0..{num_classes - 1} (the run's label schema)")
    n, size = label_maps.shape[0], label_maps.shape[-1]
    one_hot = F.one_hot(label_maps.long().cpu(), num_classes).permute(0, 3, 1, 2).float()
    soft = gaussian_blur(one_hot, _uniform(n, ranges.partial_volume_px, gen))

    means = torch.cat([_uniform(n, ranges.background, gen)[:, None],
                       torch.stack([_uniform(n, ranges.tissue, gen) for _ in range(num_classes - 1)],
                                   dim=1)], dim=1)
    gains = torch.stack([_uniform(n, ranges.texture, gen) for _ in range(num_classes)], dim=1)
    gains[:, 0] = 0.0  # the background has no anatomy: texture there would be invented
    texture = _smooth_field(n, size, max(4, size // 4), gen)
    image = (soft * (means[:, :, None, None] + gains[:, :, None, None] * texture)).sum(dim=1, keepdim=True)
    image = image.clamp(min=0.0) ** _uniform(n, ranges.gamma, gen)[:, None, None, None]

    bias = _uniform(n, (-ranges.bias, ranges.bias), gen)[:, None, None, None]
    image = image * torch.exp(bias * _smooth_field(n, size, 3, gen))
    image = gaussian_blur(image, _uniform(n, ranges.blur_px, gen))

    std = _uniform(n, ranges.noise, gen)[:, None, None, None]
    rician = (torch.rand(n, generator=gen) < 0.5)[:, None, None, None]
    real = image + std * torch.randn(image.shape, generator=gen)
    imag = std * torch.randn(image.shape, generator=gen)
    image = torch.where(rician, torch.sqrt(real ** 2 + imag ** 2), real)
    return robust_normalise(image)


def acquisition_jitter(images: torch.Tensor, gen: torch.Generator, bias: float = 0.35,
                       noise: tuple[float, float] = (0.0, 0.06)) -> torch.Tensor:
    """Steps 5 and 7 alone, on given images [N,1,H,W] in [-1, 1]: a random smooth
    multiplicative bias field and Gaussian noise, then the client's normalisation.

    The standard "acquisition" augmentation of a segmenter's training images (the tissue
    contrast is kept: this is not the random-contrast rendering). Ranges as RandomContrast.
    """
    n, size = images.shape[0], images.shape[-1]
    intensity = (images.float() + 1.0) / 2.0  # back to a non-negative intensity scale
    strength = _uniform(n, (-bias, bias), gen)[:, None, None, None]
    intensity = intensity * torch.exp(strength * _smooth_field(n, size, 3, gen))
    std = _uniform(n, noise, gen)[:, None, None, None]
    return robust_normalise(intensity + std * torch.randn(intensity.shape, generator=gen))
