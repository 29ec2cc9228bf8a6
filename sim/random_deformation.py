"""Random spatial deformations of tissue label maps: new anatomies from the public bank.

SynthSeg's generative model deforms its label maps before rendering them (Billot et al.,
2023): a segmenter trained on a fixed set of maps otherwise learns those anatomies. Here
the bridge's segmenter S, trained on the 300 public maps of the default federation,
segmented renderings of its own training maps at Dice 0.79 and renderings of unseen
anatomy at 0.74 after 20,000 steps (the gap grew with training), so S was memorising
shapes. Deforming every drawn map afresh removes that ceiling at no privacy cost: the
inputs are public maps, the deformation's ranges are generic (the simulator's own subject
model, docs/data-layout.md, at 64 px), nothing is measured on private data.

One deformation per map, all parameters drawn from the caller's ``torch.Generator``:
a random affine (rotation, isotropic scale, shift) composed with a smooth random
displacement field (a coarse Gaussian grid upsampled bicubically), applied to the one-hot
map with bilinear sampling; the new label is the arg-max, so boundaries move by sub-pixel
amounts and no label value is invented. Outside the field of view is background.

Batched with torch's ``affine_grid``/``grid_sample`` rather than MONAI's ``Rand2DElastic``,
which transforms one image per call: S draws 16 maps per step for tens of thousands of
steps, and a per-image Python loop there costs more than S's own step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RandomDeformation:
    """Ranges of one random deformation (sizes in pixels of the map being deformed)."""

    rotation_rad: float = 0.15
    scale: float = 0.10          # isotropic scale drawn from 1 +- scale
    shift_px: float = 2.0
    elastic_px: float = 1.0      # std of each displacement component at the control points
    elastic_cells: int = 8       # control points per side

    def __post_init__(self) -> None:
        if min(self.rotation_rad, self.scale, self.shift_px, self.elastic_px) < 0 or self.scale >= 1:
            raise ValueError(f"RandomDeformation ranges must be >= 0 (scale < 1); got {self}")
        if self.elastic_cells < 2:
            raise ValueError(f"RandomDeformation.elastic_cells must be >= 2, got {self.elastic_cells}")


def _symmetric(n: int, bound: float, gen: torch.Generator) -> torch.Tensor:
    return (2.0 * torch.rand(n, generator=gen) - 1.0) * bound


def deform_label_maps(label_maps: torch.Tensor, gen: torch.Generator,
                      ranges: RandomDeformation = RandomDeformation()) -> torch.Tensor:
    """Deformed copies [N,H,W] int64 of integer label maps [N,H,W] (values >= 0, any label
    schema: the one-hot warp needs only the largest value present).

    Deterministic given ``gen``'s state; the input is not modified."""
    if label_maps.dim() != 3:
        raise ValueError(f"label maps must be [N,H,W], got shape {tuple(label_maps.shape)}")
    n, h, w = label_maps.shape
    if n == 0:
        return label_maps.long().clone()
    if int(label_maps.min()) < 0:
        raise ValueError("label maps must hold values >= 0")
    # classes above the largest present would be all-zero channels: the arg-max is the same
    num_classes = int(label_maps.max()) + 1
    grid = random_sampling_grid(n, h, w, gen, ranges)
    one_hot = F.one_hot(label_maps.long().cpu(), num_classes).permute(0, 3, 1, 2).float()
    warped = F.grid_sample(one_hot, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.argmax(dim=1)  # all-zero outside the view: arg-max 0, the background


def random_sampling_grid(n: int, h: int, w: int, gen: torch.Generator,
                         ranges: RandomDeformation = RandomDeformation()) -> torch.Tensor:
    """``grid_sample`` grids [n,H,W,2] (x, y in [-1, 1], align_corners=False) of n random
    deformations: output pixel -> where it reads the input. Draws from ``gen`` in a fixed
    order (angle, scale, shift x, shift y, elastic grid), so a seed gives one deformation."""
    angle = _symmetric(n, ranges.rotation_rad, gen)
    scale = 1.0 + _symmetric(n, ranges.scale, gen)
    shift = torch.stack([_symmetric(n, ranges.shift_px, gen) * 2.0 / w,
                         _symmetric(n, ranges.shift_px, gen) * 2.0 / h], dim=1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> input coordinates
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], dim=1),
                         torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    cells = ranges.elastic_cells
    coarse = torch.randn(n, 2, cells, cells, generator=gen) * ranges.elastic_px
    displacement = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    displacement = displacement * torch.tensor([2.0 / w, 2.0 / h])[None, :, None, None]
    return grid + displacement.permute(0, 2, 3, 1)
