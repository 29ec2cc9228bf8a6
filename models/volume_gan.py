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

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medgen.config import ConfigError, RunConfig
from medgen.models.blocks import ProjectionHead, group_count
from medgen.models.dp_cgan import disc_loss, gen_loss
from medgen.models.gan_round import train_gan_round
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import Recipe, RoundContext
from medgen.models.site_gan import SiteGANOptions
from medgen.privacy.dp_step import DPModule, clip_total_norm


# -- helpers ---------------------------------------------------------------------------
def slice_positions(depth: int, dim: int) -> torch.Tensor:
    """Sinusoidal codes [depth, dim] of the relative slice position in [0, 1]: neighbouring
    slices get neighbouring codes, whatever the depth."""
    t = torch.linspace(0.0, 1.0, depth)[:, None]
    freqs = torch.exp(torch.arange(dim // 2) * (-math.log(100.0) / max(dim // 2 - 1, 1)))[None]
    return torch.cat([torch.sin(math.pi * t * freqs * 8), torch.cos(math.pi * t * freqs * 8)], dim=1)


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


# -- networks --------------------------------------------------------------------------
class SpatialAttention(nn.Module):
    """Self-attention over a slice's pixels (in-plane), residual; torch's multi-head attention."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(channels), channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [N, HW, C]
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class SliceStackGenerator(nn.Module):
    """(site, z) -> a code per slice (z, site, slice position) -> a transformer layer across
    the slices (through-plane attention) -> ONE shared 2D decoder per slice (upsampling
    convs with in-plane attention at S/8) -> tanh with a per-site level. Never sees a real
    record, so it may use any layer (DP.md)."""

    def __init__(self, image_size: int, depth: int, num_sites: int, width: int, noise_dim: int,
                 site_dim: int, code_dim: int):
        super().__init__()
        self.noise_dim, self.depth, self.base = noise_dim, depth, image_size // 8
        self.site_embed = nn.Embedding(num_sites, site_dim)
        self.register_buffer("positions", slice_positions(depth, code_dim), persistent=False)
        self.code = nn.Linear(noise_dim + site_dim, code_dim)
        self.through_plane = nn.TransformerEncoderLayer(code_dim, nhead=4, dim_feedforward=2 * code_dim,
                                                        dropout=0.0, batch_first=True)
        channels = [4 * width, 4 * width, 2 * width, width]
        self.project = nn.Linear(code_dim, channels[0] * self.base * self.base)
        self.in_plane = SpatialAttention(channels[0])
        stages: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            stages += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(c_in, c_out, 3, padding=1),
                       nn.GroupNorm(group_count(c_out), c_out), nn.LeakyReLU(0.2)]
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(channels[-1], 1, 3, padding=1)
        self.site_level = nn.Embedding(num_sites, 2)  # the scanner's global offset and gain
        nn.init.zeros_(self.site_level.weight)

    def forward(self, site: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        n, d = z.shape[0], self.depth
        codes = self.code(torch.cat([z, self.site_embed(site)], dim=1))[:, None] + self.positions[None]
        codes = self.through_plane(codes)                      # [N, D, code]
        h = self.project(codes.reshape(n * d, -1)).view(n * d, -1, self.base, self.base)
        x = self.out(self.stages(self.in_plane(h)))            # [N*D, 1, S, S]
        level = self.site_level(site).repeat_interleave(d, dim=0)[:, :, None, None]
        x = torch.tanh(x * (1.0 + level[:, 1:]) + level[:, :1])
        return x.view(n, d, 1, *x.shape[-2:]).transpose(1, 2)  # [N, 1, D, S, S]

    def draw_noise(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(n, self.noise_dim, generator=generator, device=gen_device).to(device)


class SliceCritic(nn.Module):
    """The 2D slice discriminator, written as Conv3d with (1,4,4) kernels: each slice is judged
    alone with weights shared across slices, and the batch row stays the PATIENT (a reshape
    to [N*D,1,H,W] would make Opacus clip per slice). No norm layer: GroupNorm over a 5D map
    would pool statistics across slices. Logits [N, D, 4, 4]."""

    def __init__(self, image_size: int, num_sites: int, width: int):
        super().__init__()
        layers, c_in, c_out, size = [], 1, width, image_size
        while size > 4:
            layers += [nn.Conv3d(c_in, c_out, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1)),
                       nn.LeakyReLU(0.2)]
            c_in, c_out, size = c_out, min(2 * c_out, 4 * width), size // 2
        self.stages = nn.Sequential(*layers)
        self.head = ProjectionHead(c_in, num_sites)

    def forward(self, volume: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(volume).movedim(1, -1), site)


class VolumeCritic(nn.Module):
    """The 3D volume discriminator: stride-2 Conv3d + GroupNorm stages (one patient's volume
    per row) to a few voxels, per-patch projection on the site. Logits [N, d, 4, 4]."""

    def __init__(self, image_size: int, depth: int, num_sites: int, width: int):
        super().__init__()
        layers, c_in, c_out, size, d = [], 1, width, image_size, depth
        while size > 4:
            stride = (2 if d > 2 else 1, 2, 2)  # keep >= 2 slices: depth is the point
            norm = [nn.GroupNorm(group_count(c_out), c_out)] if layers else []  # none on raw input
            layers += [nn.Conv3d(c_in, c_out, (stride[0] + 2, 4, 4), stride=stride, padding=1),
                       *norm, nn.LeakyReLU(0.2)]
            c_in, c_out, size, d = c_out, min(2 * c_out, 4 * width), size // 2, d // stride[0]
        self.stages = nn.Sequential(*layers)
        self.head = ProjectionHead(c_in, num_sites)

    def forward(self, volume: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(volume).movedim(1, -1), site)


class Critics(nn.Module):
    """Both discriminators as ONE private module: one clip bound over all their parameters."""

    def __init__(self, slices: SliceCritic, volume: VolumeCritic | None):
        super().__init__()
        self.slices = slices
        self.volume = volume

    def forward(self, volume: torch.Tensor, site: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.slices(volume, site), None if self.volume is None else self.volume(volume, site)


class VolumeGAN(nn.Module):
    """One module so one state_dict travels: ``gen.*`` is shared, ``disc.*`` stays local."""

    def __init__(self, gen: SliceStackGenerator, disc: Critics):
        super().__init__()
        self.gen = gen
        self.disc = disc


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
