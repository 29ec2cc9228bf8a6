"""Controllable generation (survey [5,6]): named latent directions of site-gan's generator.

A named control is a unit direction d in site-gan's noise space such that G(site, z + t d)
changes one attribute (here ``contrast``: the spread of intensities inside the head) while
the rest (the head's outline: foreground area; its edges) stays put. It is found
InterFaceGAN-style: draw z, generate, score each sample with the attribute measure and fit
the attribute linearly on z (least squares); d is the normalised fit. The disentanglement
check measures, along d and along a random unit direction, how much the named attribute
changes against how much the foreground area and the edge map change.

Privacy argument (numbered; epsilon 0 beyond the trained site-gan's own):
  1. Inputs: site-gan's RELEASED generator (already DP: models/site_gan.py's argument),
     noise drawn here, and the measures below, which read only generated images.
  2. No site's image, label map or statistic is read; nothing here runs at a site.
  3. Hence the directions and every number of the check are post-processing of a DP
     release: they cost no privacy, and no Flower simulation test is added (a trained
     site-gan's Flower rounds are tested in tests/models/test_adaptive_schedule.py and
     tests/models/test_flower_label_schema.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.feature import canny
from torch import nn

FOREGROUND = -0.8  # images are in [-1, 1]; the background renders near -1


def contrast(images: torch.Tensor) -> torch.Tensor:
    """Per image [N]: the standard deviation of intensities inside the foreground
    (pixels above ``FOREGROUND``), the spread between the head's tissues."""
    x = images.flatten(1).float()
    w = (x > FOREGROUND).float()
    count = w.sum(1).clamp(min=1.0)
    mean = (w * x).sum(1) / count
    return ((w * (x - mean[:, None]) ** 2).sum(1) / count).sqrt()


def foreground_area(images: torch.Tensor) -> torch.Tensor:
    """Per image [N]: the fraction of pixels in the foreground."""
    return (images.flatten(1) > FOREGROUND).float().mean(1)


def edge_maps(images: torch.Tensor, sigma: float = 1.0) -> np.ndarray:
    """Canny edge maps (scikit-image) [N,H,W] bool."""
    return np.stack([canny(x[0].double().cpu().numpy(), sigma=sigma) for x in images])


MEASURES = {"contrast": contrast}


@dataclass(frozen=True)
class Control:
    """A named direction of one site's generator: ``z + strength * direction``."""

    name: str
    site: int
    direction: torch.Tensor  # [noise_dim], unit norm

    def apply(self, z: torch.Tensor, strength: float) -> torch.Tensor:
        return z + strength * self.direction.to(z.device, z.dtype)


@torch.no_grad()
def _generate(gen: nn.Module, site: int, z: torch.Tensor, batch: int = 256) -> torch.Tensor:
    ids = torch.full((z.shape[0],), site, dtype=torch.long)
    return torch.cat([gen(ids[i:i + batch], z[i:i + batch]) for i in range(0, z.shape[0], batch)]).cpu()


def find_control(gen: nn.Module, site: int, name: str = "contrast", samples: int = 512,
                 generator: torch.Generator | None = None) -> Control:
    """The unit direction along which the named measure of generated samples grows
    fastest, by a least-squares fit of the measure on z over ``samples`` draws."""
    if name not in MEASURES:
        raise ValueError(f"unknown control '{name}': one of {sorted(MEASURES)}")
    if samples < 2 * gen.noise_dim:
        raise ValueError(f"find_control needs samples >= 2 x noise_dim ({2 * gen.noise_dim}), got {samples}")
    gen.eval()
    z = torch.randn(samples, gen.noise_dim, generator=generator)
    score = MEASURES[name](_generate(gen, site, z)).double()
    design = torch.cat([z.double(), torch.ones(samples, 1, dtype=torch.float64)], dim=1)
    coef = torch.linalg.lstsq(design, (score - score.mean())[:, None]).solution[:-1, 0]
    if not float(coef.norm()) > 0:
        raise ValueError(f"the generator's '{name}' does not vary with z: no direction to name")
    return Control(name, site, (coef / coef.norm()).float())


def traverse(gen: nn.Module, site: int, direction: torch.Tensor, z: torch.Tensor,
             strength: float) -> dict[str, float]:
    """Changes between G(z - s d) and G(z + s d): the named attribute (mean contrast
    change), foreground area (mean absolute change) and the edge map (1 - Dice)."""
    lo = _generate(gen, site, z - strength * direction)
    hi = _generate(gen, site, z + strength * direction)
    e_lo, e_hi = edge_maps(lo), edge_maps(hi)
    overlap = 2 * (e_lo & e_hi).sum() / max(int(e_lo.sum() + e_hi.sum()), 1)
    return {"contrast_change": float((contrast(hi) - contrast(lo)).mean()),
            "area_change": float((foreground_area(hi) - foreground_area(lo)).abs().mean()),
            "edge_change": float(1.0 - overlap)}


def disentanglement(gen: nn.Module, control: Control, samples: int = 64, strength: float = 2.0,
                    generator: torch.Generator | None = None) -> dict[str, dict[str, float]]:
    """The check: ``traverse`` along the named direction and along a random unit
    direction, on the same z. A good control changes its attribute far more than the
    random direction does, per unit of structural (area, edge) change."""
    gen.eval()
    z = torch.randn(samples, gen.noise_dim, generator=generator)
    rand = torch.randn(gen.noise_dim, generator=generator)
    out = {"named": traverse(gen, control.site, control.direction, z, strength),
           "random": traverse(gen, control.site, rand / rand.norm(), z, strength)}
    for row in out.values():
        row["contrast_per_edge_change"] = abs(row["contrast_change"]) / max(row["edge_change"], 1e-3)
    return out
