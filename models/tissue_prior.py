"""cddpm's tissue prior: a per-(site, tissue) intensity table the denoiser diffuses around.

A site's tissue contrast is a handful of numbers. Under DP the UNet learns it only slowly,
through a per-channel bias from the site embedding; a table of K offsets per site, one per
class of the label schema (``nn.Embedding(num_sites, num_classes)``), looked up on the one-hot label map, gets
a clear gradient every step and its own Adam learning rate (``lr-prior``). The prior
image p = blur_site(offset[site] . onehot(map)) is piecewise constant; the UNet sees
x_t - sqrt(abar_t) p (the noised RESIDUAL x0 - p, up to noise) and predicts that
residual, so x0_hat = p + UNet(...). Shifting the input (rather than only adding p to
the output) keeps the UNet's job at small t the same for every site (copy its input).

The tables read the private images (through the loss), so they are part of the private
denoiser: DP-trained, released, site-indexed. A site may start its row at the tissue
means of its scanner-moment release (``start_from_release``: post-processing).
Measurements behind this design: docs/recipes/cddpm.md, "Design history".
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from medgen.models.scanner_moments import moment_dim, moments_from_release


def denoiser_input(x_t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """Med-cDiff conditioning: the condition channels concatenated to the noisy image."""
    return torch.cat([x_t, condition], dim=1)


class TissuePriorDenoiser(nn.Module):
    """x0_hat = p + UNet([x_t - sqrt(abar_t) p, map]), p = blur_site(offset[site] . onehot(map)).

    Same call signature as the UNet (input = ``denoiser_input``), so the loss, the two
    per-sample-gradient paths and DDIM are unchanged. sqrt(abar_t) is a non-persistent
    buffer: a function of the options, it never travels. With ``blur`` the prior is
    smoothed by a per-site isotropic Gaussian (sigma = 0.25 + softplus(raw) pixels, raw a
    site-indexed table starting at sigma 0.5): scanners differ in sharpness as much as in
    contrast, and a razor-sharp prior left every site's samples with label-map edges.
    """

    def __init__(self, unet: DiffusionModelUNet, num_sites: int, abar: torch.Tensor, blur: bool = True,
                 gain: float = 1.0, *, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        # row k: site k's scanner-moment release (a noisy sum; all zero = not released yet)
        self.register_buffer("site_moments", torch.zeros(num_sites, moment_dim(num_classes)))
        self.unet = unet
        self.gain = float(gain)  # tables are stored / = gain (see CDDPMOptions.prior_gain)
        self.tissue_offset = nn.Embedding(num_sites, num_classes)
        nn.init.zeros_(self.tissue_offset.weight)
        self.blur_raw = nn.Embedding(num_sites, 1) if blur else None
        if self.blur_raw is not None:
            nn.init.constant_(self.blur_raw.weight, -1.25 / self.gain)
        self.register_buffer("sqrt_abar", abar.sqrt().float(), persistent=False)

    def start_from_release(self, site: int) -> None:
        """Set site ``site``'s tissue offsets to the tissue means its release implies."""
        means = moments_from_release(self.site_moments[site])[:self.num_classes]
        with torch.no_grad():
            self.tissue_offset.weight[site] = means.to(self.tissue_offset.weight) / self.gain

    def prior_parameters(self) -> list[nn.Parameter]:
        return [self.tissue_offset.weight] + ([self.blur_raw.weight] if self.blur_raw is not None else [])

    def blur_sigma(self, class_labels: torch.Tensor) -> torch.Tensor:
        """Per-sample PSF width in pixels [N]."""
        return 0.25 + nn.functional.softplus(self.gain * self.blur_raw(class_labels)[:, 0])

    def _blur(self, image: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian as two [H,H] / [W,W] matrices per sample, rows renormalised at
        the border (no padding, no per-sample conv: plain einsums for vmap and hooks alike)."""
        sigma = self.blur_sigma(class_labels)[:, None, None]

        def matrix(size: int) -> torch.Tensor:
            pos = torch.arange(size, device=image.device, dtype=image.dtype)
            k = torch.exp(-0.5 * ((pos[:, None] - pos[None, :]) / sigma) ** 2)  # [N, size, size]
            return k / k.sum(dim=-1, keepdim=True)

        return torch.einsum("nij,ncjk,nlk->ncil", matrix(image.shape[-2]), image, matrix(image.shape[-1]))

    def prior(self, condition: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The scanner prior image [N,1,H,W] for one-hot maps [N,C,H,W] and site ids [N]."""
        offsets = self.gain * self.tissue_offset(class_labels)
        sharp = torch.einsum("nchw,nc->nhw", condition, offsets).unsqueeze(1)
        return sharp if self.blur_raw is None else self._blur(sharp, class_labels)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        x_t, condition = x[:, :1], x[:, 1:]
        prior = self.prior(condition, class_labels)
        scale = self.sqrt_abar[timesteps].to(x.dtype).view(-1, 1, 1, 1)
        residual = self.unet(denoiser_input(x_t - scale * prior, condition), timesteps,
                             class_labels=class_labels)
        return prior + residual
