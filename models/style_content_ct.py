"""style-content-ct (survey [11], Krishna et al. 2019): content from one CT, style from another.

G(content image, style code) in the style-transfer manner: a content encoder (stride-2
conv stages, GroupNorm) keeps WHERE the anatomy is; an AdaIN decoder (instance norm, then
a per-channel gain and shift computed from the style code) sets HOW it looks (intensity
levels, texture, sharpness: what a CT scanner and kernel change). Style codes are a
per-site table (site-indexed, so site k's row is trained by site k alone) and a style
encoder E(image) -> code, so a style can also be read off any CT (``transfer``):

    transfer(model, content_cts, style_cts) = G(content_cts, E(style_cts))

Training at a site, per round: content images are random-contrast renderings of PUBLIC
label maps (sim/random_contrast.py: any contrast, any texture: anatomy only); the
site-conditional PatchGAN D judges G(content, site code) against the site's CTs (the
style the site teaches), a content loss keeps the edges of the content image (L1 between
mean-normalised gradient magnitudes at two scales: sign- and contrast-free, so only the
structure is held), and E learns to read back the code G was given (on G's outputs).
Design and measurement: docs/recipes/style-content-ct.md.

Privacy (unit = one patient; DP.md "Which networks need DP-SGD"):
  1. D is the only network that reads private records (the site's CT images; label maps
     of the site are never read): ``DPModule`` over ``PrivateTraining`` (Poisson sampling,
     per-patient clipping, noise, the plan's accountant). D's weights after a step are a
     DP release.
  2. D's fake term reads public label maps (rendered), site ids and G: its gradient is
     added after clipping + noise (``DPModule.step(public_grads)``), of FIXED batch size.
  3. The G step (content encoder, decoder, style table, style encoder E) reads public
     renderings, site ids and D's released weights only (``DPModule.frozen``), and E's
     target is the code G was given: post-processing.
  4. No one-off release: the plan is exactly Opacus' DP-SGD calibration.
  5. ``transfer`` reads the caller's own CTs where they are; nothing is trained from them.
  6. Metrics: public-input losses, step counts, wall time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medgen.models.blocks import group_count
from medgen.models.gan_losses import LOSSES, disc_loss, gen_loss
from medgen.models.gan_round import train_gan_round
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import Recipe, RoundContext
from medgen.models.blocks import SiteDiscriminator
from medgen.privacy.dp_step import DPModule, clip_total_norm
from medgen.sim.random_contrast import render_random_contrast


# -- helpers -------------------------------------------------------------------------
def edge_map(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude divided by its image mean: where the structure is, not its contrast."""
    dx, dy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    mag = torch.sqrt(F.pad(dx, (0, 1)) ** 2 + F.pad(dy, (0, 0, 0, 1)) ** 2 + 1e-6)
    return mag / mag.mean(dim=(-2, -1), keepdim=True)


def content_loss(generated: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Per-image L1 of edge maps at full and half resolution: [N]."""
    per = [(edge_map(generated) - edge_map(content)).abs().mean(dim=(1, 2, 3))]
    per.append((edge_map(F.avg_pool2d(generated, 2)) - edge_map(F.avg_pool2d(content, 2))).abs().mean(dim=(1, 2, 3)))
    return sum(per) / 2


# -- networks ------------------------------------------------------------------------
def conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(group_count(c_out), c_out),
                         nn.LeakyReLU(0.2))


class AdaIN(nn.Module):
    """Instance norm, then gain and shift from the style code (Huang & Belongie 2017)."""

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.affine = nn.Linear(style_dim, 2 * channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gain, shift = self.affine(style)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + gain) + shift


class StyleContentGenerator(nn.Module):
    def __init__(self, num_sites: int, width: int, style_dim: int):
        super().__init__()
        self.encode = nn.Sequential(conv_block(1, width, 1), conv_block(width, 2 * width, 2),
                                    conv_block(2 * width, 2 * width, 2))
        self.ada = nn.ModuleList([AdaIN(2 * width, style_dim), AdaIN(2 * width, style_dim), AdaIN(width, style_dim)])
        self.convs = nn.ModuleList([nn.Conv2d(2 * width, 2 * width, 3, padding=1),
                                    nn.Conv2d(2 * width, width, 3, padding=1),
                                    nn.Conv2d(width, width, 3, padding=1)])
        self.out = nn.Conv2d(width, 1, 3, padding=1)
        self.site_style = nn.Embedding(num_sites, style_dim)  # site-indexed style codes
        self.style_encoder = nn.Sequential(conv_block(1, width, 2), conv_block(width, 2 * width, 2),
                                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, style_dim))

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        h = self.encode(content)
        for i, (ada, conv) in enumerate(zip(self.ada, self.convs)):
            h = F.leaky_relu(ada(h, style), 0.2)
            if i < 2:
                h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            h = conv(h)
        return torch.tanh(self.out(h))


class StyleContentGAN(nn.Module):
    """``gen.*`` is shared (G, the site style table, E); ``disc.*`` stays at the site."""

    def __init__(self, gen: StyleContentGenerator, disc: SiteDiscriminator):
        super().__init__()
        self.gen = gen
        self.disc = disc


@dataclass(frozen=True)
class StyleContentOptions(RecipeOptions):
    gen_width: int = option(16, at_least=2)
    disc_width: int = option(16, at_least=1)
    style_dim: int = option(16, at_least=1)
    lr_gen: float = option(5e-4, above=0)
    lr_disc: float = option(5e-4, above=0)
    beta1: float = option(0.5, at_least=0, below=1)
    beta2: float = option(0.999, at_least=0, below=1)
    disc_steps_per_gen_step: int = option(1, at_least=1)
    content_weight: float = option(1.0, at_least=0)
    style_code_weight: float = option(1.0, at_least=0)
    balance_fake_grad: bool = True
    loss: str = option("nonsat", choices=LOSSES)


# -- the recipe ----------------------------------------------------------------------
class StyleContentCT(Recipe):
    name: ClassVar[str] = "style-content-ct"
    Options: ClassVar[type[RecipeOptions]] = StyleContentOptions
    private_modules: ClassVar[tuple[str, ...]] = ("disc",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = ("gen.",)
    site_indexed_keys: ClassVar[tuple[str, ...]] = ("gen.site_style.weight",)
    consumes: ClassVar[str] = "slices"
    requires_labels: ClassVar[bool] = False  # the site's images only; content is public

    def build(self) -> nn.Module:
        o = self.options
        if self.config.image_size % 8:
            raise ValueError(f"style-content-ct needs image-size divisible by 8, got {self.config.image_size}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return StyleContentGAN(StyleContentGenerator(self.num_sites, o.gen_width, o.style_dim),
                                   SiteDiscriminator(self.config.image_size, self.num_sites, o.disc_width))

    def train_local(self, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        if ctx.public is None:
            raise ValueError("style-content-ct renders its content from the public label maps; this run "
                             "has none (set the public bank: data-root's public/labels)")
        ctx.public.check_size(self.config.image_size)
        self._round_public = ctx.public  # this round's public content source (steps 2-3)
        try:
            return train_gan_round(self, model, ctx, self.real_images)
        finally:
            del self._round_public

    def content(self, n: int, rng: torch.Generator, device) -> torch.Tensor:
        """Public content: random-contrast renderings of public label maps (anatomy only)."""
        maps = self._round_public.draw(n, rng)
        return render_random_contrast(maps, rng, num_classes=self.num_classes).to(device)

    def _fake(self, model: nn.Module, site_index: int, n: int, rng, device):
        content = self.content(n, rng, device)
        site = torch.full((n,), site_index, dtype=torch.long, device=device)
        return model.gen(content, model.gen.site_style(site)), site, content

    def disc_step(self, model, d: DPModule, images, site_index, rng, device) -> float:
        d.zero_grad()
        kind = self.options.loss
        with torch.no_grad():
            fake, site, _ = self._fake(model, site_index, self.config.batch_size, rng, device)
        with d.public_pass():
            loss_fake = disc_loss(d.module(fake, site), real=False, kind=kind).mean()
            public_grads = d.public_grads(loss_fake)
        if self.options.balance_fake_grad:
            public_grads = clip_total_norm(public_grads, self.config.max_grad_norm)
        if images.shape[0] > 0:
            real_site = torch.full((images.shape[0],), site_index, dtype=torch.long, device=device)
            disc_loss(d.module(images, real_site), real=True, kind=kind).mean().backward()
        d.step(public_grads)
        return float(loss_fake.detach())

    def gen_step(self, model, d: DPModule, opt_g, site_index, rng, device) -> tuple[float, float]:
        o = self.options
        with d.frozen() as disc:
            fake, site, content = self._fake(model, site_index, self.config.batch_size, rng, device)
            logits = disc(fake, site)
            code = model.gen.site_style(site).detach()
            style_loss = (model.gen.style_encoder(fake.detach()) - code).pow(2).mean()
            loss = (gen_loss(logits, o.loss).mean() + o.content_weight * content_loss(fake, content).mean()
                    + o.style_code_weight * style_loss)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        return float(loss.detach()), float(torch.sigmoid(logits.detach()).mean())

    # -- sampling and transfer (post-processing of the released networks) --------------
    def sample(self, model: nn.Module, label_maps: torch.Tensor, site_index, generator=None) -> torch.Tensor:
        """Site style on a random-contrast rendering of each label map's anatomy."""
        site = self.site_ids(site_index, label_maps.shape[0])
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        content = render_random_contrast(label_maps.cpu(), gen, num_classes=self.num_classes)
        with self.inference(model) as device:
            return model.gen(content.to(device), model.gen.site_style(site.to(device)))

    def transfer(self, model: nn.Module, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """Content of each image of ``content`` [N,1,S,S] in the style read off ``style``
        [N or 1,1,S,S] (both in [-1, 1], held by the caller)."""
        with self.inference(model) as device:
            code = model.gen.style_encoder(style.to(device).float())
            return model.gen(content.to(device).float(), code.expand(content.shape[0], -1))
