"""volume-gan's networks (survey [12], after Jung et al. 2021): a slice-stack generator with
through-plane and in-plane attention, a 2D slice critic and a 3D volume critic that train as
one private module. The privacy argument and the recipe: models/volume_gan.py."""

from __future__ import annotations

import math

import torch
from torch import nn

from medgen.models.blocks import ProjectionHead, group_count


def slice_positions(depth: int, dim: int) -> torch.Tensor:
    """Sinusoidal codes [depth, dim] of the relative slice position in [0, 1]: neighbouring
    slices get neighbouring codes, whatever the depth."""
    t = torch.linspace(0.0, 1.0, depth)[:, None]
    freqs = torch.exp(torch.arange(dim // 2) * (-math.log(100.0) / max(dim // 2 - 1, 1)))[None]
    return torch.cat([torch.sin(math.pi * t * freqs * 8), torch.cos(math.pi * t * freqs * 8)], dim=1)


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
