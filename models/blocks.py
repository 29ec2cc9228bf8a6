"""Network building blocks shared by the recipes (2D, small, DP-compatible).

Every block that may end up inside a network trained with DP-SGD uses only layers that
Opacus' hook-based per-sample gradients support (Conv2d, Linear, Embedding, GroupNorm):
no BatchNorm (Opacus refuses it) and no spectral norm (no grad-sample mode supports it,
DP.md traps 4 and 5). Generator-only blocks follow the same rule so a recipe can move
them behind DP-SGD without surprises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import SPADE
from torch import nn


def one_hot_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer label maps [N,H,W] -> float one-hot maps [N,num_classes,H,W]."""
    if labels.dim() != 3:
        raise ValueError(f"label maps must have shape [N,H,W], got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"label maps must be integer tensors, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"label values must lie in 0..{num_classes - 1} (the run's label-names), "
                         f"got {int(labels.min())}..{int(labels.max())}")
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)


def group_count(channels: int, preferred: int = 8) -> int:
    """Largest group count <= ``preferred`` that divides ``channels`` (for GroupNorm)."""
    for groups in range(min(preferred, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class SiteSPADE(nn.Module):
    """SPADE normalisation modulated by a label map AND a site code.

    MONAI's ``SPADE`` predicts a per-pixel scale and shift from a semantic map. We feed it
    the one-hot tissue map concatenated with the site code broadcast over the image: the
    first (shared) conv then adds a site-dependent bias to its hidden features before the
    nonlinearity, so the predicted scale/shift depend on (tissue class, site) jointly,
    which is what a scanner's contrast is (site C inverts what site A does per tissue).
    The parameter-free base norm is GroupNorm (per-sample, no batch statistics).
    """

    def __init__(self, channels: int, label_channels: int, site_channels: int, hidden: int,
                 kernel_size: int = 3):
        super().__init__()
        self.spade = SPADE(label_nc=label_channels + site_channels, norm_nc=channels,
                           kernel_size=kernel_size, spatial_dims=2, hidden_channels=hidden,
                           norm="GROUP", norm_params={"num_groups": group_count(channels),
                                                      "affine": False})

    def forward(self, x: torch.Tensor, labels: torch.Tensor, site_code: torch.Tensor) -> torch.Tensor:
        # resize the label map first (nearest, as SPADE does), then append the site code
        labels = F.interpolate(labels, size=x.shape[2:], mode="nearest")
        site_map = site_code[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return self.spade(x, torch.cat([labels, site_map], dim=1))


class SPADEUpBlock(nn.Module):
    """[Upsample x2 (bilinear)], 3x3 conv, SiteSPADE, LeakyReLU: one generator stage.

    Bilinear, not nearest: nearest upsampling from the S/8 base left visible 8x8 blocks in
    the demo's samples."""

    def __init__(self, in_channels: int, out_channels: int, label_channels: int,
                 site_channels: int, hidden: int, spade_kernel: int = 3, upsample: bool = True,
                 mode: str = "bilinear"):
        super().__init__()
        self.upsample = upsample
        self.mode = mode
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = SiteSPADE(out_channels, label_channels, site_channels, hidden, spade_kernel)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, site_code: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode=self.mode,
                              align_corners=False if self.mode == "bilinear" else None)
        return F.leaky_relu(self.norm(self.conv(x), labels, site_code), 0.2)


class ScannerHead(nn.Module):
    """Half-resolution features -> full-resolution single-channel image (pre-activation).

    Upsampling plus one conv brings the features to full resolution without materialising a
    wide full-resolution feature map (the costly part of a generator on a CPU). The scanner's
    own part of the image is then modelled the way a scanner makes it, as lookups on the
    full-resolution label map and the site id:
      contrast  a per-(site, tissue class) intensity offset,
      blur      a per-site isotropic Gaussian point-spread function (low-field and
                down-sampled scanners are blurred; a per-pixel lookup alone is razor-sharp
                and a site classifier tells such a site apart at once),
      noise     a per-(site, tissue class) noise level times per-pixel noise, added after
                the blur as acquisition noise is.
    These few numbers per site are what most separates one scanner from another, so they
    are named parameters (``scanner_parameters``) that a recipe may train faster than the
    convolutional body.
    """

    def __init__(self, in_channels: int, num_classes: int, num_sites: int, blur_radius: int = 4,
                 mode: str = "bilinear"):
        """``blur_radius`` 0 turns the point-spread function off (an ablation)."""
        super().__init__()
        # bilinear upsampling then a 3x3 conv: nearest upsampling left 2x2 blocks, and a
        # stride-2 transposed conv printed a checkerboard into every sample of the first demo runs
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode=mode,
                                            align_corners=False if mode == "bilinear" else None),
                                nn.Conv2d(in_channels, 1, 3, padding=1))
        self.class_offset = nn.Embedding(num_sites, num_classes)
        self.class_noise = nn.Embedding(num_sites, num_classes)
        # PSF width sigma = 0.25 + softplus(raw) pixels; raw = -1.25 starts at sigma 0.5 (nearly
        # sharp, yet with a usable gradient on the neighbouring taps)
        self.blur_raw = nn.Embedding(num_sites, 1)
        self.blur_radius = blur_radius
        with torch.no_grad():  # start near zero: a saturated tanh would stall early training
            self.up[1].weight.mul_(0.1)
            self.blur_raw.weight.fill_(-1.25)
        nn.init.zeros_(self.class_offset.weight)
        # a small positive noise level, not zero: |a + s*eps| is symmetric in s, so at s = 0 the
        # expected gradient on s vanishes and the noise level never started to learn (site D's
        # noisy scans were then matched by sharpening instead of by noise)
        nn.init.constant_(self.class_noise.weight, 0.02)

    def scanner_parameters(self) -> list[nn.Parameter]:
        return [self.class_offset.weight, self.class_noise.weight, self.blur_raw.weight]

    def blur_sigma(self, site: torch.Tensor) -> torch.Tensor:
        """Per-sample PSF width in pixels [N]."""
        return 0.25 + F.softplus(self.blur_raw(site)[:, 0])

    def _blur(self, image: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with each sample's own sigma (grouped conv, reflect pad)."""
        n, r = image.shape[0], self.blur_radius
        if r == 0:
            return image
        taps = torch.arange(-r, r + 1, device=image.device, dtype=image.dtype)
        kernel = torch.exp(-0.5 * (taps[None, :] / self.blur_sigma(site)[:, None]) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [N, 2r+1]
        x = F.pad(image.reshape(1, n, *image.shape[2:]), (r, r, r, r), mode="reflect")
        x = F.conv2d(x, kernel[:, None, None, :], groups=n)  # along width
        x = F.conv2d(x, kernel[:, None, :, None], groups=n)  # along height
        return x.reshape(image.shape)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, site: torch.Tensor,
                pixel_noise: torch.Tensor) -> torch.Tensor:
        offset = torch.einsum("nchw,nc->nhw", labels, self.class_offset(site)).unsqueeze(1)
        noise_level = torch.einsum("nchw,nc->nhw", labels, self.class_noise(site)).unsqueeze(1)
        return self._blur(self.up(x) + offset, site) + noise_level * pixel_noise


def tissue_statistics(image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image scanner statistics [N, 2C+2] from an image [N,1,H,W] and one-hot maps [N,C,H,W].

    Per tissue class: the mean and the standard deviation of the intensity inside it (the
    scanner's contrast); over the head: the mean absolute gradient (sharpness: a blurred
    scanner has less of it) and the mean absolute Laplacian (noise). Parameter-free and
    differentiable in the image, so a generator learns contrast, blur and noise from a
    discriminator that looks at them.
    """
    area = labels.sum(dim=(2, 3)).clamp_min(1.0)                      # [N,C]
    mean = (image * labels).sum(dim=(2, 3)) / area                    # [N,C]
    var = ((image - mean[:, :, None, None]) ** 2 * labels).sum(dim=(2, 3)) / area
    std = (var + 1e-6).sqrt()
    head = 1.0 - labels[:, :1]                                        # everything but background
    head_area = head.sum(dim=(2, 3)).clamp_min(1.0)                   # [N,1]
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs() * head[..., :, 1:]
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs() * head[..., 1:, :]
    sharpness = (dx.sum(dim=(2, 3)) + dy.sum(dim=(2, 3))) / (2 * head_area)
    laplace = (4 * image[..., 1:-1, 1:-1] - image[..., :-2, 1:-1] - image[..., 2:, 1:-1]
               - image[..., 1:-1, :-2] - image[..., 1:-1, 2:]).abs() * head[..., 1:-1, 1:-1]
    noise = laplace.sum(dim=(2, 3)) / head_area
    return torch.cat([mean, std, sharpness, noise], dim=1)


class DownBlock(nn.Module):
    """4x4 stride-2 conv, optional GroupNorm, LeakyReLU: one discriminator stage."""

    def __init__(self, in_channels: int, out_channels: int, norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
        self.norm = nn.GroupNorm(group_count(out_channels), out_channels) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class ProjectionHead(nn.Module):
    """Projection-discriminator output (Miyato & Koyama 2018): psi(h) + <embed(y), h>.

    ``h`` is a feature map [N,C,H,W] (one logit per patch, PatchGAN-style: local
    realism gets a local signal) or a pooled vector [N,C]; ``y`` the class (site) id [N].
    The class enters through an inner product instead of input concatenation, which
    keeps the class signal from being ignored. Linear and Embedding have Opacus
    per-sample gradients (Linear over any number of middle dims).
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(channels, 1)
        self.embed = nn.Embedding(num_classes, channels)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, features: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        """Logits [N,H,W] for a feature map, [N] for a vector."""
        if features.dim() == 4:
            features = features.permute(0, 2, 3, 1)  # channels last for the Linear
        code = self.embed(class_id).view(features.shape[0], *([1] * (features.dim() - 2)), -1)
        return self.linear(features).squeeze(-1) + (code * features).sum(dim=-1)


class SiteDiscriminator(nn.Module):
    """Image -> stride-2 GroupNorm stages down to 4x4 -> per-patch projection on the site id."""

    def __init__(self, image_size: int, num_sites: int, width: int):
        super().__init__()
        stages, in_ch, out_ch, size = [], 1, width, image_size
        while size > 4:
            stages.append(DownBlock(in_ch, out_ch, norm=bool(stages)))
            in_ch, out_ch, size = out_ch, min(2 * out_ch, 4 * width), size // 2
        self.stages = nn.Sequential(*stages)
        self.head = ProjectionHead(in_ch, num_sites)

    def forward(self, image: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(image), site)
