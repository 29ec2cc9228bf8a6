"""The noise GAN of blind denoising (models/blind_denoise.py): G makes a site's noise field
from white noise, D judges noise windows. Only D reads real pixels (through the recipe's
DPModule); the privacy argument is the recipe's.

Both sides speak the language of a scanner's noise: its size and its GRAIN (spatial
correlation, i.e. its power spectrum). G is white noise coloured by one small learned kernel
per site (so the correlation is a few parameters, and its std a separate gain); D reads a
window's second-order statistics (its rms and its normalised autocorrelation at short lags)
and nothing else, so its few parameters (DP noise grows with their number) all go to what G
can change. Why (measured): docs/recipes/blind-denoise.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAGS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0))  # D's autocorrelation lags (dy, dx)


class NoiseGenerator(nn.Module):
    """White noise z [N,1,H+k-1,W+k-1] + a site -> noise [N,1,H,W] in network units: z through
    the site's k x k colouring kernel (valid convolution: stationary, no border, any size),
    normalised to unit L2 norm (so the output std is exactly ``scale x gain``, and the kernel
    holds the grain alone), times a per-site gain. Initialised white (a centred delta) of std
    ``scale``; no data is read to build it."""

    def __init__(self, num_sites: int, kernel: int, scale: float):
        super().__init__()
        self.k, self.scale = kernel, scale
        self.kernel = nn.Embedding(num_sites, kernel * kernel)
        self.log_gain = nn.Embedding(num_sites, 1)
        with torch.no_grad():
            self.kernel.weight.zero_()
            self.kernel.weight[:, (kernel * kernel) // 2] = 1.0
            self.log_gain.weight.zero_()

    def kernels(self, site: torch.Tensor) -> torch.Tensor:
        """The sites' colouring kernels [N,1,k,k], unit L2 norm."""
        w = self.kernel(site).view(-1, 1, self.k, self.k)
        return w / w.flatten(1).norm(dim=1).clamp(min=1e-8)[:, None, None, None]

    def forward(self, z: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        out = F.conv2d(z.reshape(1, n, *z.shape[-2:]), self.kernels(site), groups=n)
        gain = self.log_gain(site).exp()[:, :, None, None]
        return self.scale * gain * out.view(n, 1, *out.shape[-2:])

    def field(self, n: int, size: int, site: torch.Tensor, generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, 1, size + self.k - 1, size + self.k - 1, generator=generator, device=gen_device)
        return self(z.to(device), site.to(device))


def second_order_features(noise: torch.Tensor, scale: float) -> torch.Tensor:
    """[N,1+len(LAGS)] per window [N,1,P,P]: log(rms / scale) and the normalised
    autocorrelation at each lag in ``LAGS`` (each in [-1, 1])."""
    power = noise.pow(2).mean(dim=(-3, -2, -1))
    feats = [0.5 * torch.log(power / scale ** 2 + 1e-6)]
    h, w = noise.shape[-2:]
    for dy, dx in LAGS:
        a = noise[..., :h - dy, max(0, -dx):w - max(0, dx)]
        b = noise[..., dy:, max(0, dx):w + min(0, dx)]
        feats.append((a * b).mean(dim=(-3, -2, -1)) / (power + 1e-12))
    return torch.stack(feats, dim=1)


class NoiseDiscriminator(nn.Module):
    """Noise window [N,1,P,P] -> one logit from its second-order features (``width`` 0: a
    linear function of them, 1 + len(LAGS) weights and a bias; else one hidden layer)."""

    def __init__(self, width: int, scale: float):
        super().__init__()
        self.scale = scale
        features = 1 + len(LAGS)
        self.head = (nn.Linear(features, 1) if width == 0 else
                     nn.Sequential(nn.Linear(features, width), nn.LeakyReLU(0.2), nn.Linear(width, 1)))
        last = self.head if width == 0 else self.head[-1]
        nn.init.zeros_(last.weight)  # D starts indifferent: G's first steps follow data, not D's init
        nn.init.zeros_(last.bias)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.head(second_order_features(noise, self.scale))[:, 0]
