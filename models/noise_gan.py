"""The noise GAN of blind denoising (models/blind_denoise.py): G makes a site's noise field
from white noise, D judges noise windows. Only D reads real pixels (through the recipe's
DPModule); the privacy argument is the recipe's."""

from __future__ import annotations

import torch
from torch import nn

G_LAYERS = 3  # valid 3x3 convolutions of G: it eats a border of 3 px


class NoiseGenerator(nn.Module):
    """White noise z [N,c,H+6,W+6] + a site code -> noise [N,1,H,W] in network units
    (valid convolutions: stationary, no border effect, any size). Initialised so its output
    std is ``scale`` (a fixed draw of z at build: no data), with a per-site log-gain, so the
    few private steps a budget allows go to the noise's shape, not to finding its size."""

    def __init__(self, num_sites: int, channels: int, width: int, site_dim: int, scale: float):
        super().__init__()
        self.channels, self.scale = channels, scale
        self.site_embed = nn.Embedding(num_sites, site_dim)
        self.body = nn.Sequential(nn.Conv2d(channels + site_dim, width, 3), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, width, 3), nn.LeakyReLU(0.2), nn.Conv2d(width, 1, 3))
        self.log_gain = nn.Embedding(num_sites, 1)
        nn.init.zeros_(self.log_gain.weight)
        with torch.no_grad():  # unit output std at initialisation
            z = torch.randn(8, channels, 32, 32)
            std = self(z, torch.zeros(8, dtype=torch.long)).std() / scale
            self.body[-1].weight.div_(std)
            self.body[-1].bias.zero_()

    def forward(self, z: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        code = self.site_embed(site)[:, :, None, None].expand(-1, -1, *z.shape[-2:])
        gain = self.log_gain(site).exp()[:, :, None, None]
        return self.scale * gain * self.body(torch.cat([z, code], dim=1))

    def field(self, n: int, size: int, site: torch.Tensor, generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, self.channels, size + 2 * G_LAYERS, size + 2 * G_LAYERS,
                        generator=generator, device=gen_device)
        return self(z.to(device), site.to(device))


class NoiseDiscriminator(nn.Module):
    """Noise patch [N,1,P,P] (in units of ``scale``) -> one logit; no normalisation layer."""

    def __init__(self, width: int, scale: float):
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2))
        self.head = nn.Linear(2 * width, 1)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(noise / self.scale).mean(dim=(-2, -1)))[:, 0]
