"""The evaluation networks the project trains itself (no downloads), and their training.

Both are trained on ``heldout/fit`` real images only (subjects no site trains on), and
neither is ever shown generated images during training.

- ``FeatureNet`` ("medgenenc-v1"): a small CNN encoder whose pooled ``feature_dim``
  vector is the representation for FD/KID. Its training objective is multi-task so the
  features see both what the image depicts and how it was acquired: site classification
  (scanner style), per-tissue area fractions regressed from the pooled vector (global
  anatomy), and a coarse segmentation from the last feature map (layout of the anatomy).
- ``SiteClassifier``: a separate small CNN, K-way site classification; its accuracy on
  generated images answers "does G(z, site=k) look like site k?".

GroupNorm, not BatchNorm: outputs do not depend on batch composition, so features of a
generated batch do not shift with batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medgen.config import RunConfig


def _classes(num_classes: int | None) -> int:
    """The label schema's class count; None: the run config's default schema."""
    return RunConfig().num_classes if num_classes is None else int(num_classes)


@dataclass(frozen=True)
class TrainSettings:
    """Everything that changes the trained weights (part of the cache key)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    widths: tuple[int, ...] = (16, 32, 64, 64)
    feature_dim: int = 64
    seg_weight: float = 1.0
    fraction_weight: float = 10.0
    flip: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def _encoder(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 1
    for width in widths:  # each block halves the resolution
        layers += [nn.Conv2d(in_ch, width, 3, stride=2, padding=1),
                   nn.GroupNorm(min(8, width), width), nn.SiLU(),
                   nn.Conv2d(width, width, 3, padding=1),
                   nn.GroupNorm(min(8, width), width), nn.SiLU()]
        in_ch = width
    return nn.Sequential(*layers)


class FeatureNet(nn.Module):
    def __init__(self, num_sites: int, widths: tuple[int, ...] = (16, 32, 64, 64),
                 feature_dim: int = 64, num_classes: int | None = None):
        super().__init__()
        num_classes = _classes(num_classes)  # the tissue heads: one output per schema class
        self.encoder = _encoder(widths)
        self.project = nn.Linear(widths[-1], feature_dim)
        self.site_head = nn.Linear(feature_dim, num_sites)
        self.fraction_head = nn.Linear(feature_dim, num_classes)
        self.seg_head = nn.Conv2d(widths[-1], num_classes, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.encoder(images)
        feats = self.project(fmap.mean(dim=(2, 3)))
        hidden = F.silu(feats)
        return feats, self.site_head(hidden), self.fraction_head(hidden), self.seg_head(fmap)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """Feature vectors [N, feature_dim] for images [N,1,H,W] in [-1, 1]."""
        self.eval()
        return torch.cat([self(images[i:i + batch_size])[0] for i in range(0, len(images), batch_size)])


class SiteClassifier(nn.Module):
    def __init__(self, num_sites: int, widths: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        self.encoder = _encoder(widths)
        self.head = nn.Linear(widths[-1], num_sites)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images).mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        self.eval()
        return torch.cat([self(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def tissue_fractions(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Area fraction of each class of the label schema per label map: [N, num_classes]."""
    return F.one_hot(labels.long(), _classes(num_classes)).float().mean(dim=(1, 2))


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, site_ids: torch.Tensor,
                      num_sites: int, settings: TrainSettings, seed: int,
                      num_classes: int | None = None) -> FeatureNet:
    """Multi-task training on real held-out fit images [N,1,H,W], labels [N,H,W], site ids [N];
    ``num_classes``: the run's label schema (None: the run config's default)."""
    _check_inputs(images, site_ids, num_sites, labels)
    num_classes = _classes(num_classes)
    with torch.random.fork_rng(devices=[]):  # deterministic init without touching global RNG
        torch.manual_seed(seed)
        net = FeatureNet(num_sites, settings.widths, settings.feature_dim, num_classes)
    scale = 2 ** len(settings.widths)
    coarse = F.interpolate(F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float(),
                           scale_factor=1 / scale, mode="area").argmax(1)  # majority class per cell
    fractions = tissue_fractions(labels, num_classes)

    def loss_fn(batch: torch.Tensor, idx: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        target_seg = torch.where(flipped[:, None, None], coarse[idx].flip(-1), coarse[idx])
        _, site_logits, frac_pred, seg_logits = net(batch)
        return (F.cross_entropy(site_logits, site_ids[idx])
                + settings.fraction_weight * F.mse_loss(frac_pred.softmax(1), fractions[idx])
                + settings.seg_weight * F.cross_entropy(seg_logits, target_seg))

    _fit(net, images, loss_fn, settings, seed)
    return net.eval()


def train_site_classifier(images: torch.Tensor, site_ids: torch.Tensor, num_sites: int,
                          settings: TrainSettings, seed: int) -> SiteClassifier:
    _check_inputs(images, site_ids, num_sites)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SiteClassifier(num_sites, settings.widths)

    def loss_fn(batch: torch.Tensor, idx: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(batch), site_ids[idx])

    _fit(net, images, loss_fn, settings, seed + 1)
    return net.eval()


def _fit(net: nn.Module, images: torch.Tensor, loss_fn, settings: TrainSettings, seed: int) -> None:
    """AdamW with cosine decay; minibatches and flips drawn from a private seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps)
    net.train()
    batch = min(settings.batch_size, len(images))
    for _ in range(settings.steps):
        idx = torch.randperm(len(images), generator=gen)[:batch]
        flipped = (torch.rand(batch, generator=gen) < 0.5) & settings.flip
        x = torch.where(flipped[:, None, None, None], images[idx].flip(-1), images[idx])
        loss = loss_fn(x, idx, flipped)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()


def _check_inputs(images: torch.Tensor, site_ids: torch.Tensor, num_sites: int,
                  labels: torch.Tensor | None = None) -> None:
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [N,1,H,W], got {tuple(images.shape)}")
    side = images.shape[-1]
    if images.shape[-2] != side or side % 16:
        raise ValueError(f"images must be square with a side divisible by 16, got {tuple(images.shape[-2:])}")
    if site_ids.shape != (images.shape[0],):
        raise ValueError(f"site_ids must be [N]={images.shape[0]}, got {tuple(site_ids.shape)}")
    if int(site_ids.min()) < 0 or int(site_ids.max()) >= num_sites:
        raise ValueError(f"site ids must be in 0..{num_sites - 1}")
    if labels is not None and labels.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"labels must be [N,H,W] matching images, got {tuple(labels.shape)}")
