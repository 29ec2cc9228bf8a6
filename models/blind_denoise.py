"""blind-denoise: a noise-generation network learns each site's real noise, a denoiser learns to remove it.

Blind denoising after METHODS.md #9 (Fu et al. 2022; GCBD, Chen et al. 2018): nobody tells
the site what its noise is. Its own images hold it: in their FLAT regions an image is its
anatomy's local mean plus noise, so each record's flattest windows minus their means
(``flat_noise_patches`` in models/degradations.py: scored on the blurred image, clipped
windows never chosen) are samples of the site's real noise, whatever its kind (Rician,
CT grain, sharp-kernel high-pass noise). A noise GAN learns that distribution:
G(z, site) -> a stationary noise field (white noise through the site's learned k x k colouring
kernel, a valid convolution: no border, any size; its std a separate per-site gain);
D(noise patch) -> a logit from the patch's second-order statistics (rms and autocorrelation
at short lags: the noise's grain). Then noisy/clean pairs are SYNTHESISED:
clean = a random-contrast rendering of a PUBLIC label map (sim/random_contrast.py, noise
off), noisy = clean + G's noise for the site, and a residual CNN denoiser R(noisy, site)
learns to remove it. ``synth-noise = "gaussian"`` trains the same denoiser on white
Gaussian noise of a given std instead (the baseline the method must beat). Why the clean
images are public, numbers and tuning: docs/recipes/blind-denoise.md.

Privacy (unit = one patient = one dataset item; accountant named in the PrivacyPlan):
  1. D (``disc``) is the ONLY network whose loss touches the site's real pixels: its real
     term reads each record's flat windows, inside that record's own loss (the mean over
     its ``patches-per-record`` windows), so a patient yields exactly one per-sample
     gradient (torch.func, checked against an autograd loop in tests), clipped to C,
     noised and accounted by ``DPModule`` over ``PrivateTraining`` (Poisson sampling).
     D never leaves the site (``shared_prefixes`` excludes ``disc.``).
  2. D's fake term reads G's noise from public z only; its gradient is added after
     clipping+noise (post-processing, fixed size: batch-size x patches-per-record).
  3. G's step reads z, the site id and D's released (noised) parameters only
     (``assert_released`` first): post-processing. G is shared.
  4. The denoiser's step reads public label maps (``ctx.public``), public randomness and
     G's output (or Gaussian noise): post-processing of DP releases, no real record, so
     it needs no DP-SGD and no budget. It is shared.
  5. Metrics: public-input losses, step counts and wall time; nothing computed on a real
     record is returned. No one-off release: the plan is exactly Opacus' DP-SGD.
  6. Denoising a holder's own image with the released weights is post-processing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medgen.config import ConfigError
from medgen.models.degradations import Degradation, flat_noise_patches, noise_model_for
from medgen.models.dp_cgan import LOSSES, disc_loss, gen_loss
from medgen.models.noise_gan import NoiseDiscriminator, NoiseGenerator
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import Recipe, RoundContext
from medgen.privacy.dp_step import DPModule, assert_released, clip_total_norm, per_record_grads
from medgen.sim.random_contrast import RandomContrast, render_random_contrast

GAN_STREAM, DENOISER_STREAM = 0, 1  # the round's public-draw streams (RoundContext)
CHUNK = 64                          # images per denoiser call while restoring


# -- networks ------------------------------------------------------------------------
class Denoiser(nn.Module):
    """DnCNN-style residual CNN with a site code: noisy -> noisy - scale x predicted noise. It
    also sees the image's detail (minus its 3x3 mean) in units of ``scale``, where the noise is
    of order one (the raw image spans [-1, 1], the noise a few hundredths of it)."""

    def __init__(self, num_sites: int, width: int, depth: int, site_dim: int, scale: float):
        super().__init__()
        self.scale = scale
        self.site_embed = nn.Embedding(num_sites, site_dim)
        layers: list[nn.Module] = [nn.Conv2d(2 + site_dim, width, 3, padding=1, padding_mode="reflect"), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Conv2d(width, 1, 3, padding=1, padding_mode="reflect"))

    def forward(self, noisy: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        code = self.site_embed(site)[:, :, None, None].expand(-1, -1, *noisy.shape[-2:])
        detail = (noisy - F.avg_pool2d(F.pad(noisy, (1, 1, 1, 1), mode="replicate"), 3, stride=1)) / self.scale
        return noisy - self.scale * self.body(torch.cat([noisy, detail, code], dim=1))


class BlindDenoiser(nn.Module):
    """One module so one state_dict travels: ``gen.*`` and ``denoiser.*`` shared, ``disc.*`` local."""

    def __init__(self, gen: NoiseGenerator, disc: NoiseDiscriminator, denoiser: Denoiser):
        super().__init__()
        self.gen, self.disc, self.denoiser = gen, disc, denoiser


def record_disc_losses(disc: Any, noise: torch.Tensor, valid: torch.Tensor, kind: str) -> torch.Tensor:
    """D's real loss per record [N]: the mean over its valid windows (noise [N,K,1,P,P])."""
    logits = disc(noise.flatten(0, 1)).view(valid.shape)
    return (disc_loss(logits, real=True, kind=kind) * valid).sum(1) / valid.sum(1).clamp(min=1.0)


@dataclass(frozen=True)
class BlindDenoiseOptions(RecipeOptions):
    patch: int = option(4, at_least=4)                    # side of a noise window (px)
    patches_per_record: int = option(8, at_least=1)       # flat windows per patient
    flat_blur_px: float = option(2.0, at_least=0)         # blur before scoring flatness
    noise_scale: float = option(0.02, above=0)            # G's initial std, D's rms unit (network units)
    gen_kernel: int = option(5, at_least=1)               # side of G's per-site colouring kernel (px)
    disc_width: int = option(0, at_least=0)               # 0: D linear in its 7 features (DP noise grows with parameters)
    denoiser_scale: float = option(0.0, at_least=0)       # the denoiser's residual/detail unit; 0: noise-scale
    site_dim: int = option(4, at_least=1)
    denoiser_width: int = option(32, at_least=1)
    denoiser_depth: int = option(5, at_least=2)
    denoiser_steps: int = option(40, at_least=0)          # public steps per round (free)
    lr_gen: float = option(0.02, above=0)                # G has ~k*k+1 parameters per site: large steps
    lr_disc: float = option(0.02, above=0)
    lr_denoiser: float = option(1e-3, above=0)
    beta1: float = option(0.5, at_least=0, below=1)
    beta2: float = option(0.999, at_least=0, below=1)
    disc_steps_per_gen_step: int = option(1, at_least=1)
    loss: str = option("nonsat", choices=LOSSES)
    synth_noise: str = option("learned", choices=("learned", "gaussian"))
    gaussian_std: str = "0.02"  # synth-noise = gaussian: std in network units, one or one per site

    def site_stds(self, num_sites: int) -> list[float]:
        try:
            stds = [float(s) for s in str(self.gaussian_std).split(",")]
        except ValueError:
            raise ConfigError(f"options.gaussian-std must be numbers, got {self.gaussian_std!r}") from None
        if len(stds) not in (1, num_sites) or min(stds) < 0:
            raise ConfigError(f"options.gaussian-std needs one std >= 0 or one per site ({num_sites}), "
                              f"got {self.gaussian_std!r}")
        return stds * num_sites if len(stds) == 1 else stds


class BlindDenoise(Recipe):
    """Noise GAN (DP on D only) + a denoiser trained on synthesised public pairs."""

    name: ClassVar[str] = "blind-denoise"
    Options: ClassVar[type[RecipeOptions]] = BlindDenoiseOptions
    private_modules: ClassVar[tuple[str, ...]] = ("disc",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = ("gen.", "denoiser.")
    site_indexed_keys: ClassVar[tuple[str, ...]] = ("gen.kernel.weight", "gen.log_gain.weight",
                                                    "denoiser.site_embed.weight")
    requires_labels: ClassVar[bool] = False

    def __init__(self, config):
        super().__init__(config)
        self.options.site_stds(self.num_sites)  # checked when the run is configured
        if self.options.patch > config.image_size:
            raise ConfigError(f"options.patch ({self.options.patch}) exceeds image-size {config.image_size}")

    def build(self) -> nn.Module:
        o = self.options
        with torch.random.fork_rng(devices=[]):  # deterministic, global RNG untouched
            torch.manual_seed(self.config.seed)
            return BlindDenoiser(NoiseGenerator(self.num_sites, o.gen_kernel, o.noise_scale),
                                 NoiseDiscriminator(o.disc_width, o.noise_scale),
                                 Denoiser(self.num_sites, o.denoiser_width, o.denoiser_depth, o.site_dim,
                                          o.denoiser_scale or o.noise_scale))

    def degradation(self, intensity: Any = None) -> Degradation:
        """The task this recipe restores (denoise), with the default noise of such data: what
        evaluation and ``medgen restore`` read the task and units from."""
        return Degradation("denoise", noise_model_for(intensity, 0.06, 60.0, 0.8))

    # -- one round ------------------------------------------------------------------
    def train_local(self, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        o, device, site = self.options, ctx.device, ctx.site_index
        self.check_round(ctx)
        if ctx.public is None:
            raise ValueError("blind-denoise trains its denoiser on public label maps: this node has no "
                             "public bank (public-dir, docs/data-layout.md)")
        model.to(device).train()
        rng = ctx.generator(GAN_STREAM)
        opts = {name: torch.optim.Adam(getattr(model, name).parameters(), lr=lr, betas=(o.beta1, o.beta2))
                for name, lr in (("gen", o.lr_gen), ("disc", o.lr_disc), ("denoiser", o.lr_denoiser))}
        for name, opt in opts.items():
            ctx.restore_optimizer(opt, f"opt_{name}")
        start, g_losses, d_steps = time.perf_counter(), [], 0
        with DPModule(ctx.private, model.disc, opts["disc"], ctx.data, self.config.batch_size,
                      grad_sample_mode="no_op") as d:
            for i, batch in enumerate(d.batches(ctx.steps)):
                self.disc_step(model, d, self.real_images(batch, device), site, rng)
                d_steps += 1
                if (i + 1) % o.disc_steps_per_gen_step == 0 or i == ctx.steps - 1 and not g_losses:
                    g_losses.append(self.gen_step(model, opts["gen"], site, rng))
        d_losses = self.denoiser_steps(model, opts["denoiser"], ctx)
        for name, opt in opts.items():
            ctx.keep_optimizer(opt, f"opt_{name}")
        ctx.recipe_state["rounds_trained"] = ctx.rounds_done + 1
        return {"loss_gen": sum(g_losses) / len(g_losses), "disc_steps": float(d_steps),
                "gen_steps": float(len(g_losses)), "denoiser_steps": float(len(d_losses)),
                "loss_denoiser": sum(d_losses) / max(1, len(d_losses)), "seconds": time.perf_counter() - start}

    def fake_patches(self, model: nn.Module, site_index: int, n: int, rng: torch.Generator) -> torch.Tensor:
        """n generated noise windows [n,1,P,P], each minus its mean (as the real ones are)."""
        device = next(model.parameters()).device
        site = torch.full((n,), site_index, dtype=torch.long)
        noise = model.gen.field(n, self.options.patch, site, rng, device)
        return noise - noise.mean(dim=(-2, -1), keepdim=True)

    def disc_step(self, model: nn.Module, d: DPModule, images: torch.Tensor, site_index: int,
                  rng: torch.Generator) -> None:
        """One DP step of D: per-patient real term (clipped + noised) + public fake term."""
        o = self.options
        d.zero_grad()
        with torch.no_grad():
            fake = self.fake_patches(model, site_index, self.config.batch_size * o.patches_per_record, rng)
        fake_loss = disc_loss(model.disc(fake), real=False, kind=o.loss).mean()
        public_grads = clip_total_norm(d.public_grads(fake_loss), self.config.max_grad_norm)
        if images.shape[0] > 0:  # an empty Poisson batch: step() takes a noise-only step
            noise, valid = flat_noise_patches(images, o.patch, o.patches_per_record, o.flat_blur_px)
            grads = per_record_grads(model.disc, partial(record_disc_losses, kind=o.loss), noise, valid)
            for name, p in model.disc.named_parameters():
                p.grad_sample = grads[name]
        d.step(public_grads)

    def gen_step(self, model: nn.Module, opt: torch.optim.Optimizer, site_index: int,
                 rng: torch.Generator) -> float:
        """One G step from z and the site id through D's released weights only."""
        assert_released(model.disc)
        model.disc.requires_grad_(False)
        try:
            n = self.config.batch_size * self.options.patches_per_record
            loss = gen_loss(model.disc(self.fake_patches(model, site_index, n, rng)), self.options.loss).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            model.disc.requires_grad_(True)
        return float(loss.detach())

    def synthetic_pairs(self, model: nn.Module, public: Any, site_index: int, n: int,
                        rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy, clean) [n,1,S,S]: public renderings, plus G's noise for the site (or Gaussian)."""
        device = next(model.parameters()).device
        clean = render_random_contrast(public.draw(n, rng), rng, RandomContrast(noise=(0.0, 0.0)),
                                       num_classes=self.num_classes).to(device)
        if self.options.synth_noise == "gaussian":
            std = self.options.site_stds(self.num_sites)[site_index]
            noise = std * torch.randn(clean.shape, generator=rng).to(device)
        else:
            with torch.no_grad():
                site = torch.full((n,), site_index, dtype=torch.long)
                noise = model.gen.field(n, clean.shape[-1], site, rng, device)
        return (clean + noise).clamp(-1.0, 1.0), clean

    def denoiser_steps(self, model: nn.Module, opt: torch.optim.Optimizer, ctx: RoundContext) -> list[float]:
        rng, losses = ctx.generator(DENOISER_STREAM), []
        site = torch.full((self.config.batch_size,), ctx.site_index, dtype=torch.long, device=ctx.device)
        for _ in range(self.options.denoiser_steps):
            noisy, clean = self.synthetic_pairs(model, ctx.public, ctx.site_index, self.config.batch_size, rng)
            loss = F.mse_loss(model.denoiser(noisy, site), clean)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    # -- restoration and sampling (post-processing of the released networks) -----------
    def restore(self, model: nn.Module, condition: torch.Tensor, site_index: torch.Tensor | int,
                generator: torch.Generator | None = None, steps: int | None = None) -> torch.Tensor:
        """Denoised images [N,1,S,S] in [-1,1] from noisy ones (``condition``'s channel 0);
        deterministic (``generator`` and ``steps`` are the restorer contract's, unused)."""
        site = self.site_ids(site_index, condition.shape[0])
        with self.inference(model) as device:
            out = [model.denoiser(condition[i:i + CHUNK, :1].to(device), site[i:i + CHUNK].to(device))
                   for i in range(0, condition.shape[0], CHUNK)]
        return torch.cat(out).clamp(-1.0, 1.0) if out else condition[:, :1].clone()

    def sample(self, model, label_maps, site_index, generator=None):
        """The Recipe contract's sampler: the site's generated NOISE on a mid-grey image, one per
        label map (values not read); the denoising metrics are evaluation/restoration.py's."""
        n, size = label_maps.shape[0], label_maps.shape[-1]
        site = self.site_ids(site_index, n)
        with self.inference(model) as device:
            return model.gen.field(n, size, site, generator, device).clamp(-1.0, 1.0)
