"""Tissue segmenters (MONAI UNet): contrast-agnostic (public data only) and per-image-set.

Two uses, one network and one training loop:
- ``train_contrast_agnostic``: the bridge's segmenter S. It sees ONLY images rendered
  with random contrasts from public label maps (medgen.sim.random_contrast) and,
  optionally, generated images with the public label maps that conditioned them. Neither
  is private data, so S costs no privacy and may travel freely (DP.md "Conditioning").
- ``train_on_images``: a segmenter fitted to a given labelled image set; evaluation uses
  it on held-out data (the target-site segmenters of evaluation/translation.py) and on a
  site's data (evaluation/adaptation.py). Whoever calls it on private data owns that
  privacy decision; nothing trained that way may be shipped as part of a recipe.

InstanceNorm, not BatchNorm: predictions do not depend on batch composition, and the
per-image normalisation helps contrast invariance.

The number of output classes is the run's label schema (``RunConfig.num_classes``, from the
``label-names`` key): recipes pass it; a caller that passes none gets the run config's
default schema.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medgen.config import RunConfig
from medgen.sim.random_contrast import RandomContrast, render_random_contrast
from medgen.sim.random_deformation import RandomDeformation, deform_label_maps

BatchFn = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
"""Draws one training batch: (images [B,1,H,W] in [-1,1], labels [B,H,W] int64)."""


@dataclass(frozen=True)
class SegmenterSettings:
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    channels: tuple[int, ...] = (16, 32, 64, 128)
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"SegmenterSettings needs steps >= 1, batch_size >= 1, lr > 0; got {self}")


def schema_classes(num_classes: int | None) -> int:
    """``num_classes``, or the run config's default schema's class count when None."""
    k = RunConfig().num_classes if num_classes is None else int(num_classes)
    if k < 2:
        raise ValueError(f"a segmenter needs at least 2 classes, got {k}")
    return k


def build_segmenter(settings: SegmenterSettings = SegmenterSettings(), seed: int = 0,
                    members: int = 1, num_classes: int | None = None) -> nn.Module:
    """A 2D MONAI UNet, 1 input channel -> ``num_classes`` logits (the label schema's class
    count), deterministic init; with ``members`` > 1 a ``SegmenterEnsemble`` of that many
    (seeds seed, seed + 1, ...)."""
    from monai.networks.nets import UNet

    k = schema_classes(num_classes)
    if members < 1:
        raise ValueError(f"a segmenter needs members >= 1, got {members}")
    if members > 1:
        return SegmenterEnsemble([build_segmenter(settings, seed + i, num_classes=k) for i in range(members)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(spatial_dims=2, in_channels=1, out_channels=k,
                    channels=settings.channels, strides=(2,) * (len(settings.channels) - 1),
                    num_res_units=1, norm="instance")


class SegmenterEnsemble(nn.Module):
    """Several segmenters as one (a deep ensemble). Its logits are the log of the members'
    mean softmax, so everything that applies softmax or argmax to a segmenter's output
    (``predict_probs``, Dice-CE) sees the averaged probabilities unchanged. Members trained
    differently (e.g. with and without label-map deformation) err in different places;
    averaging them is the cheapest accuracy there is at no privacy cost."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least 2 members")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([F.log_softmax(member(x), dim=1) for member in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))


def fit_segmenter(net: nn.Module, draw_batch: BatchFn, settings: SegmenterSettings,
                  seed: int) -> dict[str, float]:
    """Train ``net`` in place (AdamW, cosine decay, cross-entropy + Dice); returns the last loss."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=settings.dice_weight)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps)
    net.train()
    loss = torch.zeros(())
    for _ in range(settings.steps):
        images, labels = draw_batch(gen)
        flip = torch.rand(images.shape[0], generator=gen) < 0.5  # left-right symmetric anatomy
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
        loss = loss_fn(net(images), labels[:, None].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    return {"loss": float(loss.detach())}


def public_batches(label_maps: torch.Tensor, batch_size: int,
                   ranges: RandomContrast = RandomContrast(),
                   generated: tuple[torch.Tensor, torch.Tensor] | None = None,
                   generated_fraction: float = 0.25,
                   deformation: RandomDeformation | None = None,
                   num_classes: int | None = None) -> BatchFn:
    """Batches of random-contrast renderings of public maps (each map freshly deformed
    when ``deformation`` is given), optionally mixed with (generated images, the public maps
    that conditioned them). ``num_classes``: the label schema's class count."""
    k = schema_classes(num_classes)
    if label_maps.dim() != 3 or label_maps.shape[0] < 1:
        raise ValueError(f"public label maps must be [M>=1,H,W], got {tuple(label_maps.shape)}")
    if generated is not None and generated[0].shape[0] != generated[1].shape[0]:
        raise ValueError("generated images and their label maps differ in count")
    n_generated = int(round(batch_size * generated_fraction)) if generated is not None else 0

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, label_maps.shape[0], (batch_size - n_generated,), generator=gen)
        labels = label_maps[index].long()
        if deformation is not None:
            labels = deform_label_maps(labels, gen, deformation)
        images = render_random_contrast(labels, gen, ranges, num_classes=k)
        if n_generated:
            pick = torch.randint(0, generated[0].shape[0], (n_generated,), generator=gen)
            images = torch.cat([images, generated[0][pick].float()])
            labels = torch.cat([labels, generated[1][pick].long()])
        return images, labels

    return draw


def image_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                  augment: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None
                  ) -> BatchFn:
    """Minibatches drawn with replacement from a labelled image set, optionally augmented
    (``augment(images, labels, gen) -> images``; labels are never changed)."""
    if images.dim() != 4 or images.shape[1] != 1 or labels.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"need images [N,1,H,W] and labels [N,H,W]; got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x, y = images[index].float(), labels[index].long()
        return (augment(x, y, gen) if augment is not None else x), y

    return draw


def train_contrast_agnostic(label_maps: torch.Tensor, settings: SegmenterSettings = SegmenterSettings(),
                            seed: int = 0, generated: tuple[torch.Tensor, torch.Tensor] | None = None,
                            ranges: RandomContrast = RandomContrast(),
                            deformation: RandomDeformation | None = None,
                            num_classes: int | None = None) -> nn.Module:
    """S, trained on public renderings (plus generated pairs): zero privacy cost."""
    net = build_segmenter(settings, seed, num_classes=num_classes)
    fit_segmenter(net, public_batches(label_maps, settings.batch_size, ranges, generated,
                                      deformation=deformation, num_classes=num_classes), settings, seed + 1)
    return net


def train_on_images(images: torch.Tensor, labels: torch.Tensor,
                    settings: SegmenterSettings = SegmenterSettings(), seed: int = 0,
                    augment=None, num_classes: int | None = None) -> nn.Module:
    net = build_segmenter(settings, seed, num_classes=num_classes)
    fit_segmenter(net, image_batches(images, labels, settings.batch_size, augment), settings, seed + 1)
    return net


@torch.no_grad()
def predict_probs(net: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Softmax tissue probabilities [N,K,H,W] (K: the segmenter's classes) for images
    [N,1,H,W] in [-1, 1]."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [N,1,H,W], got {tuple(images.shape)}")
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    try:
        out = [F.softmax(net(images[i:i + batch_size].to(device).float()), dim=1).cpu()
               for i in range(0, images.shape[0], batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, output_classes(net), *images.shape[-2:])


def output_classes(net: nn.Module) -> int:
    """The number of classes a segmenter (or an ensemble of them) predicts."""
    if isinstance(net, SegmenterEnsemble):
        return output_classes(net.members[0])
    return int(net.out_channels)


def predict_labels(net: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Integer tissue maps [N,H,W]."""
    return predict_probs(net, images, batch_size).argmax(dim=1)
