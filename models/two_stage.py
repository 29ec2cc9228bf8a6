"""two-stage: two-stage generation (Andreini et al. 2019) as a federated DP recipe.

Stage 1, a label-map GAN: M(z) -> a K-class map (the run's label schema), judged by a map
discriminator E against the sites' real label maps. Stage 2, dp-cgan: G(map, site) -> image.
Synthetic pairs are (M(z), G(M(z), site)): no public label map is needed to make them
(``sample_pairs``). During training G and D's fake term condition on M's maps
(``stage2-maps = "generated"``, default) or on the public bank (``"public"``, dp-cgan's
behaviour); M and E always train. Design and measurements: docs/recipes/two-stage.md.

PRIVACY ARGUMENT (DP.md "Which networks need DP-SGD", "Conditioning"). Unit: the patient.
  1. E reads the site's real label maps, D the site's real (image, map) pairs: both are
     private. They form ONE private module (``Critics``): a record's loss is D's real term
     + E's real term on that record's map; its gradient over D's and E's parameters is
     clipped TOGETHER, one noise draw, ONE accountant step per step (no second mechanism:
     the ledger holds exactly ``steps`` entries a round; tests/models/test_two_stage.py
     checks the epsilon against Opacus' accountant for that history).
  2. D's and E's fake terms read only M's and G's outputs (fresh noise, released weights)
     and public maps; their gradients are added after clipping and noise: post-processing.
  3. M and G update from fresh noise, the site id, public maps and the frozen, released
     critics (``DPModule.frozen``): post-processing; a test proves M's and G's update
     identical for two different private data sets given the same critics.
  4. dp-cgan's scanner-moment release (its point 4) is unchanged when enabled.
  5. Sampling pairs: noise -> M -> G, post-processing of DP releases at no further cost.
M's one-hot output is straight-through (hard argmax forward, softmax gradient), so E sees
hard maps from both sides and cannot tell real from fake by softness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medgen.models.blocks import DownBlock, group_count, one_hot_labels
from medgen.models.dp_cgan import CGANOptions, ConditionalGenerator, DPConditionalGAN, disc_loss, gen_loss
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import PublicData
from medgen.privacy.dp_step import DPModule


class MapGenerator(nn.Module):
    """z -> S/8 features -> 3 x (upsample, conv, GroupNorm, LeakyReLU) -> K logits at S."""

    def __init__(self, image_size: int, noise_dim: int, width: int, num_classes: int):
        super().__init__()
        self.noise_dim, self.base = noise_dim, image_size // 8
        chans = [4 * width, 2 * width, width, width]
        self.project = nn.Linear(noise_dim, chans[0] * self.base * self.base)
        self.ups = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                               nn.Conv2d(chans[i], chans[i + 1], 3, padding=1),
                                               nn.GroupNorm(group_count(chans[i + 1]), chans[i + 1]),
                                               nn.LeakyReLU(0.2)) for i in range(3))
        self.out = nn.Conv2d(width, num_classes, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], -1, self.base, self.base)
        for up in self.ups:
            x = up(x)
        soft = F.softmax(self.out(x), dim=1)
        hard = F.one_hot(soft.argmax(dim=1), soft.shape[1]).permute(0, 3, 1, 2).to(soft.dtype)
        return hard + soft - soft.detach()  # straight-through one-hot


class MapDiscriminator(nn.Module):
    """One-hot map -> stride-2 GroupNorm stages to 4x4 -> one logit per patch."""

    def __init__(self, image_size: int, width: int, num_classes: int):
        super().__init__()
        stages, in_ch, out_ch, size = [], num_classes, width, image_size
        while size > 4:
            stages.append(DownBlock(in_ch, out_ch, norm=bool(stages)))
            in_ch, out_ch, size = out_ch, min(2 * out_ch, 4 * width), size // 2
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(in_ch, 1, 1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(maps))[:, 0]


class TwoStageGenerator(ConditionalGenerator):
    """dp-cgan's G plus stage 1 (``maps``): one ``gen.*`` subtree, one optimizer, shared."""

    def __init__(self, *args, map_width: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.maps = MapGenerator(self.image_size, self.noise_dim, map_width, kwargs["num_classes"])


class Critics(nn.Module):
    """D and E: the ONE private module (point 1); its forward is D's."""

    def __init__(self, disc: nn.Module, map_disc: nn.Module):
        super().__init__()
        self.disc = disc
        self.map_disc = map_disc

    def forward(self, image: torch.Tensor, labels: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.disc(image, labels, site)


class TwoStageModel(nn.Module):
    def __init__(self, gen: TwoStageGenerator, disc: nn.Module, map_disc: nn.Module):
        super().__init__()
        self.gen = gen
        self.disc = disc
        self.map_disc = map_disc


@dataclass(frozen=True)
class TwoStageOptions(CGANOptions):
    map_width: int = option(16, at_least=1)
    map_disc_width: int = option(16, at_least=1)
    map_weight: float = option(1.0, at_least=0)  # M's adversarial loss in the shared G step
    stage2_maps: str = option("generated", choices=("generated", "public"))


class TwoStageGAN(DPConditionalGAN):
    """Label-map GAN (stage 1) + dp-cgan (stage 2), critics DP-trained jointly."""

    name: ClassVar[str] = "two-stage"
    Options: ClassVar[type[RecipeOptions]] = TwoStageOptions
    private_modules: ClassVar[tuple[str, ...]] = ("disc", "map_disc")

    def build(self) -> TwoStageModel:
        o, size = self.options, self.config.image_size
        base = super().build()  # D (and the seed discipline) from dp-cgan
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed + 2)
            gen = TwoStageGenerator(size, self.num_sites, o.gen_width, o.noise_dim, o.site_dim, o.spade_hidden,
                                    o.spade_kernel, o.psf_radius, o.upsample, num_classes=self.num_classes,
                                    map_width=o.map_width)
            map_disc = MapDiscriminator(size, o.map_disc_width, self.num_classes)
        return TwoStageModel(gen, base.disc, map_disc)

    def private_net(self, model: TwoStageModel) -> nn.Module:
        return Critics(model.disc, model.map_disc)

    def generate_maps(self, model: TwoStageModel, n: int, rng: torch.Generator | None, device) -> torch.Tensor:
        """Stage 1: n straight-through one-hot maps [n,K,S,S] from fresh noise."""
        z = torch.randn(n, self.options.noise_dim, generator=rng).to(device)
        return model.gen.maps(z)

    # -- dp-cgan's extension points ------------------------------------------------------
    def extra_real_loss(self, d: DPModule, images: torch.Tensor, labels: torch.Tensor):
        """E's real term on the record's own label map, inside the joint clip (point 1)."""
        real = one_hot_labels(labels, self.num_classes).float()
        return disc_loss(d.plain.map_disc(real), real=True, kind=self.options.loss).mean()

    def extra_fake_loss(self, model: TwoStageModel, d: DPModule, rng, device):
        """E's fake term on M's maps (fixed count; added after noise, point 2)."""
        with torch.no_grad():
            fake = self.generate_maps(model, self.config.batch_size, rng, device)
        return disc_loss(d.plain.map_disc(fake), real=False, kind=self.options.loss).mean()

    def extra_gen_loss(self, model: TwoStageModel, fake: torch.Tensor, one_hot: torch.Tensor):
        """M's adversarial loss through the frozen, released E (point 3)."""
        if self.options.map_weight <= 0:
            return 0.0
        maps = self.generate_maps(model, self.config.batch_size, self._rng, fake.device)
        return self.options.map_weight * gen_loss(model.map_disc(maps), self.options.loss).mean()

    def _public_conditions(self, public: PublicData, site_index: int, n: int, rng, device):
        """Stage 2's conditioning maps: M's (detached) or the public bank's."""
        if self.options.stage2_maps == "public":
            return super()._public_conditions(public, site_index, n, rng, device)
        model = self._model
        with torch.no_grad():
            maps = self.generate_maps(model, n, rng, device).detach()
        return maps, torch.full((n,), site_index, dtype=torch.long, device=device)

    # dp-cgan's steps, told which model's stage 1 the hooks above read, and the round stream
    def disc_step(self, model: TwoStageModel, d: DPModule, *args, **kwargs) -> float:
        self._model = model
        return super().disc_step(model, d, *args, **kwargs)

    def gen_step(self, model: TwoStageModel, d: DPModule, opt_g, public, site_index, rng, device):
        self._model, self._rng = model, rng
        return super().gen_step(model, d, opt_g, public, site_index, rng, device)

    @torch.no_grad()
    def sample_pairs(self, model: TwoStageModel, n: int, site_index: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [n,1,S,S] in [-1,1], label maps [n,S,S]) from noise alone (point 5)."""
        with self.inference(model) as device:
            maps = self.generate_maps(model, n, generator, device).argmax(dim=1).cpu()
        return self.sample(model, maps, site_index, generator), maps
