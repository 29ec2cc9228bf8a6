"""red-gan: Red-GAN (Qasim et al. 2020) on dp-cgan: a passive segmenter in G's loss, and
rare-class rebalancing with synthetic pairs.

dp-cgan's G(label map, site) already is Red-GAN's generator (SPADE on the map, a global site
code). Red-GAN adds a third, passive player: a segmenter S, trained first, whose Dice-CE on
G's image against the map that conditioned it joins G's loss (``seg-weight``; 0 is plain
dp-cgan, the ablation). Synthetic pairs drawn from maps rich in a rare class (``rare-class``,
e.g. the simulator's ``lesion``; by name, from the run's label schema) then rebalance a
downstream segmenter's training set (bench/redgan.py). Design, options and measurements:
docs/recipes/red-gan.md.

PRIVACY ARGUMENT (DP.md "Which networks need DP-SGD", "Conditioning"). Unit: the patient.
  1. D reads private records exactly as in dp-cgan (its points 1-2, 4-5 hold unchanged):
     only through ``DPModule`` (Poisson sampling, per-patient clipping, noise, accounting).
  2. ``seg-train = "public"`` (default): S is trained ONLY on random-contrast renderings of
     public label maps (round 1, the run's seed, so every site computes the same S from the
     same broadcast weights). No private record reaches S: it costs no privacy, may travel,
     and the plan is dp-cgan's (no extra accountant entry).
  3. ``seg-train = "private"``: S is ALSO fine-tuned on the site's real (image, map) pairs.
     Then S is private: S and D form ONE private module (``players``); a record's loss is
     D's real term + S's Dice-CE on that record, its gradient over D's and S's parameters
     is clipped TOGETHER to max-grad-norm, one noise draw, ONE accountant step per step.
     No second mechanism: the site's ledger holds exactly ``steps`` entries a round, and
     the epsilon is the one Opacus reports for that history (tests/models/test_redgan.py).
  4. G's step reads public maps, the site id, fresh noise, D's released weights and S's
     (public, or released DP) weights, frozen: post-processing. ``DPModule.frozen`` refuses
     un-noised private state on the private module (D, and S in the private mode); a test
     proves G's update identical for two different private data sets.
  5. The rare-class draw picks public maps holding the class: a function of the public bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn

from medgen.config import ConfigError
from medgen.models.blocks import one_hot_labels
from medgen.models.dp_cgan import CGANOptions, ConditionalGAN, DPConditionalGAN
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.segmenter import SegmenterSettings, fit_segmenter, public_batches
from medgen.privacy.dp_step import DPModule

SEG_MODES = ("public", "private")


class RedGANModel(ConditionalGAN):
    """``gen`` (shared), ``disc`` (private, local) and ``seg``: the passive player S."""

    def __init__(self, gen: nn.Module, disc: nn.Module, seg: nn.Module):
        super().__init__(gen, disc)
        self.seg = seg


class Players(nn.Module):
    """D and S as the ONE private module of ``seg-train = "private"`` (point 3); its
    forward is D's, so dp-cgan's D step and G step read it unchanged."""

    def __init__(self, disc: nn.Module, seg: nn.Module):
        super().__init__()
        self.disc = disc
        self.seg = seg

    def forward(self, image: torch.Tensor, labels: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.disc(image, labels, site)


def build_passive_segmenter(width: int, num_classes: int, seed: int) -> nn.Module:
    """A small MONAI UNet, InstanceNorm without affine and LeakyReLU: every layer has an
    Opacus per-sample-gradient rule, so the private mode can DP-train it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(spatial_dims=2, in_channels=1, out_channels=num_classes,
                    channels=(width, 2 * width, 4 * width), strides=(2, 2), num_res_units=0,
                    norm="instance", act=("leakyrelu", {"negative_slope": 0.2}))


@dataclass(frozen=True)
class RedGANOptions(CGANOptions):
    seg_weight: float = option(1.0, at_least=0)  # S's Dice-CE in G's loss; 0 = dp-cgan
    seg_train: str = option("public", choices=SEG_MODES)  # privacy argument, points 2-3
    seg_width: int = option(8, at_least=1)
    seg_pretrain_steps: int = option(200, at_least=0)  # round 1, public renderings only
    rare_class: str = ""  # a class name of label-names; "" = draw public maps uniformly
    rare_fraction: float = option(0.5, at_least=0, at_most=1)  # of G's public draws


class RedGAN(DPConditionalGAN):
    """dp-cgan + a passive segmenter in G's loss + rare-class draws; see the docstring."""

    name: ClassVar[str] = "red-gan"
    Options: ClassVar[type[RecipeOptions]] = RedGANOptions

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        self.private_modules = ("disc", "seg") if o.seg_train == "private" else ("disc",)
        self.shared_prefixes = tuple(self.shared_prefixes) + ("seg.",)  # public or a DP release
        if o.rare_class and o.rare_class not in self.label_names:
            raise ConfigError(f"options.rare-class '{o.rare_class}' is not a class of label-names "
                              f"({','.join(self.label_names)}); name one, e.g. lesion in a federation "
                              "built with --lesion-rate")
        self.rare_index = self.label_names.index(o.rare_class) if o.rare_class else None
        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)  # per-record Dice, pixel-mean CE

    def build(self) -> RedGANModel:
        base = super().build()
        seg = build_passive_segmenter(self.options.seg_width, self.num_classes, self.config.seed + 1)
        return RedGANModel(base.gen, base.disc, seg)

    def private_net(self, model: RedGANModel) -> nn.Module:
        return Players(model.disc, model.seg) if self.options.seg_train == "private" else model.disc

    def train_local(self, model: RedGANModel, ctx: RoundContext) -> dict[str, float]:
        if ctx.rounds_done == 0 and self.options.seg_pretrain_steps > 0:
            self.pretrain_segmenter(model, ctx.public)
        model.seg.requires_grad_(self.options.seg_train == "private")
        try:
            return super().train_local(model, ctx)
        finally:
            model.seg.requires_grad_(False)

    def pretrain_segmenter(self, model: RedGANModel, public: PublicData) -> None:
        """S on random-contrast renderings of PUBLIC maps, the run's seed (point 2)."""
        settings = SegmenterSettings(steps=self.options.seg_pretrain_steps, batch_size=8, lr=3e-3)
        model.seg.requires_grad_(True)
        fit_segmenter(model.seg, public_batches(public.label_maps.long(), settings.batch_size,
                                                num_classes=self.num_classes), settings, seed=self.config.seed + 1)
        model.seg.train()  # InstanceNorm without running stats: train and eval agree

    # -- dp-cgan's extension points ------------------------------------------------------
    def extra_real_loss(self, d: DPModule, images: torch.Tensor, labels: torch.Tensor):
        """Private mode: S's per-record Dice-CE on the real pair, inside the joint clip (point 3)."""
        if self.options.seg_train != "private":
            return 0.0
        return self.seg_loss(d.plain.seg(images), labels[:, None].long())

    def extra_gen_loss(self, model: RedGANModel, fake: torch.Tensor, one_hot: torch.Tensor):
        """The passive player: S's Dice-CE on G's image against its conditioning map (point 4)."""
        if self.options.seg_weight <= 0:
            return 0.0
        return self.options.seg_weight * self.seg_loss(model.seg(fake), one_hot.argmax(dim=1, keepdim=True))

    def _public_conditions(self, public: PublicData, site_index: int, n: int, rng, device):
        """Public maps for G and D's fake term; a ``rare-fraction`` of them hold the rare class."""
        if self.rare_index is None:
            return super()._public_conditions(public, site_index, n, rng, device)
        maps = public.draw(n, generator=rng)
        holders = (public.label_maps == self.rare_index).flatten(1).any(dim=1).nonzero()[:, 0]
        if holders.numel() == 0:
            raise ValueError(f"options.rare-class '{self.options.rare_class}': no public label map "
                             "holds it; build the federation with lesions (--lesion-rate) or unset it")
        swap = torch.rand(n, generator=rng) < self.options.rare_fraction
        picks = holders[torch.randint(0, holders.numel(), (n,), generator=rng)]
        maps = torch.where(swap[:, None, None], public.label_maps[picks], maps)
        return (one_hot_labels(maps, self.num_classes).to(device),
                torch.full((n,), site_index, dtype=torch.long, device=device))
