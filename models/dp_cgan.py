"""dp-cgan: a DP GAN that paints a tissue label map in a chosen site's scanner style.

G(one-hot tissue map, site id, noise) -> image in [-1, 1]; D(image, tissue map, site id)
-> one logit per 4x4 patch. The label map (and a site code) modulate every G stage
(SPADE); G ends in a per-site "scanner head" (contrast, blur, noise per tissue); D is a
projection discriminator that sees the label map. A site trains G and D for its OWN site
id only. Design and tuning history: docs/recipes/dp-cgan.md.

Why only D needs DP-SGD (DP.md "Which networks need DP-SGD", "Conditioning"); unit = one
patient (one dataset item):
  1. D is the only network that reads private records (a site's images AND label maps),
     only through ``DPModule`` over ``PrivateTraining``: Poisson sampling, per-patient
     clipping, noise, accounting (accountant named in the PrivacyPlan). D's parameters
     after each step are DP releases.
  2. D's fake term depends only on public label maps (``PublicData``), the site id, fresh
     noise, G and D's released parameters. Its gradient is added after clipping+noise
     (``DPModule.step(public_grads)``): post-processing, not clipped, not charged. Its
     size is FIXED (the config batch size), never the realised Poisson batch size, which
     is private.
  3. The G step reads no real batch: public label maps, the site id, noise, and D's
     released parameters, so G's update is post-processing (no skip on an empty Poisson
     batch needed). ``DPModule.frozen`` refuses if un-noised private state (per-sample or
     summed grads, captured activations) is left on D; tests/models/test_dp_cgan.py proves
     G's update is identical for two different private data sets given the same D.
  4. The scanner-moment release (``moment-release``; models/scanner_moments.py has the
     mechanism and its sensitivity): once per site, before any DP-SGD step, one Gaussian
     mechanism on per-patient tissue statistics, accounted as (sigma, 1.0, 1) and declared
     in ``one_off_releases`` (the DP-SGD noise is calibrated for the composition). The
     site's ledger stores the noisy sum; it is also row k of G's site-indexed buffer
     ``site_moments``, and G is pulled toward it: post-processing of a DP release.
  5. Metrics: losses on the private batch would leave the site unaccounted, so they are
     NOT returned; only public-input losses and scores, step counts and wall time (seen
     anyway as reply latency).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medgen.config import RunConfig
from medgen.models.blocks import one_hot_labels, tissue_statistics
from medgen.models.cgan_networks import ConditionalGAN, ConditionalGenerator, ProjectionDiscriminator
from medgen.models.gan_losses import LOSSES, disc_loss, gen_loss
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import PublicData, Recipe, RoundContext
from medgen.models.scanner_moments import MOMENT_CLIP, moments_from_release, patient_moments
from medgen.privacy.dp_step import DPModule, clip_total_norm

# -- options (why these defaults: docs/recipes/dp-cgan.md, "Options") -----------------
@dataclass(frozen=True)
class CGANOptions(RecipeOptions):
    gen_width: int = option(16, at_least=1)
    disc_width: int = option(16, at_least=1)  # DP noise norm grows with sqrt(#params)
    noise_dim: int = option(64, at_least=1)
    site_dim: int = option(8, at_least=1)
    spade_hidden: int = option(16, at_least=1)
    spade_kernel: int = option(1, at_least=1)
    lr_gen: float = option(5e-4, above=0)
    lr_disc: float = option(5e-4, above=0)
    lr_scanner: float = option(5e-3, above=0)  # the scanner head's few per-site numbers
    beta1: float = option(0.5, at_least=0, below=1)
    beta2: float = option(0.999, at_least=0, below=1)
    disc_steps_per_gen_step: int = option(2, at_least=1)
    moment_release: bool = True  # privacy argument point 4
    moment_noise_multiplier: float = option(3.0, above=0)  # sigma of that release (x MOMENT_CLIP)
    moment_weight: float = option(10.0, at_least=0)  # G's pull toward the released moments
    balance_fake_grad: bool = True  # clip D's fake-term gradient to max-grad-norm, as the real term
    tissue_stats: bool = True  # D's statistics head
    upsample: str = option("bilinear", choices=("bilinear", "nearest"))  # G's x2 upsampling
    psf_radius: int = option(4, at_least=0)  # taps each side of the scanner head's PSF; 0 = none
    share_discriminator: bool = False
    loss: str = option("nonsat", choices=LOSSES)


# -- the recipe ----------------------------------------------------------------------
class DPConditionalGAN(Recipe):
    """Mask-to-image conditional GAN, DP-SGD on D only; see the module docstring."""

    name: ClassVar[str] = "dp-cgan"
    Options: ClassVar[type[RecipeOptions]] = CGANOptions
    private_modules: ClassVar[tuple[str, ...]] = ("disc",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = ("gen.",)
    # the site code and the per-(site, tissue) contrast/noise tables: row k is trained at site k only
    site_indexed_keys: ClassVar[tuple[str, ...]] = (
        "gen.site_embed.weight", "gen.head.class_offset.weight", "gen.head.class_noise.weight",
        "gen.head.blur_raw.weight", "gen.site_moments")

    def __init__(self, config: RunConfig):
        super().__init__(config)
        if self.options.share_discriminator:
            self.shared_prefixes = ("gen.", "disc.")  # D is a DP release too: may travel

    def one_off_releases(self) -> tuple[tuple[float, float, int], ...]:
        """The scanner-moment release (privacy argument, point 4) as its accountant entry."""
        return ((float(self.options.moment_noise_multiplier), 1.0, 1),) if self.options.moment_release else ()

    def build(self) -> nn.Module:
        o, size = self.options, self.config.image_size
        with torch.random.fork_rng(devices=[]):  # deterministic, global RNG untouched
            torch.manual_seed(self.config.seed)
            gen = ConditionalGenerator(size, self.num_sites, o.gen_width, o.noise_dim,
                                       o.site_dim, o.spade_hidden, o.spade_kernel, o.psf_radius,
                                       o.upsample, num_classes=self.num_classes)
            disc = ProjectionDiscriminator(size, self.num_sites, o.disc_width, o.tissue_stats,
                                           num_classes=self.num_classes)
        return ConditionalGAN(gen, disc)

    # -- training ---------------------------------------------------------------------
    def train_local(self, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        o, device, site = self.options, ctx.device, ctx.site_index
        self.check_round(ctx)
        ctx.public.check_size(self.config.image_size)
        model.to(device).train()
        if o.moment_release:  # privacy argument, point 4: once per site, then reused for free
            self.release_once(model.gen.site_moments[site], ctx,
                              functools.partial(patient_moments, num_classes=self.num_classes),
                              MOMENT_CLIP, o.moment_noise_multiplier)
        rng = ctx.generator()
        scanner = model.gen.head.scanner_parameters()
        body = [p for p in model.gen.parameters() if all(p is not q for q in scanner)]
        opt_g = torch.optim.Adam([{"params": body}, {"params": scanner, "lr": o.lr_scanner}],
                                 lr=o.lr_gen, betas=(o.beta1, o.beta2))
        critic = self.private_net(model)
        opt_d = torch.optim.Adam(critic.parameters(), lr=o.lr_disc, betas=(o.beta1, o.beta2))
        ctx.restore_optimizer(opt_g, "opt_gen")
        ctx.restore_optimizer(opt_d, "opt_disc")

        start, sums = time.perf_counter(), {"loss_disc_fake": 0.0, "loss_gen": 0.0, "disc_fake_score": 0.0}
        d_steps = g_steps = 0
        with DPModule(ctx.private, critic, opt_d, ctx.data, self.config.batch_size) as d:
            for i, batch in enumerate(d.batches(ctx.steps)):
                images, labels = self.real_batch(batch, device)
                sums["loss_disc_fake"] += self.disc_step(model, d, images, labels, ctx.public, site, rng, device)
                d_steps += 1
                if (i + 1) % o.disc_steps_per_gen_step == 0 or (i == ctx.steps - 1 and g_steps == 0):
                    loss_g, score = self.gen_step(model, d, opt_g, ctx.public, site, rng, device)
                    sums["loss_gen"] += loss_g
                    sums["disc_fake_score"] += score
                    g_steps += 1

        ctx.keep_optimizer(opt_g, "opt_gen")
        ctx.keep_optimizer(opt_d, "opt_disc")
        ctx.recipe_state["rounds_trained"] = ctx.rounds_done + 1
        return {"loss_gen": sums["loss_gen"] / g_steps, "disc_fake_score": sums["disc_fake_score"] / g_steps,
                "loss_disc_fake": sums["loss_disc_fake"] / d_steps, "disc_steps": float(d_steps),
                "gen_steps": float(g_steps), "seconds": time.perf_counter() - start}

    def disc_step(self, model: nn.Module, d: DPModule, images: torch.Tensor, labels: torch.Tensor,
                  public: PublicData, site_index: int, rng: torch.Generator, device) -> float:
        """One DP step of D: private real term (clipped+noised) + public fake term (added)."""
        d.zero_grad()  # DP.md trap 1
        kind, n_fake = self.options.loss, self.config.batch_size  # fixed: never the Poisson size
        # fake term: public label maps, site id, noise; hooks off -> no per-sample grads
        fake_labels, fake_site = self._public_conditions(public, site_index, n_fake, rng, device)
        with torch.no_grad():
            fake = model.gen(fake_labels, fake_site, *model.gen.draw_noise(n_fake, rng, device))
        with d.public_pass():
            loss_fake = disc_loss(d.module(fake, fake_labels, fake_site), real=False, kind=kind).mean()
            loss_fake = loss_fake + self.extra_fake_loss(model, d, rng, device)
            public_grads = d.public_grads(loss_fake)
        if self.options.balance_fake_grad:
            public_grads = clip_total_norm(public_grads, self.config.max_grad_norm)
        # real term: the only place private records enter; per-sample grads via the hooks.
        # An empty Poisson batch has no backward: step() then takes a noise-only,
        # accounted step (zero-length per-sample grads).
        if images.shape[0] > 0:
            real_site = torch.full((images.shape[0],), site_index, dtype=torch.long, device=device)
            logits = d.module(images, one_hot_labels(labels, self.num_classes), real_site)
            (disc_loss(logits, real=True, kind=kind).mean() + self.extra_real_loss(d, images, labels)).backward()
        d.step(public_grads)  # clip+noise real, add public, step, zero grads
        return float(loss_fake.detach())

    def gen_step(self, model: nn.Module, d: DPModule, opt_g: torch.optim.Optimizer, public: PublicData,
                 site_index: int, rng: torch.Generator, device) -> tuple[float, float]:
        """One G step from public inputs only (post-processing) through D's released weights."""
        o, n = self.options, self.config.batch_size
        with d.frozen() as disc:  # checked free of un-noised state, hooks off, frozen (trap 2)
            labels, site = self._public_conditions(public, site_index, n, rng, device)
            fake = model.gen(labels, site, *model.gen.draw_noise(n, rng, device))
            logits = disc(fake, labels, site)
            loss = gen_loss(logits, o.loss).mean()
            if o.moment_release and o.moment_weight > 0:
                target = moments_from_release(model.gen.site_moments[site_index]).to(fake.device)
                achieved = tissue_statistics(fake, labels).mean(dim=0)
                loss = loss + o.moment_weight * (achieved - target).square().sum()
            loss = loss + self.extra_gen_loss(model, fake, labels)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        return float(loss.detach()), float(torch.sigmoid(logits.detach()).mean())

    # -- extension points (models/red_gan.py): the private module and extra loss terms -----
    def private_net(self, model: nn.Module) -> nn.Module:
        """The ONE module DP-SGD trains (D here); its forward is D's."""
        return model.disc

    def extra_real_loss(self, d: DPModule, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | float:
        """A further per-record term on the private batch (inside the clipped gradient)."""
        return 0.0

    def extra_fake_loss(self, model: nn.Module, d: DPModule, rng: torch.Generator, device) -> torch.Tensor | float:
        """A further public term of the private module's step (added after clipping+noise)."""
        return 0.0

    def extra_gen_loss(self, model: nn.Module, fake: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor | float:
        """A further term of G's loss on generated images of public maps (post-processing)."""
        return 0.0

    def _public_conditions(self, public: PublicData, site_index: int, n: int, rng, device):
        labels = one_hot_labels(public.draw(n, generator=rng), self.num_classes).to(device)
        return labels, torch.full((n,), site_index, dtype=torch.long, device=device)

    # -- sampling and the audit's score (post-processing of the released networks) -----
    def sample(self, model: nn.Module, label_maps: torch.Tensor, site_index: torch.Tensor | int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [N,1,H,W] in [-1,1] on the model's device; eval mode, no grad."""
        site = self.site_ids(site_index, label_maps.shape[0])
        with self.inference(model) as device:
            labels = one_hot_labels(label_maps, self.num_classes).to(device)
            noise = model.gen.draw_noise(label_maps.shape[0], generator, device)
            return model.gen(labels, site.to(device), *noise)

    @torch.no_grad()
    def membership_scores(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          site_index: int) -> torch.Tensor:
        """The audit's white-box score (models/capabilities.py): D's patch logits [N,4,4] of
        real records (a loss attack: the real-data loss is monotone in the logit)."""
        site = self.site_ids(site_index, images.shape[0])
        return model.disc(images.float(), one_hot_labels(labels, self.num_classes), site)
