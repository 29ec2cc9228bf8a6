"""volume-gan: 3D generation as a stack of attention-generated 2D slices (survey [12]).

After Jung et al. 2021 (3D attention cGAN): a 2D slice generator renders a volume slice by
slice; self-attention across the slice codes (through-plane) and over each slice's pixels
(in-plane) ties the stack together; a 2D SLICE discriminator judges every slice and a 3D
VOLUME discriminator judges the whole stack, which is what enforces volume consistency.
The global attribute is the site (scanner), as in site-gan; the paper's disease stage is
not simulated here. ``volume-disc = false`` turns the 3D discriminator off: the 2D-only
baseline of bench/volume_consistency.py (same generator, same slice discriminator). It
needs no label maps. Method and measured numbers: docs/recipes/volume-gan.md.

Why only the discriminators need DP-SGD (DP.md); unit = one patient (one dataset item =
one of the patient's volumes, ``PatientDataset`` over a site read with ``dims=3``):
  1. Both discriminators read real volumes, so both are ONE private module (``disc``:
     ``Critics``) behind ONE ``DPModule``: per-patient clipping over ALL their
     parameters together (one record's slice AND volume terms), one noise draw, one
     accountant step. The slice discriminator is a Conv3d with (1,4,4) kernels, so a
     patient's slices stay in that patient's batch row: Opacus' per-sample gradient is
     the patient's, never a slice's (an oracle test checks it). No BatchNorm, no
     spectral norm; resampling a real volume to ``depth`` slices is per record.
  2. D's fake term reads only the site id, fresh noise, G and D's released parameters;
     its gradient is added after clipping+noise (post-processing, not charged), its batch
     size is the config's, never the private Poisson size.
  3. The G step reads no real record: site id, noise and the frozen, released D
     (``DPModule.frozen`` refuses un-noised state), so G's update is post-processing; a
     test shows it is identical for two different private data sets given the same D.
  4. No one-off release: the plan is exactly Opacus' DP-SGD calibration.
  5. Metrics: public-input losses and scores, step counts and wall time only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medgen.config import ConfigError, RunConfig
from medgen.models.gan_losses import disc_loss, gen_loss
from medgen.models.gan_round import train_gan_round
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import Recipe, RoundContext
from medgen.models.site_gan import SiteGANOptions
from medgen.models.volume_networks import Critics, SliceCritic, SliceStackGenerator, VolumeCritic, VolumeGAN
from medgen.privacy.dp_step import DPModule, clip_total_norm


def record_loss(logits: tuple[torch.Tensor, torch.Tensor | None], real: bool, kind: str,
                volume_weight: float) -> torch.Tensor:
    """Batch loss = mean over records of (slice term + weight x volume term); every record
    has the same number of logits, so Opacus' "mean" reduction gives each record's own."""
    slices, volume = logits
    loss = disc_loss(slices, real, kind).mean()
    return loss if volume is None else loss + volume_weight * disc_loss(volume, real, kind).mean()


def generator_loss(logits: tuple[torch.Tensor, torch.Tensor | None], kind: str,
                   volume_weight: float) -> torch.Tensor:
    slices, volume = logits
    loss = gen_loss(slices, kind).mean()
    return loss if volume is None else loss + volume_weight * gen_loss(volume, kind).mean()


@dataclass(frozen=True)
class VolumeGANOptions(SiteGANOptions):
    """site-gan's options (widths, noise, Adam, schedule, loss) plus the volume's own."""

    depth: int = option(16, at_least=2)  # slices per volume; real volumes are resampled to it
    volume_disc: bool = True             # false: the 2D-only baseline (no 3D discriminator)
    volume_weight: float = option(1.0, above=0)
    code_dim: int = option(64, at_least=8)


# -- the recipe ------------------------------------------------------------------------
class VolumeConsistentGAN(Recipe):
    """Site-conditional 3D GAN from 2D slices, DP-SGD on both discriminators; see above."""

    name: ClassVar[str] = "volume-gan"
    Options: ClassVar[type[RecipeOptions]] = VolumeGANOptions
    private_modules: ClassVar[tuple[str, ...]] = ("disc",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = ("gen.",)
    site_indexed_keys: ClassVar[tuple[str, ...]] = ("gen.site_embed.weight", "gen.site_level.weight")
    consumes: ClassVar[str] = "volumes"
    requires_labels: ClassVar[bool] = False

    def __init__(self, config: RunConfig):
        super().__init__(config)
        if config.image_size % 8 or config.image_size < 16:
            raise ConfigError(f"volume-gan needs image-size a multiple of 8 and >= 16, got {config.image_size}")

    def build(self) -> nn.Module:
        o, size = self.options, self.config.image_size
        with torch.random.fork_rng(devices=[]):  # deterministic, global RNG untouched
            torch.manual_seed(self.config.seed)
            gen = SliceStackGenerator(size, o.depth, self.num_sites, o.gen_width, o.noise_dim,
                                      o.site_dim, o.code_dim)
            volume = VolumeCritic(size, o.depth, self.num_sites, o.disc_width) if o.volume_disc else None
            disc = Critics(SliceCritic(size, self.num_sites, o.disc_width), volume)
        return VolumeGAN(gen, disc)

    def real_volumes(self, batch: Any, device: torch.device) -> torch.Tensor:
        """Volumes [B,1,depth,S,S] of a dataset batch (resampled through-plane per record to
        the recipe's depth); the label slot, if any, is never read."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        size, depth = self.config.image_size, self.options.depth
        if images.dim() != 5 or images.shape[1] != 1 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"volume-gan needs volumes [B,1,D,{size},{size}]; the site batch has "
                             f"{tuple(images.shape)}: read the site with dims=3 (its dataset.toml)")
        images = images.to(device, torch.float32)
        if images.shape[2] != depth and images.shape[0] > 0:
            images = F.interpolate(images, size=(depth, size, size), mode="trilinear", align_corners=False)
        return images if images.shape[0] > 0 else images.new_zeros(0, 1, depth, size, size)

    def train_local(self, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        return train_gan_round(self, model, ctx, self.real_volumes)  # models/gan_round.py

    def _fake(self, model: nn.Module, site_index: int, n: int, rng, device) -> tuple[torch.Tensor, torch.Tensor]:
        site = torch.full((n,), site_index, dtype=torch.long, device=device)
        return model.gen(site, model.gen.draw_noise(n, rng, device)), site

    def disc_step(self, model: nn.Module, d: DPModule, volumes: torch.Tensor, site_index: int,
                  rng: torch.Generator, device) -> float:
        """One DP step of both critics: private real term (clipped+noised per patient) +
        public fake term (added after the noise)."""
        o = self.options
        d.zero_grad()  # DP.md trap 1
        with torch.no_grad():
            fake, fake_site = self._fake(model, site_index, self.config.batch_size, rng, device)
        with d.public_pass():
            loss_fake = record_loss(d.module(fake, fake_site), False, o.loss, o.volume_weight)
            public_grads = d.public_grads(loss_fake)
        if o.balance_fake_grad:
            public_grads = clip_total_norm(public_grads, self.config.max_grad_norm)
        if volumes.shape[0] > 0:  # an empty Poisson batch: step() takes a noise-only step
            real_site = torch.full((volumes.shape[0],), site_index, dtype=torch.long, device=device)
            record_loss(d.module(volumes, real_site), True, o.loss, o.volume_weight).backward()
        d.step(public_grads)
        return float(loss_fake.detach())

    def gen_step(self, model: nn.Module, d: DPModule, opt_g: torch.optim.Optimizer, site_index: int,
                 rng: torch.Generator, device) -> tuple[float, float]:
        """One G step from the site id and noise only, through the critics' released weights."""
        o = self.options
        with d.frozen() as critics:  # checked free of un-noised state, hooks off, frozen
            fake, site = self._fake(model, site_index, self.config.batch_size, rng, device)
            logits = critics(fake, site)
            loss = generator_loss(logits, o.loss, o.volume_weight)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        return float(loss.detach()), float(torch.sigmoid(logits[0].detach()).mean())

    # -- sampling (post-processing of the released generator) ---------------------------
    def sample_volumes(self, model: nn.Module, count: int, site_index: torch.Tensor | int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Volumes [N,1,depth,S,S] in [-1,1] of site(s) ``site_index``."""
        site = self.site_ids(site_index, count)
        with self.inference(model) as device:
            return model.gen(site.to(device), model.gen.draw_noise(count, generator, device))

    def sample(self, model: nn.Module, label_maps: torch.Tensor, site_index: torch.Tensor | int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Slices [N,1,S,S] (the Recipe contract): slice k of volume k at a uniformly drawn
        level, so the 2D evaluators see the slices' marginal. Label values are not used."""
        n = label_maps.shape[0]
        if tuple(label_maps.shape[-2:]) != (self.config.image_size,) * 2:
            raise ValueError(f"volume-gan samples at image-size {self.config.image_size}, asked for "
                             f"{tuple(label_maps.shape[-2:])}")
        volumes = self.sample_volumes(model, n, site_index, generator)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        level = torch.randint(0, self.options.depth, (n,), generator=generator, device=gen_device)
        return volumes[torch.arange(n), :, level.to(volumes.device)]
