"""cddpm: a conditional DDPM that paints a tissue label map in a chosen site's scanner style.

The Med-cDiff way (METHODS.md #4): the condition is concatenated channel-wise with the
noisy image x_t and a U-Net (MONAI ``DiffusionModelUNet``) predicts the noise, trained
with the plain noise MSE. Here the condition is the one-hot tissue map (mask-to-image
synthesis) and the site enters as a class embedding (``num_class_embeds`` = number of
sites), added to the timestep embedding of every residual block: one network renders any
anatomy in any site's style. Sampling is deterministic DDIM with ``sample-steps`` steps.

Site rows are federated by their own site (``site_indexed_keys``): row k of the class
embedding (and of the tissue prior below) receives gradient only at site k; the other
sites' copies move only by DP noise (and Adam's normalised random walk of it). Plain
FedAvg of that row would shrink site k's update 4-fold on the default federation and add
three sites' noise to it, every round; measured, that left sites B and C rendered in
another site's style (the first gan_vs_diffusion table, docs/recipes/cddpm.md). Site rows
alone did not fix it (bench/results/tune_cddpm_siterows.json: site accuracy B, C still 0);
with the tissue prior and its release they did. The server takes row k from
site k's reply alone (server/strategy.py ``site_rows_from_own_site``), as for dp-cgan.

Tissue prior (``tissue-prior = true``, x0-prediction only): a table of NUM_CLASSES
intensity offsets per site (``nn.Embedding(num_sites, NUM_CLASSES)``, starting at zero or at
the site's released tissue means, below)
looked up on the one-hot label map gives a piecewise-constant "scanner prior" image
p = offset[site] . onehot(map). The denoiser diffuses around it: the UNet sees
x_t - sqrt(abar_t) p (the noised RESIDUAL x0 - p, up to noise) and predicts that residual,
so x0_hat = p + UNet(...). A site's tissue contrast is a handful of numbers; under DP the
UNet learns it only slowly through a per-channel bias from the site embedding, while these
few numbers get a clear gradient every step and their own Adam learning rate
(``lr-prior``). Shifting the input (rather than only adding p to the output) keeps the
UNet's job at small t the same for every site (copy its input), instead of asking it to
subtract each site's contrast again. The table reads the private images (through the
loss), so it is part of the private denoiser: DP-trained, released, site-indexed.

Scanner-moment release (``moment-release``, with the tissue prior, on by default): before
its first DP-SGD step a site releases its per-tissue intensity statistics once
(models/scanner_moments.py: one Gaussian mechanism, declared in ``one_off_releases``,
calibrated with the DP-SGD schedule) and its row of the prior table starts at the
released tissue means instead of zero. Measured without it (10 rounds x 20 steps, eps 10):
after 200 DP steps the table was still off by up to 0.3 on D's CSF and B's white matter.
Starting from a DP release is post-processing; the release itself travels in the
site-indexed buffer ``site_moments`` so a node that lost its local state reuses it.

Privacy (unit = one patient = one dataset item; accountant named in the PrivacyPlan):
  1. The denoiser is the only network, and it reads private records (a site's images
     AND their label maps) in every training step, so all of it is the private module
     (``private_modules = ("denoiser",)``) and trained only through ``PrivateTraining``:
     Poisson sampling of patients, one clipped gradient per patient, Gaussian noise,
     accounting. Each released set of weights is a DP release; everything travels
     (``shared_prefixes = None``); Adam's moments (functions of the noised gradients,
     post-processing) stay on the node.
  2. Noise multiplicity (DPDM, Dockhorn et al. 2023): each record's loss is the MEAN over
     ``noise-draws`` (timestep, noise) draws before clipping, so a patient still yields
     exactly ONE per-sample gradient of norm <= C. It lowers the gradient variance at no
     privacy cost. The draws come from a seeded generator independent of the data.
  3. Sampling is post-processing: ``sample`` reads only the released weights, label maps
     from the PUBLIC anatomy bank (or any public/atlas map), a site id, and fresh noise.
     So labelled synthetic pairs (image, public map) in any site's style cost no further
     privacy, and a segmenter trained on them (evaluation/utility.py) needs no DP.
  4. The scanner-moment release (above): one Gaussian mechanism per site, accounted in
     the same history as DP-SGD (models/scanner_moments.py has the sensitivity argument).
  5. Metrics: losses on the private batch are un-noised functions of private data and
     would leave the site outside the accounting, so they are NOT returned; only step
     counts and wall time (observable anyway as reply latency).

Per-sample gradients, two interchangeable paths (``grad-sample-mode``), both checked
against the per-record autograd oracle in tests/models/test_cddpm.py:
  - "hooks": Opacus' hook-based per-sample gradients (every layer of the UNet here is
    Conv2d, GroupNorm, Linear or Embedding, all supported). Needs noise-draws = 1: with K
    draws the activations would carry N*K rows and Opacus would clip per draw, not per
    patient. PrivateTraining installs the channels_last guard (DP.md) on every conv.
  - "vmap": per-record gradients by ``torch.func`` (vmap over records of grad of the
    record's mean loss over its K draws), written into ``p.grad_sample``; Opacus runs in
    "no_op" mode and still clips, noises and accounts (DP.md trap 6 pattern).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from torch import nn
from torch.func import functional_call, grad, vmap

from medgen import TISSUE_CLASSES
from medgen.config import ConfigError
from medgen.models.blocks import one_hot_labels
from medgen.models.recipe import PublicData, Recipe, RecipeOptions
from medgen.models.scanner_moments import MOMENT_CLIP, MOMENT_DIM, moments_from_release, patient_moments

NUM_CLASSES = len(TISSUE_CLASSES)
SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
GRAD_MODES = ("hooks", "vmap")
SAMPLE_CHUNK = 64  # images per denoiser call while sampling (bounds memory)


# -- options -------------------------------------------------------------------------
@dataclass(frozen=True)
class CDDPMOptions(RecipeOptions):
    channels: str = "16,32,64"      # UNet level widths; each level halves the resolution
    res_blocks: int = 1
    norm_groups: int = 8
    train_timesteps: int = 1000
    schedule: str = "linear_beta"
    prediction: str = "sample"       # x0-prediction: learns far faster under DP (see docs)
    sample_steps: int = 20          # DDIM steps when sampling (evaluation, synthetic data)
    noise_draws: int = 1            # DPDM noise multiplicity K (needs grad-sample-mode vmap if > 1)
    grad_sample_mode: str = "vmap"
    lr: float = 2e-3
    tissue_prior: bool = True       # per-(site, tissue) intensity offsets under the UNet (see above)
    # with tissue-prior: release the site's scanner moments once and start the prior there
    moment_release: bool = True
    moment_noise_multiplier: float = 3.0  # sigma of that release (x MOMENT_CLIP)
    prior_blur: bool = True         # a per-site Gaussian blur of the prior (its width is learned)
    lr_prior: float = 1e-2          # Adam lr of the prior's tables: offsets must travel ~1 in 200 steps
    # the tables are used times this gain: their per-patient gradient grows by it, so they take a
    # larger share of the clipped norm (better signal-to-DP-noise); Adam then moves the offsets
    # about gain * lr-prior per step
    prior_gain: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        widths = self.channel_widths  # validates the string
        for key in ("res_blocks", "norm_groups", "train_timesteps", "sample_steps", "noise_draws"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"options.{_opt(key)} must be an integer >= 1, got {getattr(self, key)!r}")
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ConfigError(f"options.channels {bad} not divisible by options.norm-groups "
                              f"{self.norm_groups} (GroupNorm needs it)")
        if self.sample_steps > self.train_timesteps:
            raise ConfigError(f"options.sample-steps ({self.sample_steps}) must be <= "
                              f"options.train-timesteps ({self.train_timesteps})")
        for key, allowed in (("schedule", SCHEDULES), ("prediction", PREDICTIONS),
                             ("grad_sample_mode", GRAD_MODES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"options.{_opt(key)} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.grad_sample_mode == "hooks" and self.noise_draws != 1:
            raise ConfigError("options.noise-draws > 1 needs options.grad-sample-mode = \"vmap\": "
                              "Opacus hooks would clip each noise draw separately, not each patient")
        for key in ("lr", "lr_prior", "prior_gain", "moment_noise_multiplier"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"options.{_opt(key)} must be > 0")
        if self.tissue_prior and self.prediction != "sample":
            raise ConfigError("options.tissue-prior (on by default) needs options.prediction = "
                              "\"sample\" (the prior is an offset of the predicted x0); set "
                              "options.tissue-prior = false to predict epsilon or v")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"options.{key} must be in [0, 1)")

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


def _opt(name: str) -> str:
    return name.replace("_", "-")


# -- the network ---------------------------------------------------------------------
class DenoiserNetwork(nn.Module):
    """One module so one state_dict travels: ``denoiser.*`` (all of it, a DP release)."""

    def __init__(self, denoiser: DiffusionModelUNet):
        super().__init__()
        self.denoiser = denoiser


def build_denoiser(options: CDDPMOptions, num_sites: int) -> DiffusionModelUNet:
    widths = options.channel_widths
    return DiffusionModelUNet(
        spatial_dims=2, in_channels=1 + NUM_CLASSES, out_channels=1, channels=widths,
        num_res_blocks=options.res_blocks, attention_levels=(False,) * len(widths),
        norm_num_groups=options.norm_groups, num_class_embeds=num_sites)


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
                 gain: float = 1.0):
        super().__init__()
        # row k: site k's scanner-moment release (a noisy sum; all zero = not released yet)
        self.register_buffer("site_moments", torch.zeros(num_sites, MOMENT_DIM))
        self.unet = unet
        self.gain = float(gain)  # tables are stored / = gain (see CDDPMOptions.prior_gain)
        self.tissue_offset = nn.Embedding(num_sites, NUM_CLASSES)
        nn.init.zeros_(self.tissue_offset.weight)
        self.blur_raw = nn.Embedding(num_sites, 1) if blur else None
        if self.blur_raw is not None:
            nn.init.constant_(self.blur_raw.weight, -1.25 / self.gain)
        self.register_buffer("sqrt_abar", abar.sqrt().float(), persistent=False)

    def start_from_release(self, site: int) -> None:
        """Set site ``site``'s tissue offsets to the tissue means its release implies."""
        means = moments_from_release(self.site_moments[site])[:NUM_CLASSES]
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


def denoiser_input(x_t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """Med-cDiff conditioning: the condition channels concatenated to the noisy image."""
    return torch.cat([x_t, condition], dim=1)


# -- the per-record loss (shared by the fast paths and the oracle) --------------------
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


def vmap_per_sample_grads(denoiser: nn.Module, x_t: torch.Tensor, condition: torch.Tensor,
                          site: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                          ) -> dict[str, torch.Tensor]:
    """Per-record gradients {name: [N, *param.shape]} of ``record_losses`` via torch.func."""
    params = {name: p.detach() for name, p in denoiser.named_parameters() if p.requires_grad}

    def one_record(p, x_t1, cond1, site1, t1, target1):
        return record_losses(lambda *a, **kw: functional_call(denoiser, p, a, kw),
                             x_t1[None], cond1[None], site1[None], t1[None], target1[None])[0]

    return vmap(grad(one_record), in_dims=(None, 0, 0, 0, 0, 0))(params, x_t, condition, site, t, target)


# -- noise schedule and DDIM sampling ------------------------------------------------
def alphas_cumprod(options: CDDPMOptions) -> torch.Tensor:
    """alpha-bar_t of MONAI's schedule (float64 CPU; cast where used)."""
    scheduler = DDPMScheduler(num_train_timesteps=options.train_timesteps, schedule=options.schedule,
                              prediction_type=options.prediction)
    return scheduler.alphas_cumprod.to(torch.float64)


def training_target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return x0
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v-prediction


def ddim_timesteps(train_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced, strictly decreasing timesteps from T-1 down to 0."""
    return sorted({round(v) for v in torch.linspace(train_timesteps - 1, 0, steps).tolist()}, reverse=True)


def ddim_step(model_out: torch.Tensor, x_t: torch.Tensor, abar_t: float, abar_prev: float,
              prediction: str) -> torch.Tensor:
    """Deterministic DDIM update (eta = 0) from timestep t to the NEXT timestep in the list.

    Written out rather than MONAI's DDIMScheduler.step, which steps to t - T // n and so
    disagrees with its own rounded linspace timesteps when n does not divide T.
    """
    a_t, a_prev = torch.tensor(abar_t, dtype=x_t.dtype), torch.tensor(abar_prev, dtype=x_t.dtype)
    if prediction == "epsilon":
        x0 = (x_t - (1 - a_t).sqrt() * model_out) / a_t.sqrt()
    elif prediction == "sample":
        x0 = model_out
    else:
        x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * model_out
    x0 = x0.clamp(-1.0, 1.0)
    eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


# -- the recipe ----------------------------------------------------------------------
class ConditionalDDPM(Recipe):
    """Mask-to-image conditional DDPM, DP-SGD on the whole denoiser; see the module docstring."""

    name: ClassVar[str] = "cddpm"
    Options: ClassVar[type[RecipeOptions]] = CDDPMOptions
    private_modules: ClassVar[tuple[str, ...]] = ("denoiser",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = None
    # the site embedding: row k is trained at site k only, so the server takes it from site
    # k's reply alone (plain FedAvg shrank site k's update 4-fold; module docstring)
    site_indexed_keys: ClassVar[tuple[str, ...]] = ("denoiser.class_embedding.weight",)

    def __init__(self, config):
        super().__init__(config)
        depth = len(self.options.channel_widths) - 1
        if config.image_size % (2 ** depth):
            raise ConfigError(f"image-size {config.image_size} is not divisible by 2^{depth} "
                              f"(options.channels has {depth + 1} levels)")
        self.abar = alphas_cumprod(self.options)
        if self.options.tissue_prior:  # the UNet moves under denoiser.unet; the tables are site-indexed too
            self.site_indexed_keys = ("denoiser.unet.class_embedding.weight", "denoiser.tissue_offset.weight",
                                      "denoiser.site_moments") \
                + (("denoiser.blur_raw.weight",) if self.options.prior_blur else ())

    @property
    def releases_moments(self) -> bool:
        return self.options.tissue_prior and self.options.moment_release

    def one_off_releases(self) -> tuple[tuple[float, float, int], ...]:
        """The scanner-moment release (privacy argument, point 4) as its accountant entry."""
        return ((float(self.options.moment_noise_multiplier), 1.0, 1),) if self.releases_moments else ()

    def build(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # deterministic, global RNG untouched
            torch.manual_seed(self.config.seed)
            unet = build_denoiser(self.options, self.num_sites)
            if self.options.tissue_prior:
                return DenoiserNetwork(TissuePriorDenoiser(unet, self.num_sites, self.abar,
                                                           blur=self.options.prior_blur,
                                                           gain=self.options.prior_gain))
            return DenoiserNetwork(unet)

    def param_groups(self, denoiser: nn.Module) -> list[dict[str, Any]]:
        """Adam groups: the UNet at ``lr``; the tissue prior's tables (if any) at ``lr-prior``."""
        if not self.options.tissue_prior:
            return [{"params": list(denoiser.parameters())}]
        prior = denoiser.prior_parameters()
        return [{"params": [p for p in denoiser.parameters() if all(p is not q for q in prior)]},
                {"params": prior, "lr": self.options.lr_prior}]

    # -- training ---------------------------------------------------------------------
    def train_local(self, model, data, public, private, site_index, steps, local_state, device):
        o = self.options
        self.check_train_args(site_index, steps)
        device = torch.device(device)
        model.to(device).train()
        if self.releases_moments and self.release_once(
                model.denoiser.site_moments[site_index], data, private, local_state,
                "moment_release", patient_moments, MOMENT_CLIP, o.moment_noise_multiplier):
            model.denoiser.start_from_release(site_index)  # fresh release: the prior starts there
        rounds_done = int(local_state.get("rounds_trained", 0))
        rng = torch.Generator().manual_seed(
            (self.config.seed * 1_000_003 + site_index * 10_007 + rounds_done) % 2**63)
        opt = torch.optim.Adam(self.param_groups(model.denoiser), lr=o.lr, betas=(o.beta1, o.beta2))
        if "opt_denoiser" in local_state:
            try:
                opt.load_state_dict(local_state["opt_denoiser"])
            except (ValueError, KeyError) as err:
                raise RuntimeError(f"local_state['opt_denoiser'] does not match the denoiser ({err}); "
                                   "the recipe options changed: delete this node's local state") from None
        mode = "no_op" if o.grad_sample_mode == "vmap" else "hooks"
        wrapped, dp_opt, loader = private.make_private(model.denoiser, opt, data, self.config.batch_size,
                                                       grad_sample_mode=mode)
        start, taken = time.perf_counter(), 0
        try:
            batches = iter(loader)
            for _ in range(steps):
                try:
                    batch = next(batches)
                except StopIteration:  # the Poisson loader's "epoch" ended: start another
                    batches = iter(loader)
                    batch = next(batches)
                dp_opt.zero_grad(set_to_none=True)
                images, labels = self.real_batch(batch, device)
                if images.shape[0] > 0:  # empty Poisson batch: step() takes a noise-only step
                    self.private_backward(model.denoiser, wrapped, images, labels, site_index, rng)
                private.step(dp_opt)
                taken += 1
        finally:
            dp_opt.zero_grad(set_to_none=True)
            if hasattr(wrapped, "to_standard_module"):
                wrapped.to_standard_module()
            private.close()
        local_state["opt_denoiser"] = _cpu_copy(opt.state_dict())
        local_state["rounds_trained"] = rounds_done + 1
        return {"denoiser_steps": float(taken), "noise_draws": float(o.noise_draws),
                "seconds": time.perf_counter() - start}

    def draw_training_noise(self, images: torch.Tensor, rng: torch.Generator
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target) for K draws per record: [N,K,1,H,W], [N,K], [N,K,1,H,W].

        Timesteps and noise come from ``rng`` (seeded, data-independent), on the CPU.
        """
        n, k = images.shape[0], self.options.noise_draws
        t = torch.randint(0, self.options.train_timesteps, (n, k), generator=rng)
        noise = torch.randn((n, k, *images.shape[1:]), generator=rng).to(images.device)
        abar = self.abar[t].to(images.device, images.dtype)[..., None, None, None]
        x0 = images.unsqueeze(1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        target = training_target(x0.expand_as(noise), noise, abar, self.options.prediction)
        return x_t, t.to(images.device), target

    def private_backward(self, denoiser: nn.Module, wrapped: nn.Module, images: torch.Tensor,
                         labels: torch.Tensor, site_index: int, rng: torch.Generator) -> None:
        """Fill ``p.grad_sample`` of the denoiser with one gradient per record (the private batch)."""
        x_t, t, target = self.draw_training_noise(images, rng)
        condition = one_hot_labels(labels, NUM_CLASSES).to(images.device)
        site = torch.full((images.shape[0],), site_index, dtype=torch.long, device=images.device)
        if self.options.grad_sample_mode == "hooks":
            record_losses(wrapped, x_t, condition, site, t, target).mean().backward()
            return
        grads = vmap_per_sample_grads(denoiser, x_t, condition, site, t, target)
        for name, p in denoiser.named_parameters():
            if p.requires_grad:
                p.grad_sample = grads[name]

    # -- sampling (post-processing of the released denoiser) ---------------------------
    def sample(self, model, label_maps, site_index, generator=None, steps: int | None = None):
        """Images [N,1,H,W] in [-1,1] by DDIM (``steps`` or options.sample-steps); eval, no grad."""
        device = next(model.parameters()).device
        site = self.site_ids(site_index, label_maps.shape[0])
        if site.numel() and (int(site.min()) < 0 or int(site.max()) >= self.num_sites):
            raise ValueError(f"site ids must be in 0..{self.num_sites - 1}")
        timesteps = ddim_timesteps(self.options.train_timesteps, steps or self.options.sample_steps)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn((label_maps.shape[0], 1, *label_maps.shape[1:]), generator=generator,
                            device=gen_device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = [self._ddim(model.denoiser, noise[i:i + SAMPLE_CHUNK].to(device),
                                  one_hot_labels(label_maps[i:i + SAMPLE_CHUNK], NUM_CLASSES).to(device),
                                  site[i:i + SAMPLE_CHUNK].to(device), timesteps)
                       for i in range(0, label_maps.shape[0], SAMPLE_CHUNK)]
        finally:
            model.train(was_training)
        return torch.cat(out) if out else noise.to(device)

    def _ddim(self, denoiser, x, condition, site, timesteps: list[int]) -> torch.Tensor:
        abar = self.abar.tolist()
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            out = denoiser(denoiser_input(x, condition), t_batch, class_labels=site)
            prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            x = ddim_step(out, x, abar[t], prev, self.options.prediction)
        return x.clamp(-1.0, 1.0)
