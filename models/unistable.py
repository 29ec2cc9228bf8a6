"""unistable (survey [7], Elaff et al. 2017) as an option of S's public pretraining:
high-contrast renderings of the public label maps for tissue segmentation.

unistable synthesises contrast-enhanced images whose tissue intensity distributions no
longer overlap, so a segmenter sees sharp, well-separated tissue boundaries. In medgen the
segmenter S (models/segmenter.py) already trains only on random-contrast renderings of
public label maps (sim/random_contrast.py); this module adds the unistable rendering:
tissue means spread apart on a ladder (a random order per image, so S stays contrast
agnostic), little partial volume, blur, bias or noise. ``medgen pretrain-segmenter
--high-contrast F`` renders a fraction F of every batch this way (the rest as before).

Privacy argument (numbered; the whole option costs epsilon 0):
  1. Inputs: the public bank's label maps (``public/labels``), random deformations of
     them and random numbers. No site's image, label map or statistic is read, here or in
     ``models/segmenter_pretrain.py``.
  2. The renderer and the mixed batches are functions of (1) alone, so S trained on them
     is public data processed: DP.md "Conditioning" / post-processing of nothing private.
  3. S ships to sites as ``options.seg-init`` in round 1's weights; nothing flows back
     from a site into S through this option, so no site's ledger is charged.
  4. Hence no Flower simulation test is added for it: it is the coordinator's offline,
     public pretraining that ``options.seg-init`` already ships (tests/models/
     test_bridge_translate.py covers that path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medgen.models.segmenter import BatchFn, schema_classes
from medgen.sim.random_contrast import (RandomContrast, gaussian_blur, render_random_contrast,
                                        robust_normalise)
from medgen.sim.random_deformation import RandomDeformation, deform_label_maps


@dataclass(frozen=True)
class HighContrast:
    """Ranges of the high-contrast rendering. Tissue means sit on a ladder of equally
    spaced levels in ``levels`` (background below it), shuffled per image and jittered by
    at most ``jitter`` of one rung, so any two classes differ by >= (1 - 2 jitter) rungs."""

    levels: tuple[float, float] = (0.25, 1.0)
    background: tuple[float, float] = (0.0, 0.03)
    jitter: float = 0.15
    partial_volume_px: tuple[float, float] = (0.2, 0.5)
    texture: tuple[float, float] = (0.0, 0.02)
    bias: float = 0.1
    blur_px: tuple[float, float] = (0.0, 0.3)
    noise: tuple[float, float] = (0.0, 0.01)

    def __post_init__(self) -> None:
        if not 0 <= self.jitter < 0.5:
            raise ValueError(f"HighContrast.jitter must be in [0, 0.5) of a rung, got {self.jitter}")
        for name in ("levels", "background", "partial_volume_px", "texture", "blur_px", "noise"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"HighContrast.{name} must be a range 0 <= low <= high, got {(lo, hi)}")


def _uniform(n: int, bounds: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=gen)


def render_high_contrast(label_maps: torch.Tensor, gen: torch.Generator,
                         ranges: HighContrast = HighContrast(), *, num_classes: int) -> torch.Tensor:
    """Images [N,1,H,W] in [-1, 1] from label maps [N,H,W] (0..num_classes-1, class 0 the
    background): separated tissue means in a random order, light texture, bias, blur and
    noise, then the client's normalisation. Deterministic given ``gen``'s state.
    ``num_classes`` comes from the run's label schema (no brain default)."""
    if label_maps.dim() != 3:
        raise ValueError(f"label maps must be [N,H,W], got shape {tuple(label_maps.shape)}")
    if num_classes < 2 or (label_maps.numel() and int(label_maps.max()) >= num_classes):
        raise ValueError(f"label maps must hold values 0..{num_classes - 1} with num_classes >= 2")
    n, size, tissues = label_maps.shape[0], label_maps.shape[-1], num_classes - 1
    one_hot = F.one_hot(label_maps.long().cpu(), num_classes).permute(0, 3, 1, 2).float()
    soft = gaussian_blur(one_hot, _uniform(n, ranges.partial_volume_px, gen))
    lo, hi = ranges.levels
    rung = (hi - lo) / max(tissues - 1, 1)
    ladder = torch.linspace(lo, hi, tissues) if tissues > 1 else torch.tensor([hi])
    order = torch.argsort(torch.rand(n, tissues, generator=gen), dim=1)  # a random permutation per image
    jitter = (torch.rand(n, tissues, generator=gen) * 2 - 1) * ranges.jitter * rung
    means = torch.cat([_uniform(n, ranges.background, gen)[:, None], ladder[order] + jitter], dim=1)
    gains = _uniform(n * num_classes, ranges.texture, gen).reshape(n, num_classes)
    gains[:, 0] = 0.0
    texture = F.interpolate(torch.randn(n, 1, max(4, size // 4), max(4, size // 4), generator=gen),
                            size=(size, size), mode="bicubic", align_corners=True)
    image = (soft * (means[:, :, None, None] + gains[:, :, None, None] * texture)).sum(1, keepdim=True)
    field = F.interpolate(torch.randn(n, 1, 3, 3, generator=gen), size=(size, size), mode="bicubic",
                          align_corners=True)
    image = image.clamp(min=0.0) * torch.exp(_uniform(n, (-ranges.bias, ranges.bias), gen)[:, None, None, None] * field)
    image = gaussian_blur(image, _uniform(n, ranges.blur_px, gen))
    image = image + _uniform(n, ranges.noise, gen)[:, None, None, None] * torch.randn(image.shape, generator=gen)
    return robust_normalise(image)


def tissue_contrast(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per image: the smallest gap between two classes' mean intensities divided by the
    mean within-class standard deviation (a contrast-to-noise ratio of the least separated
    pair; classes absent from an image are skipped). [N] float."""
    out = []
    for x, y in zip(images[:, 0].float(), labels.long()):
        stats = [(x[y == c].mean(), x[y == c].std(unbiased=False)) for c in range(num_classes) if int((y == c).sum()) > 1]
        if len(stats) < 2:
            out.append(torch.tensor(float("nan")))
            continue
        means = torch.stack([m for m, _ in stats])
        gaps = (means[:, None] - means[None]).abs() + torch.eye(len(stats)) * 1e9
        out.append(gaps.min() / (torch.stack([s for _, s in stats]).mean() + 1e-3))
    return torch.stack(out)


def unistable_batches(label_maps: torch.Tensor, batch_size: int, fraction: float,
                      ranges: RandomContrast = RandomContrast(), high: HighContrast = HighContrast(),
                      deformation: RandomDeformation | None = None,
                      num_classes: int | None = None) -> BatchFn:
    """Batches of public renderings: round(fraction * batch_size) high-contrast
    (``render_high_contrast``), the rest random-contrast (``render_random_contrast``),
    each map freshly deformed when ``deformation`` is given."""
    k = schema_classes(num_classes)
    if not 0 <= fraction <= 1:
        raise ValueError(f"the high-contrast fraction must be in [0, 1], got {fraction}")
    if label_maps.dim() != 3 or label_maps.shape[0] < 1:
        raise ValueError(f"public label maps must be [M>=1,H,W], got {tuple(label_maps.shape)}")
    n_high = int(round(batch_size * fraction))

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, label_maps.shape[0], (batch_size,), generator=gen)
        labels = label_maps[index].long()
        if deformation is not None:
            labels = deform_label_maps(labels, gen, deformation)
        parts = []
        if n_high:
            parts.append(render_high_contrast(labels[:n_high], gen, high, num_classes=k))
        if batch_size - n_high:
            parts.append(render_random_contrast(labels[n_high:], gen, ranges, num_classes=k))
        return torch.cat(parts), labels

    return draw
