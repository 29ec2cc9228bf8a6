"""dp-cgan's networks: a SPADE generator with a per-site scanner head, and a projection
PatchGAN discriminator that sees the label map (design: docs/recipes/dp-cgan.md, "Networks").
Used by dp-cgan and the recipes that extend it (red-gan, two-stage, bridge-translate)."""

from __future__ import annotations

import torch
from torch import nn

from medgen.models.blocks import DownBlock, ProjectionHead, ScannerHead, SPADEUpBlock, tissue_statistics
from medgen.models.scanner_moments import moment_dim


class ConditionalGenerator(nn.Module):
    """z -> S/8 feature map -> SPADE stages to S/2 (label map + site code) -> scanner head."""

    def __init__(self, image_size: int, num_sites: int, width: int, noise_dim: int,
                 site_dim: int, spade_hidden: int, spade_kernel: int, psf_radius: int = 4,
                 upsample: str = "bilinear", *, num_classes: int):
        super().__init__()
        self.noise_dim = noise_dim
        self.image_size = image_size
        self.base = image_size // 8
        channels = [4 * width, 4 * width, 2 * width, width]
        self.site_embed = nn.Embedding(num_sites, site_dim)
        self.project = nn.Linear(noise_dim, channels[0] * self.base * self.base)
        # stage 0 modulates at S/8, stages 1-2 upsample to S/2; the head goes to S
        self.stages = nn.ModuleList(
            SPADEUpBlock(channels[i], channels[i + 1], num_classes, site_dim, spade_hidden,
                         spade_kernel, upsample=i > 0, mode=upsample) for i in range(3))
        self.head = ScannerHead(channels[3], num_classes, num_sites, psf_radius, upsample)
        # row k: site k's released noisy sum of patient_moments (all zero = not released yet)
        self.register_buffer("site_moments", torch.zeros(num_sites, moment_dim(num_classes)))

    def forward(self, labels: torch.Tensor, site: torch.Tensor, z: torch.Tensor,
                pixel_noise: torch.Tensor) -> torch.Tensor:
        """labels: one-hot [N,K,S,S] (K classes of the schema); site: [N] int64; z: [N,noise_dim]; pixel_noise: [N,1,S,S]."""
        site_code = self.site_embed(site)
        x = self.project(z).view(z.shape[0], -1, self.base, self.base)
        for stage in self.stages:
            x = stage(x, labels, site_code)
        return torch.tanh(self.head(x, labels, site, pixel_noise))

    def draw_noise(self, n: int, generator: torch.Generator | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, pixel noise) drawn on the generator's device (CPU by default), then moved."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, self.noise_dim, generator=generator, device=gen_device)
        noise = torch.randn(n, 1, self.image_size, self.image_size, generator=generator,
                            device=gen_device)
        return z.to(device), noise.to(device)


class ProjectionDiscriminator(nn.Module):
    """cat(image, one-hot map) -> stride-2 GroupNorm stages down to 4x4 -> per-patch projection
    (PatchGAN: local realism gets a local signal). GroupNorm, no spectral norm (DP.md traps
    4, 5). With ``tissue_stats`` a second projection head on ``tissue_statistics`` (2K+2
    numbers for K classes: the scanner signal, in ~60 parameters that DP noise does not drown) is added
    to every patch logit (docs/recipes/dp-cgan.md, "Networks")."""

    def __init__(self, image_size: int, num_sites: int, width: int, tissue_stats: bool = True, *,
                 num_classes: int):
        super().__init__()
        stages, in_ch, out_ch, size = [], 1 + num_classes, width, image_size
        while size > 4:
            stages.append(DownBlock(in_ch, out_ch, norm=bool(stages)))
            in_ch, out_ch, size = out_ch, min(2 * out_ch, 4 * width), size // 2
        self.stages = nn.Sequential(*stages)
        self.head = ProjectionHead(in_ch, num_sites)
        self.stats_head = ProjectionHead(2 * num_classes + 2, num_sites) if tissue_stats else None

    def forward(self, image: torch.Tensor, labels: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        features = self.stages(torch.cat([image, labels], dim=1))
        logits = self.head(features, site)
        if self.stats_head is not None:
            logits = logits + self.stats_head(tissue_statistics(image, labels), site)[:, None, None]
        return logits


class ConditionalGAN(nn.Module):
    """One module so one state_dict travels: ``gen.*`` is shared, ``disc.*`` stays local."""

    def __init__(self, gen: ConditionalGenerator, disc: ProjectionDiscriminator):
        super().__init__()
        self.gen = gen
        self.disc = disc
