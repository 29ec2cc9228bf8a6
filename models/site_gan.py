"""site-gan: a DP GAN conditioned on the site only; it needs no label maps.

G(site id, noise) -> image in [-1, 1]; D(image, site id) -> one logit per 4x4 patch. A
site trains G and D for its OWN site id only, from its images alone: a site without a
``labels/`` folder (or whose dataset.toml declares no labels) trains this recipe, while
the mask-conditional recipes refuse it at plan time (``requires_labels``). ``sample``
takes label maps only for their count and size (the Recipe contract), never their values.
Design notes: docs/recipes/site-gan.md.

Why only D needs DP-SGD (DP.md "Which networks need DP-SGD"); unit = one patient (one
dataset item):
  1. D is the only network that reads private records (the site's images; the label slot
     of a dataset item is never read), only through ``DPModule`` over ``PrivateTraining``:
     Poisson sampling, per-patient clipping, noise, accounting (accountant named in the
     PrivacyPlan). D's parameters after each step are DP releases.
  2. D's fake term depends only on the site id, fresh noise, G and D's released
     parameters. Its gradient is added after clipping+noise (``DPModule.step(public_grads)``):
     post-processing, not clipped, not charged; its size is FIXED (the config batch size),
     never the realised (private) Poisson batch size.
  3. The G step reads no real batch: the site id, noise and D's released parameters
     (``DPModule.frozen`` refuses if un-noised private state is left on D), so G's update
     is post-processing.
  4. No one-off release with the default ``schedule = "fixed"``: the plan is exactly
     Opacus' DP-SGD calibration. ``schedule = "adaptive"`` (Adaptive MedGAN) adds one
     declared Gaussian release per round of the critic's real-data mean, planned and
     accounted in the same history; its own numbered argument is at the top of
     models/adaptive_schedule.py. It changes only how many (free) G steps a round takes.
  5. Metrics: only public-input losses and scores, step counts and wall time (losses on
     the private batch would leave the site unaccounted), and post-processing of (4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medgen.config import ConfigError
from medgen.models.adaptive_schedule import SCHEDULES, AdaptiveSchedule
from medgen.models.blocks import SiteDiscriminator, group_count
from medgen.models.gan_losses import LOSSES, disc_loss, gen_loss
from medgen.models.gan_round import train_gan_round
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import Recipe, RoundContext
from medgen.privacy.dp_step import DPModule, clip_total_norm


# -- networks ------------------------------------------------------------------------
class SiteGenerator(nn.Module):
    """cat(z, site code) -> S/8 feature map -> three x2 upsampling conv stages -> tanh.
    GroupNorm, not BatchNorm: the same blocks could move behind DP-SGD unchanged."""

    def __init__(self, image_size: int, num_sites: int, width: int, noise_dim: int, site_dim: int):
        super().__init__()
        self.noise_dim, self.image_size, self.base = noise_dim, image_size, image_size // 8
        channels = [4 * width, 4 * width, 2 * width, width]
        self.site_embed = nn.Embedding(num_sites, site_dim)
        self.project = nn.Linear(noise_dim + site_dim, channels[0] * self.base * self.base)
        stages: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            stages += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(c_in, c_out, 3, padding=1),
                       nn.GroupNorm(group_count(c_out), c_out), nn.LeakyReLU(0.2)]
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(channels[-1], 1, 3, padding=1)
        # a per-site output offset and gain: the scanner's global level, learnt fast
        self.site_level = nn.Embedding(num_sites, 2)
        nn.init.zeros_(self.site_level.weight)

    def forward(self, site: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.site_embed(site)], dim=1))
        x = self.out(self.stages(h.view(z.shape[0], -1, self.base, self.base)))
        level = self.site_level(site)[:, :, None, None]
        return torch.tanh(x * (1.0 + level[:, 1:]) + level[:, :1])

    def draw_noise(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(n, self.noise_dim, generator=generator, device=gen_device).to(device)


class SiteGAN(nn.Module):
    """One module so one state_dict travels: ``gen.*`` is shared, ``disc.*`` stays local."""

    def __init__(self, gen: SiteGenerator, disc: SiteDiscriminator):
        super().__init__()
        self.gen = gen
        self.disc = disc


@dataclass(frozen=True)
class SiteGANOptions(RecipeOptions):
    gen_width: int = option(16, at_least=1)
    disc_width: int = option(16, at_least=1)
    noise_dim: int = option(64, at_least=1)
    site_dim: int = option(8, at_least=1)
    lr_gen: float = option(5e-4, above=0)
    lr_disc: float = option(5e-4, above=0)
    beta1: float = option(0.5, at_least=0, below=1)
    beta2: float = option(0.999, at_least=0, below=1)
    disc_steps_per_gen_step: int = option(2, at_least=1)
    balance_fake_grad: bool = True  # clip D's fake-term gradient to max-grad-norm, as the real term
    loss: str = option("nonsat", choices=LOSSES)
    # Adaptive MedGAN (models/adaptive_schedule.py): G steps per D step from a released
    # Wasserstein estimate W, clamp(exp(W / wd-scale) / disc-steps-per-gen-step, min, max)
    schedule: str = option("fixed", choices=SCHEDULES)
    wd_noise: float = option(4.0, above=0)     # noise multiplier of the per-round release
    wd_bound: float = option(2.0, above=0)     # per-patient critic means clamped to +-bound
    wd_scale: float = option(0.25, above=0)
    min_gen_per_disc: float = option(0.25, above=0)
    max_gen_per_disc: float = option(4.0, above=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_gen_per_disc > self.max_gen_per_disc:
            raise ConfigError(f"options.min-gen-per-disc ({self.min_gen_per_disc:g}) exceeds "
                              f"options.max-gen-per-disc ({self.max_gen_per_disc:g})")


# -- the recipe ----------------------------------------------------------------------
class SiteConditionalGAN(Recipe):
    """Site-conditional GAN, DP-SGD on D only, no label maps; see the module docstring."""

    name: ClassVar[str] = "site-gan"
    Options: ClassVar[type[RecipeOptions]] = SiteGANOptions
    private_modules: ClassVar[tuple[str, ...]] = ("disc",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = ("gen.",)
    site_indexed_keys: ClassVar[tuple[str, ...]] = ("gen.site_embed.weight", "gen.site_level.weight")
    consumes: ClassVar[str] = "slices"
    requires_labels: ClassVar[bool] = False

    def build(self) -> nn.Module:
        o, size = self.options, self.config.image_size
        with torch.random.fork_rng(devices=[]):  # deterministic, global RNG untouched
            torch.manual_seed(self.config.seed)
            gen = SiteGenerator(size, self.num_sites, o.gen_width, o.noise_dim, o.site_dim)
            disc = SiteDiscriminator(size, self.num_sites, o.disc_width)
        return SiteGAN(gen, disc)

    def adaptive(self) -> AdaptiveSchedule | None:
        o = self.options
        if o.schedule != "adaptive":
            return None
        return AdaptiveSchedule(o.wd_noise, o.wd_bound, 1.0 / o.disc_steps_per_gen_step, o.wd_scale,
                                o.min_gen_per_disc, o.max_gen_per_disc, fake_count=4 * self.config.batch_size)

    def one_off_releases(self) -> tuple[tuple[float, float, int], ...]:
        schedule = self.adaptive()
        return schedule.releases(self.config.num_rounds) if schedule is not None else ()

    def train_local(self, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        schedule = self.adaptive()
        if schedule is None:
            return train_gan_round(self, model, ctx, self.real_images)  # models/gan_round.py
        ratio = schedule.plan_round(self, model, ctx)  # released values only
        ratio = 1.0 / self.options.disc_steps_per_gen_step if ratio is None else ratio
        metrics = train_gan_round(self, model, ctx, self.real_images, gen_per_disc=ratio)
        return {**metrics, **schedule.release(self, model, ctx), "gen_per_disc": ratio}

    def _fake(self, model: nn.Module, site_index: int, n: int, rng, device) -> tuple[torch.Tensor, torch.Tensor]:
        site = torch.full((n,), site_index, dtype=torch.long, device=device)
        return model.gen(site, model.gen.draw_noise(n, rng, device)), site

    def disc_step(self, model: nn.Module, d: DPModule, images: torch.Tensor, site_index: int,
                  rng: torch.Generator, device) -> float:
        """One DP step of D: private real term (clipped+noised) + public fake term (added)."""
        d.zero_grad()  # DP.md trap 1
        kind = self.options.loss
        with torch.no_grad():
            fake, fake_site = self._fake(model, site_index, self.config.batch_size, rng, device)
        with d.public_pass():
            loss_fake = disc_loss(d.module(fake, fake_site), real=False, kind=kind).mean()
            public_grads = d.public_grads(loss_fake)
        if self.options.balance_fake_grad:
            public_grads = clip_total_norm(public_grads, self.config.max_grad_norm)
        if images.shape[0] > 0:  # an empty Poisson batch: step() takes a noise-only step
            real_site = torch.full((images.shape[0],), site_index, dtype=torch.long, device=device)
            disc_loss(d.module(images, real_site), real=True, kind=kind).mean().backward()
        d.step(public_grads)
        return float(loss_fake.detach())

    def gen_step(self, model: nn.Module, d: DPModule, opt_g: torch.optim.Optimizer, site_index: int,
                 rng: torch.Generator, device) -> tuple[float, float]:
        """One G step from the site id and noise only, through D's released weights."""
        with d.frozen() as disc:  # checked free of un-noised state, hooks off, frozen
            fake, site = self._fake(model, site_index, self.config.batch_size, rng, device)
            logits = disc(fake, site)
            loss = gen_loss(logits, self.options.loss).mean()
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        return float(loss.detach()), float(torch.sigmoid(logits.detach()).mean())

    # -- sampling and the audit's score (post-processing of the released networks) -----
    def sample(self, model: nn.Module, label_maps: torch.Tensor, site_index: torch.Tensor | int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [N,1,H,W] in [-1,1]: one per label map, whose values are not used."""
        n = label_maps.shape[0]
        site = self.site_ids(site_index, n)
        if tuple(label_maps.shape[-2:]) != (self.config.image_size,) * 2:
            raise ValueError(f"site-gan samples at image-size {self.config.image_size}, asked for "
                             f"{tuple(label_maps.shape[-2:])}")
        with self.inference(model) as device:
            return model.gen(site.to(device), model.gen.draw_noise(n, generator, device))

    @torch.no_grad()
    def membership_scores(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          site_index: int) -> torch.Tensor:
        """The audit's white-box score: D's patch logits [N,4,4] of real records."""
        return model.disc(images.float(), self.site_ids(site_index, images.shape[0]))
