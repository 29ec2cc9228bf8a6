"""cddpm: a conditional DDPM that paints a tissue label map in a chosen site's scanner style.

The Med-cDiff way (METHODS.md #4): the condition is concatenated channel-wise with the
noisy image x_t and a U-Net (MONAI ``DiffusionModelUNet``) predicts the target, trained
with the plain MSE. The condition is the one-hot tissue map (mask-to-image) and the site
a class embedding added to every residual block's timestep embedding: one network renders
any anatomy in any site's style. With ``tissue-prior`` (default) the UNet diffuses around a
per-(site, tissue) intensity table (models/tissue_prior.py). Sampling is deterministic DDIM
(models/ddim.py). Site rows (the class embedding, the prior's tables) are federated by
their own site (``site_indexed_keys``). Design and tuning history: docs/recipes/cddpm.md.

Privacy (unit = one patient = one dataset item; accountant named in the PrivacyPlan):
  1. The denoiser (with its prior tables) is the only network, and it reads private
     records (a site's images AND their label maps) in every step, so all of it is the
     private module (``private_modules = ("denoiser",)``), trained only through
     ``DPModule`` over ``PrivateTraining``: Poisson sampling of patients, one clipped
     gradient per patient, Gaussian noise, accounting. Each released set of weights is a
     DP release; everything travels (``shared_prefixes = None``); Adam's moments
     (post-processing of noised gradients) stay on the node.
  2. Noise multiplicity (DPDM, Dockhorn et al. 2023): each record's loss is the MEAN over
     ``noise-draws`` (timestep, noise) draws before clipping, so a patient still yields
     exactly ONE per-sample gradient of norm <= C: lower variance at no privacy cost. The
     draws come from a seeded generator independent of the data.
  3. Sampling is post-processing: ``sample`` reads only the released weights, label maps
     from the PUBLIC anatomy bank (or any public/atlas map), a site id, and fresh noise.
     Labelled synthetic pairs in any site's style cost no further privacy, and a
     segmenter trained on them (evaluation/utility.py) needs no DP.
  4. The scanner-moment release (``moment-release``, with the prior): before its first
     DP-SGD step a site releases its per-patient tissue statistics once (one Gaussian
     mechanism, models/scanner_moments.py has the sensitivity argument), declared in
     ``one_off_releases`` and accounted in the same history; the ledger stores it. Its
     row of the prior table starts at the released tissue means: post-processing.
  5. Metrics: losses on the private batch are un-noised functions of private data, so
     they are NOT returned; only step counts and wall time (seen anyway as latency).

Per-sample gradients (``grad-sample-mode``): "vmap" (torch.func per record, the mean over
its K draws, written into ``p.grad_sample``; Opacus in "no_op" mode clips, noises and
accounts) or "hooks" (Opacus' hooks; K must be 1, else it would clip per draw, not per
patient). Both are checked against the per-record autograd oracle in the tests.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from medgen.config import ConfigError
from medgen.models.blocks import one_hot_labels
from medgen.models.ddim import alphas_cumprod, ddim_step, ddim_timesteps, training_target
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import Recipe, RoundContext
from medgen.models.scanner_moments import MOMENT_CLIP, patient_moments
from medgen.models.tissue_prior import TissuePriorDenoiser, denoiser_input
from medgen.privacy.dp_step import DPModule, per_record_grads

SAMPLE_CHUNK = 64  # images per denoiser call while sampling (bounds memory)
# the audit's loss attack: early timesteps, where the denoiser nearly copies its input and a
# memorised record stands out most (fractions of train-timesteps), one fixed noise each
MEMBERSHIP_TIMESTEPS = (0.02, 0.05, 0.1, 0.2)


# -- options (why these defaults: docs/recipes/cddpm.md, "Options") -------------------
@dataclass(frozen=True)
class CDDPMOptions(RecipeOptions):
    channels: str = "16,32,64"      # UNet level widths; each level halves the resolution
    res_blocks: int = option(1, at_least=1)
    norm_groups: int = option(8, at_least=1)
    train_timesteps: int = option(1000, at_least=1)
    schedule: str = option("linear_beta", choices=("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"))
    prediction: str = option("sample", choices=("epsilon", "sample", "v_prediction"))
    sample_steps: int = option(20, at_least=1)  # DDIM steps when sampling
    noise_draws: int = option(1, at_least=1)    # DPDM noise multiplicity K
    grad_sample_mode: str = option("vmap", choices=("hooks", "vmap"))
    lr: float = option(2e-3, above=0)
    tissue_prior: bool = True       # models/tissue_prior.py
    moment_release: bool = True     # with tissue-prior: privacy argument point 4
    moment_noise_multiplier: float = option(3.0, above=0)  # sigma of that release (x MOMENT_CLIP)
    prior_blur: bool = True         # a per-site Gaussian blur of the prior (its width is learned)
    lr_prior: float = option(1e-2, above=0)  # Adam lr of the prior's tables
    prior_gain: float = option(1.0, above=0)  # the tables' gain in the forward pass
    beta1: float = option(0.9, at_least=0, below=1)
    beta2: float = option(0.999, at_least=0, below=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [w for w in self.channel_widths if w % self.norm_groups]
        if bad:
            raise ConfigError(f"options.channels {bad} not divisible by options.norm-groups "
                              f"{self.norm_groups} (GroupNorm needs it)")
        if self.sample_steps > self.train_timesteps:
            raise ConfigError(f"options.sample-steps ({self.sample_steps}) must be <= "
                              f"options.train-timesteps ({self.train_timesteps})")
        if self.grad_sample_mode == "hooks" and self.noise_draws != 1:
            raise ConfigError("options.noise-draws > 1 needs options.grad-sample-mode = \"vmap\": "
                              "Opacus hooks would clip each noise draw separately, not each patient")
        if self.tissue_prior and self.prediction != "sample":
            raise ConfigError("options.tissue-prior (on by default) needs options.prediction = "
                              "\"sample\" (the prior is an offset of the predicted x0); set "
                              "options.tissue-prior = false to predict epsilon or v")

    @property
    def channel_widths(self) -> tuple[int, ...]:
        try:
            widths = tuple(int(w) for w in str(self.channels).split(","))
        except ValueError:
            raise ConfigError(f"options.channels must be comma-separated integers like \"16,32,64\", "
                              f"got {self.channels!r}") from None
        if not widths or min(widths) < 1:
            raise ConfigError(f"options.channels must list positive widths, got {self.channels!r}")
        return widths


# -- the network and the per-record loss (shared by the fast paths and the oracle) ----
class DenoiserNetwork(nn.Module):
    """One module so one state_dict travels: ``denoiser.*`` (all of it, a DP release)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser


def build_denoiser(options: CDDPMOptions, num_sites: int, num_classes: int) -> DiffusionModelUNet:
    """The UNet: input = the noisy image + one channel per class of the label schema."""
    widths = options.channel_widths
    return DiffusionModelUNet(
        spatial_dims=2, in_channels=1 + num_classes, out_channels=1, channels=widths,
        num_res_blocks=options.res_blocks, attention_levels=(False,) * len(widths),
        norm_num_groups=options.norm_groups, num_class_embeds=num_sites)


def record_losses(denoiser: nn.Module, x_t: torch.Tensor, condition: torch.Tensor,
                  site: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of each record, the mean over its K draws: [N].

    x_t, target: [N,K,1,H,W]; condition: one-hot map [N,C,H,W]; site: [N]; t: [N,K].
    The K draws of a record are rows of ONE batch inside the forward, and their losses
    are averaged per record here, so a record has one loss and one gradient.
    """
    n, k = t.shape
    inputs = denoiser_input(x_t.flatten(0, 1), condition.repeat_interleave(k, dim=0))
    pred = denoiser(inputs, t.flatten(), class_labels=site.repeat_interleave(k))
    per_draw = (pred - target.flatten(0, 1)).square().mean(dim=(1, 2, 3))
    return per_draw.view(n, k).mean(dim=1)


# -- the recipe ----------------------------------------------------------------------
class ConditionalDDPM(Recipe):
    """Mask-to-image conditional DDPM, DP-SGD on the whole denoiser; see the module docstring."""

    name: ClassVar[str] = "cddpm"
    Options: ClassVar[type[RecipeOptions]] = CDDPMOptions
    private_modules: ClassVar[tuple[str, ...]] = ("denoiser",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = None
    # the site embedding: row k is trained at site k only, so the server takes it from site k's reply
    site_indexed_keys: ClassVar[tuple[str, ...]] = ("denoiser.class_embedding.weight",)

    def __init__(self, config):
        super().__init__(config)
        o, depth = self.options, len(self.options.channel_widths) - 1
        if config.image_size % (2 ** depth):
            raise ConfigError(f"image-size {config.image_size} is not divisible by 2^{depth} "
                              f"(options.channels has {depth + 1} levels)")
        self.abar = alphas_cumprod(o.train_timesteps, o.schedule, o.prediction)
        if o.tissue_prior:  # the UNet moves under denoiser.unet; the tables are site-indexed too
            self.site_indexed_keys = ("denoiser.unet.class_embedding.weight", "denoiser.tissue_offset.weight",
                                      "denoiser.site_moments") + (("denoiser.blur_raw.weight",) if o.prior_blur else ())

    @property
    def releases_moments(self) -> bool:
        return self.options.tissue_prior and self.options.moment_release

    def one_off_releases(self) -> tuple[tuple[float, float, int], ...]:
        """The scanner-moment release (privacy argument, point 4) as its accountant entry."""
        return ((float(self.options.moment_noise_multiplier), 1.0, 1),) if self.releases_moments else ()

    def build(self) -> nn.Module:
        o = self.options
        with torch.random.fork_rng(devices=[]):  # deterministic, global RNG untouched
            torch.manual_seed(self.config.seed)
            unet = build_denoiser(o, self.num_sites, self.num_classes)
            if o.tissue_prior:
                return DenoiserNetwork(TissuePriorDenoiser(unet, self.num_sites, self.abar,
                                                           blur=o.prior_blur, gain=o.prior_gain,
                                                           num_classes=self.num_classes))
            return DenoiserNetwork(unet)

    def param_groups(self, denoiser: nn.Module) -> list[dict[str, Any]]:
        """Adam groups: the UNet at ``lr``; the tissue prior's tables (if any) at ``lr-prior``."""
        if not self.options.tissue_prior:
            return [{"params": list(denoiser.parameters())}]
        prior = denoiser.prior_parameters()
        return [{"params": [p for p in denoiser.parameters() if all(p is not q for q in prior)]},
                {"params": prior, "lr": self.options.lr_prior}]

    # -- training ---------------------------------------------------------------------
    def train_local(self, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        o, device = self.options, ctx.device
        self.check_round(ctx)
        model.to(device).train()
        if self.releases_moments and self.release_once(
                model.denoiser.site_moments[ctx.site_index], ctx,
                functools.partial(patient_moments, num_classes=self.num_classes), MOMENT_CLIP,
                o.moment_noise_multiplier):
            model.denoiser.start_from_release(ctx.site_index)  # new to this model: the prior starts there
        rng = ctx.generator()
        opt = torch.optim.Adam(self.param_groups(model.denoiser), lr=o.lr, betas=(o.beta1, o.beta2))
        ctx.restore_optimizer(opt, "opt_denoiser")
        mode = "no_op" if o.grad_sample_mode == "vmap" else "hooks"
        start, taken = time.perf_counter(), 0
        with DPModule(ctx.private, model.denoiser, opt, ctx.data, self.config.batch_size,
                      grad_sample_mode=mode) as d:
            for batch in d.batches(ctx.steps):
                d.zero_grad()
                images, labels = self.real_batch(batch, device)
                if images.shape[0] > 0:  # empty Poisson batch: step() takes a noise-only step
                    self.private_backward(model.denoiser, d.module, images, labels, ctx.site_index, rng)
                d.step()
                taken += 1
        ctx.keep_optimizer(opt, "opt_denoiser")
        ctx.recipe_state["rounds_trained"] = ctx.rounds_done + 1
        return {"denoiser_steps": float(taken), "noise_draws": float(o.noise_draws),
                "seconds": time.perf_counter() - start}

    def draw_training_noise(self, images: torch.Tensor, rng: torch.Generator
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target) for K draws per record: [N,K,1,H,W], [N,K], [N,K,1,H,W].
        Timesteps and noise come from ``rng`` (seeded, data-independent), on the CPU."""
        n, k = images.shape[0], self.options.noise_draws
        t = torch.randint(0, self.options.train_timesteps, (n, k), generator=rng)
        noise = torch.randn((n, k, *images.shape[1:]), generator=rng).to(images.device)
        return self.noised(images, t, noise)

    def noised(self, images: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """(x_t, t, target) of ``images`` [N,1,H,W] at timesteps [N,K] with ``noise``."""
        abar = self.abar[t].to(images.device, images.dtype)[..., None, None, None]
        x0 = images.unsqueeze(1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        target = training_target(x0.expand_as(noise), noise, abar, self.options.prediction)
        return x_t, t.to(images.device), target

    def private_backward(self, denoiser: nn.Module, wrapped: nn.Module, images: torch.Tensor,
                         labels: torch.Tensor, site_index: int, rng: torch.Generator) -> None:
        """Fill ``p.grad_sample`` of the denoiser with one gradient per record (the private batch)."""
        x_t, t, target = self.draw_training_noise(images, rng)
        condition = one_hot_labels(labels, self.num_classes).to(images.device)
        site = torch.full((images.shape[0],), site_index, dtype=torch.long, device=images.device)
        if self.options.grad_sample_mode == "hooks":
            record_losses(wrapped, x_t, condition, site, t, target).mean().backward()
            return
        grads = per_record_grads(denoiser, record_losses, x_t, condition, site, t, target)
        for name, p in denoiser.named_parameters():
            if p.requires_grad:
                p.grad_sample = grads[name]

    # -- sampling and the audit's score (post-processing of the released denoiser) -----
    def sample(self, model, label_maps, site_index, generator=None, steps: int | None = None):
        """Images [N,1,H,W] in [-1,1] by DDIM (``steps`` or options.sample-steps); eval, no grad."""
        site = self.site_ids(site_index, label_maps.shape[0])
        if site.numel() and (int(site.min()) < 0 or int(site.max()) >= self.num_sites):
            raise ValueError(f"site ids must be in 0..{self.num_sites - 1}")
        timesteps = ddim_timesteps(self.options.train_timesteps, steps or self.options.sample_steps)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn((label_maps.shape[0], 1, *label_maps.shape[1:]), generator=generator,
                            device=gen_device)
        with self.inference(model) as device:
            out = [self._ddim(model.denoiser, noise[i:i + SAMPLE_CHUNK].to(device),
                              one_hot_labels(label_maps[i:i + SAMPLE_CHUNK], self.num_classes).to(device),
                              site[i:i + SAMPLE_CHUNK].to(device), timesteps)
                   for i in range(0, label_maps.shape[0], SAMPLE_CHUNK)]
        return torch.cat(out) if out else noise.to(device)

    def _ddim(self, denoiser, x, condition, site, timesteps: list[int]) -> torch.Tensor:
        abar = self.abar.tolist()
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            out = denoiser(denoiser_input(x, condition), t_batch, class_labels=site)
            prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            x = ddim_step(out, x, abar[t], prev, self.options.prediction)
        return x.clamp(-1.0, 1.0)

    def membership_scores(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          site_index: int) -> torch.Tensor:
        """The audit's white-box score (models/capabilities.py): minus each real record's
        denoising loss at MEMBERSHIP_TIMESTEPS, one fixed noise draw each (a loss attack)."""
        n = images.shape[0]
        t = torch.tensor([round(f * (self.options.train_timesteps - 1)) for f in MEMBERSHIP_TIMESTEPS])
        noise = torch.randn((n, len(t), *images.shape[1:]), generator=torch.Generator().manual_seed(0))
        with self.inference(model) as device:
            x_t, t, target = self.noised(images.float().to(device), t.expand(n, -1), noise.to(device))
            condition = one_hot_labels(labels, self.num_classes).to(device)
            return -record_losses(model.denoiser, x_t, condition, self.site_ids(site_index, n).to(device),
                                  t, target)
