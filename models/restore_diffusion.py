"""restore-diffusion: image-conditioned diffusion for denoising, x2/x4 super-resolution and inpainting.

Med-cDiff's own tasks (METHODS.md #4, Hung et al. 2023): the condition image (noisy,
up-sampled low-res, or masked + its mask) is concatenated channel-wise with x_t and a U-Net
(cddpm's ``build_denoiser``: MONAI ``DiffusionModelUNet`` with a site embedding) predicts
the target, trained with the plain MSE; sampling is deterministic DDIM (models/ddim.py)
with the same condition. Every site makes its training pairs from its OWN images with the
task's forward model (models/degradations.py; noise in the units of its manifest: Rician
for MR, correlated HU noise for CT), so no labels are read: ``requires_labels = False``,
an unlabelled hospital trains it. With ``residual`` (default) the diffusion runs on
x0 - base, base = the condition's image channel (the noisy image, the bicubic up-sampling,
the image with the hole at 0): the network learns only the correction to the classical
answer, which is what a small DP budget can afford. Tuning and numbers:
docs/recipes/restore-diffusion.md.

One recipe with a ``task`` option, not one per task: the tasks share the network, the
loss, the DP step, DDIM and this privacy argument, and differ only in a forward model (a
function of the image and public randomness) and the number of condition channels. Four
files would be four copies of one privacy argument differing in one line; a run trains
one task (its weights are that task's), chosen in the run config like any option.

Privacy (unit = one patient = one dataset item; accountant named in the PrivacyPlan):
  1. The denoiser is the only network and it reads private records (the site's images)
     in every step, so all of it is the private module (``private_modules =
     ("denoiser",)``), trained only through ``DPModule`` over ``PrivateTraining``: Poisson
     sampling of patients, one clipped gradient per patient, Gaussian noise, accounting.
     Every set of released weights is a DP release; everything travels; Adam's moments
     (post-processing of noised gradients) stay on the node.
  2. The training pair of record i (degraded condition, target) is computed INSIDE that
     record's loss from record i and public randomness only (stream 1 of the round seed:
     noise, masks; stream 0: diffusion timesteps and noise), and the loss is the mean over
     ``noise-draws`` draws (DPDM), so a patient yields exactly ONE per-sample gradient of
     norm <= C, as in plain DP-SGD. The forward model's parameters come from the options
     and the manifest's intensity policy (configuration, not data).
  3. The label slot of a dataset item is never read; no one-off release: the plan is
     exactly Opacus' DP-SGD calibration.
  4. Restoration and ``sample`` are post-processing: the released weights, an image its
     holder restores (the holder's own data, never sent anywhere), a site id, fresh noise.
  5. Metrics: step counts and wall time only; a loss on the private batch is an un-noised
     function of private data and is not returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from medgen.config import ConfigError
from medgen.models.cddpm import DenoiserNetwork, build_denoiser, record_losses
from medgen.models.ddim import alphas_cumprod, ddim_step, ddim_timesteps, training_target
from medgen.models.degradations import TASKS, Degradation, noise_model_for
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import Recipe, RoundContext
from medgen.models.tissue_prior import denoiser_input
from medgen.privacy.dp_step import DPModule, per_record_grads

SAMPLE_CHUNK = 64  # images per denoiser call while restoring (bounds memory)
DIFFUSION_STREAM, DEGRADATION_STREAM = 0, 1  # the round's public-draw streams (RoundContext)


@dataclass(frozen=True)
class RestoreOptions(RecipeOptions):
    task: str = option("denoise", choices=TASKS)
    channels: str = "16,32,64"       # UNet level widths; each level halves the resolution
    res_blocks: int = option(1, at_least=1)
    norm_groups: int = option(8, at_least=1)
    train_timesteps: int = option(1000, at_least=1)
    schedule: str = option("linear_beta", choices=("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"))
    prediction: str = option("sample", choices=("epsilon", "sample", "v_prediction"))
    sample_steps: int = option(10, at_least=1)  # DDIM steps when restoring
    noise_draws: int = option(1, at_least=1)    # DPDM noise multiplicity K
    grad_sample_mode: str = option("vmap", choices=("hooks", "vmap"))
    residual: bool = True             # diffuse x0 - base (see the module docstring)
    lr: float = option(2e-3, above=0)
    beta1: float = option(0.9, at_least=0, below=1)
    beta2: float = option(0.999, at_least=0, below=1)
    mr_noise: float = option(0.06, above=0)        # denoise, MR: Rician std on the [0, 1] intensity
    ct_noise_hu: float = option(60.0, above=0)     # denoise, CT: low-dose noise std in HU
    ct_grain_px: float = option(0.8, at_least=0)   # denoise, CT: the noise's grain (pixels)
    hole_fraction: float = option(0.25, above=0, below=1)  # inpaint: hole side / image size

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [w for w in self.channel_widths if w % self.norm_groups]
        if bad:
            raise ConfigError(f"options.channels {bad} not divisible by options.norm-groups {self.norm_groups}")
        if self.sample_steps > self.train_timesteps:
            raise ConfigError(f"options.sample-steps ({self.sample_steps}) must be <= "
                              f"options.train-timesteps ({self.train_timesteps})")
        if self.grad_sample_mode == "hooks" and self.noise_draws != 1:
            raise ConfigError("options.noise-draws > 1 needs options.grad-sample-mode = \"vmap\" "
                              "(hooks would clip each draw, not each patient)")

    @property
    def channel_widths(self) -> tuple[int, ...]:
        try:
            widths = tuple(int(w) for w in str(self.channels).split(","))
        except ValueError:
            raise ConfigError(f"options.channels must be comma-separated integers, got {self.channels!r}") from None
        if not widths or min(widths) < 1:
            raise ConfigError(f"options.channels must list positive widths, got {self.channels!r}")
        return widths


class RestoreDiffusion(Recipe):
    """Image-conditioned DDPM for one restoration task, DP-SGD on the whole denoiser."""

    name: ClassVar[str] = "restore-diffusion"
    Options: ClassVar[type[RecipeOptions]] = RestoreOptions
    private_modules: ClassVar[tuple[str, ...]] = ("denoiser",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = None
    site_indexed_keys: ClassVar[tuple[str, ...]] = ("denoiser.class_embedding.weight",)
    requires_labels: ClassVar[bool] = False

    def __init__(self, config):
        super().__init__(config)
        o, depth = self.options, len(self.options.channel_widths) - 1
        if config.image_size % (2 ** depth):
            raise ConfigError(f"image-size {config.image_size} is not divisible by 2^{depth} "
                              f"(options.channels has {depth + 1} levels)")
        self.abar = alphas_cumprod(o.train_timesteps, o.schedule, o.prediction)

    def degradation(self, intensity: Any = None) -> Degradation:
        """The task's forward model for data with this intensity policy (a manifest's
        ``intensity``; None: MR-like percentile units)."""
        o = self.options
        return Degradation(o.task, noise_model_for(intensity, o.mr_noise, o.ct_noise_hu, o.ct_grain_px),
                           o.hole_fraction)

    def build(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # deterministic, global RNG untouched
            torch.manual_seed(self.config.seed)
            return DenoiserNetwork(build_denoiser(self.options, self.num_sites,
                                                 self.degradation().condition_channels))

    # -- training ---------------------------------------------------------------------
    def train_local(self, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        o, device = self.options, ctx.device
        self.check_round(ctx)
        model.to(device).train()
        degradation = self.degradation(getattr(getattr(ctx.data, "manifest", None), "intensity", None))
        rng, rng_pairs = ctx.generator(DIFFUSION_STREAM), ctx.generator(DEGRADATION_STREAM)
        opt = torch.optim.Adam(model.denoiser.parameters(), lr=o.lr, betas=(o.beta1, o.beta2))
        ctx.restore_optimizer(opt, "opt_denoiser")
        mode = "no_op" if o.grad_sample_mode == "vmap" else "hooks"
        start, taken = time.perf_counter(), 0
        with DPModule(ctx.private, model.denoiser, opt, ctx.data, self.config.batch_size,
                      grad_sample_mode=mode) as d:
            for batch in d.batches(ctx.steps):
                d.zero_grad()
                images = self.real_images(batch, device)
                if images.shape[0] > 0:  # empty Poisson batch: step() takes a noise-only step
                    self.private_backward(model.denoiser, d.module, images, degradation,
                                          ctx.site_index, rng, rng_pairs)
                d.step()
                taken += 1
        ctx.keep_optimizer(opt, "opt_denoiser")
        ctx.recipe_state["rounds_trained"] = ctx.rounds_done + 1
        return {"denoiser_steps": float(taken), "noise_draws": float(o.noise_draws),
                "seconds": time.perf_counter() - start}

    def training_pairs(self, images: torch.Tensor, degradation: Degradation, rng: torch.Generator,
                       rng_pairs: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(condition [N,C,S,S], x_t [N,K,1,S,S], t [N,K], target [N,K,1,S,S]) of each record:
        its own degradation and K diffusion draws, from the public generators only."""
        degraded = degradation.apply(images.cpu(), rng_pairs)
        condition = degraded.condition.to(images.device)
        x0 = images - degradation.base(degraded).to(images.device) if self.options.residual else images
        n, k = images.shape[0], self.options.noise_draws
        t = torch.randint(0, self.options.train_timesteps, (n, k), generator=rng)
        noise = torch.randn((n, k, *images.shape[1:]), generator=rng).to(images.device)
        abar = self.abar[t].to(images.device, images.dtype)[..., None, None, None]
        x0 = x0.unsqueeze(1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        return condition, x_t, t.to(images.device), training_target(x0.expand_as(noise), noise, abar,
                                                                      self.options.prediction)

    def private_backward(self, denoiser: nn.Module, wrapped: nn.Module, images: torch.Tensor,
                         degradation: Degradation, site_index: int, rng: torch.Generator,
                         rng_pairs: torch.Generator) -> None:
        """Fill ``p.grad_sample`` of the denoiser with one gradient per record (the private batch)."""
        condition, x_t, t, target = self.training_pairs(images, degradation, rng, rng_pairs)
        site = torch.full((images.shape[0],), site_index, dtype=torch.long, device=images.device)
        if self.options.grad_sample_mode == "hooks":
            record_losses(wrapped, x_t, condition, site, t, target).mean().backward()
            return
        grads = per_record_grads(denoiser, record_losses, x_t, condition, site, t, target)
        for name, p in denoiser.named_parameters():
            if p.requires_grad:
                p.grad_sample = grads[name]

    # -- restoration and sampling (post-processing of the released denoiser) -----------
    def restore(self, model: nn.Module, condition: torch.Tensor, site_index: torch.Tensor | int,
                generator: torch.Generator | None = None, steps: int | None = None) -> torch.Tensor:
        """Restored images [N,1,S,S] in [-1,1] from ``condition`` (``Degraded.condition``) by
        DDIM; inpainting keeps the known pixels as measured."""
        site = self.site_ids(site_index, condition.shape[0])
        timesteps = ddim_timesteps(self.options.train_timesteps, steps or self.options.sample_steps)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn((condition.shape[0], 1, *condition.shape[-2:]), generator=generator, device=gen_device)
        with self.inference(model) as device:
            out = [self._ddim(model.denoiser, noise[i:i + SAMPLE_CHUNK].to(device),
                              condition[i:i + SAMPLE_CHUNK].to(device), site[i:i + SAMPLE_CHUNK].to(device),
                              timesteps) for i in range(0, condition.shape[0], SAMPLE_CHUNK)]
        return torch.cat(out) if out else noise

    def _ddim(self, denoiser, x, condition, site, timesteps: list[int]) -> torch.Tensor:
        abar = self.abar.tolist()
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            out = denoiser(denoiser_input(x, condition), t_batch, class_labels=site)
            prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            x = ddim_step(out, x, abar[t], prev, self.options.prediction)
        base = condition[:, :1]
        x = base + x if self.options.residual else x
        if self.options.task == "inpaint":  # the measured pixels are known exactly
            known = condition[:, 1:2]
            x = known * base + (1 - known) * x
        return x.clamp(-1.0, 1.0)

    def sample(self, model, label_maps, site_index, generator=None):
        """The Recipe contract's sampler: the restoration of an EMPTY measurement (condition
        all zero, no pixel known), one per label map (whose values are not read). For
        ``inpaint`` that is unconditional generation; for the other tasks the images mean
        little, and the task's metrics are evaluation/restoration.py's."""
        n, size = label_maps.shape[0], label_maps.shape[-1]
        condition = torch.zeros(n, self.degradation().condition_channels, size, size)
        return self.restore(model, condition, site_index, generator)
