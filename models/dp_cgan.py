"""dp-cgan: a DP GAN that paints a tissue label map in a chosen site's scanner style.

G(one-hot tissue map, site id, noise) -> image in [-1, 1]; D(image, tissue map, site id)
-> logit. Mask-to-image with SPADE normalisation (Red-GAN/SPADE idea, METHODS.md #11):
the label map modulates every generator stage, so the anatomy is not washed out by the
normalisation, and a site code enters the same modulation, so the per-tissue contrast
of each scanner is one conditioning path. D is a projection discriminator on the site
and sees the label map concatenated to the image (it must judge "is this a plausible
site-k image OF THIS anatomy", not just "is this a plausible image"). G ends in a
cheap full-resolution "scanner head" (per-(site, tissue) intensity offset and noise level
on the label map), which keeps the CPU cost low and tissue edges sharp. A site trains G
and D for its OWN site id only: it knows only its own scanner's real distribution.

Why only D needs DP-SGD (post-processing, DP.md "Which networks need DP-SGD",
"Conditioning"), with the unit = one patient (one dataset item):
  1. D is the only network that reads private records (a site's images AND its label
     maps). It reads them only through the Poisson loader and the DP optimizer of
     ``PrivateTraining``: per-patient clipped, noised, accounted (accountant named in
     the PrivacyPlan). D's parameters after each step are therefore DP releases.
  2. D's fake term depends only on public label maps (``PublicData``), the site id,
     fresh noise, G and D's already-released parameters. Its gradient is added after
     clipping+noise (``private.step(..., public_grads)``): post-processing, neither
     clipped nor charged. Its size is FIXED (the config batch size, which is the
     expected Poisson batch size q*N when B divides N), never the realised Poisson
     batch size, which is private.
  3. The G step reads no real batch at all: public label maps, the site id, noise, and
     D's released parameters. G's update is thus a function of DP outputs and public
     inputs -> post-processing, DP for free. It therefore needs no skip on an empty
     Poisson batch. ``_assert_disc_released`` checks at run time that no un-noised
     private state (per-sample grads, summed grads, captured activations) is left on D
     when G trains; tests/models/test_dp_cgan.py proves G's update is identical for two
     different private data sets given the same D.
  4. The scanner-moment release (``moment-release``, on by default;
     models/scanner_moments.py has the mechanism and its sensitivity argument): once per
     site, before any DP-SGD step, one Gaussian mechanism on per-patient tissue
     statistics, accounted as (sigma, 1.0, 1) and declared in ``one_off_releases`` so the
     DP-SGD noise was calibrated for the composition. The noisy sum is stored in G's
     buffer ``site_moments`` (row k: site k's release, site-indexed) and G is pulled
     toward the moments it implies: post-processing of a DP release, like D's parameters.
  5. Metrics: losses on the private batch are data-dependent scalars that would leave
     the site outside the accounting, so they are NOT returned. Only public-input
     quantities (G loss, D loss on fakes, fake scores), step counts and the wall time
     (which the server observes anyway as reply latency) are.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medgen import TISSUE_CLASSES
from medgen.config import ConfigError, RunConfig
from medgen.models.blocks import (DownBlock, ProjectionHead, ScannerHead, SPADEUpBlock,
                                  one_hot_labels, tissue_statistics)
from medgen.models.recipe import PublicData, Recipe, RecipeOptions
from medgen.models.scanner_moments import MOMENT_CLIP, MOMENT_DIM, moments_from_release, patient_moments

if False:  # typing only, as in models/recipe.py
    from medgen.privacy.dp_sgd import PrivateTraining  # noqa: F401

NUM_CLASSES = len(TISSUE_CLASSES)
LOSSES = ("nonsat", "hinge")


# -- networks ------------------------------------------------------------------------
class ConditionalGenerator(nn.Module):
    """z -> S/8 feature map -> SPADE stages to S/2 (label map + site code) -> scanner head."""

    def __init__(self, image_size: int, num_sites: int, width: int, noise_dim: int,
                 site_dim: int, spade_hidden: int, spade_kernel: int, psf_radius: int = 4,
                 upsample: str = "bilinear"):
        super().__init__()
        self.noise_dim = noise_dim
        self.image_size = image_size
        self.base = image_size // 8
        channels = [4 * width, 4 * width, 2 * width, width]
        self.site_embed = nn.Embedding(num_sites, site_dim)
        self.project = nn.Linear(noise_dim, channels[0] * self.base * self.base)
        # stage 0 modulates at S/8, stages 1-2 upsample to S/2; the head goes to S
        self.stages = nn.ModuleList(
            SPADEUpBlock(channels[i], channels[i + 1], NUM_CLASSES, site_dim, spade_hidden,
                         spade_kernel, upsample=i > 0, mode=upsample) for i in range(3))
        self.head = ScannerHead(channels[3], NUM_CLASSES, num_sites, psf_radius, upsample)
        # row k: site k's released noisy sum of patient_moments (all zero = not released yet)
        self.register_buffer("site_moments", torch.zeros(num_sites, MOMENT_DIM))

    def forward(self, labels: torch.Tensor, site: torch.Tensor, z: torch.Tensor,
                pixel_noise: torch.Tensor) -> torch.Tensor:
        """labels: one-hot [N,4,S,S]; site: [N] int64; z: [N,noise_dim]; pixel_noise: [N,1,S,S]."""
        site_code = self.site_embed(site)
        x = self.project(z).view(z.shape[0], -1, self.base, self.base)
        for stage in self.stages:
            x = stage(x, labels, site_code)
        return torch.tanh(self.head(x, labels, site, pixel_noise))

    def draw_noise(self, n: int, generator: torch.Generator | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, pixel noise) drawn on the generator's device (CPU by default), then moved."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, self.noise_dim, generator=generator, device=gen_device)
        noise = torch.randn(n, 1, self.image_size, self.image_size, generator=generator,
                            device=gen_device)
        return z.to(device), noise.to(device)


class ProjectionDiscriminator(nn.Module):
    """cat(image, one-hot map) -> stride-2 GroupNorm stages down to 4x4 -> per-patch projection.

    Returns one logit per 4x4 patch [N,4,4] (PatchGAN, as pix2pix/SPADE discriminators):
    local realism gets a local signal. GroupNorm, no spectral norm (DP.md traps 4, 5).

    Plus, with ``tissue_stats``, a second projection head on ``tissue_statistics`` (per-tissue
    mean and spread, sharpness, noise: 10 numbers) added to every patch logit. Why: under
    DP-SGD every D parameter gets noise of the same size, and the convolutional part's
    ~10^5 parameters drown the real-data signal, so D barely learns WHICH contrast a site
    has and G's contrast table moved uniformly brighter in the demo. The statistics head
    has ~60 parameters carrying exactly the scanner signal, and its gradient reaches G's
    per-(site, tissue) table directly.
    """

    def __init__(self, image_size: int, num_sites: int, width: int, tissue_stats: bool = True):
        super().__init__()
        stages, in_ch, out_ch, size = [], 1 + NUM_CLASSES, width, image_size
        while size > 4:
            stages.append(DownBlock(in_ch, out_ch, norm=bool(stages)))
            in_ch, out_ch, size = out_ch, min(2 * out_ch, 4 * width), size // 2
        self.stages = nn.Sequential(*stages)
        self.head = ProjectionHead(in_ch, num_sites)
        self.stats_head = ProjectionHead(2 * NUM_CLASSES + 2, num_sites) if tissue_stats else None

    def forward(self, image: torch.Tensor, labels: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        features = self.stages(torch.cat([image, labels], dim=1))
        logits = self.head(features, site)
        if self.stats_head is not None:
            logits = logits + self.stats_head(tissue_statistics(image, labels), site)[:, None, None]
        return logits


class ConditionalGAN(nn.Module):
    """One module so one state_dict travels: ``gen.*`` is shared, ``disc.*`` stays local."""

    def __init__(self, gen: ConditionalGenerator, disc: ProjectionDiscriminator):
        super().__init__()
        self.gen = gen
        self.disc = disc


# -- options -------------------------------------------------------------------------
@dataclass(frozen=True)
class CGANOptions(RecipeOptions):
    gen_width: int = 16
    disc_width: int = 16  # ~110K params at 64 px: DP noise norm grows with sqrt(#params)
    noise_dim: int = 64
    site_dim: int = 8
    spade_hidden: int = 16
    spade_kernel: int = 1
    lr_gen: float = 5e-4  # in-process 4-site runs at eps 10: 1e-3 oscillated (site acc 0.43), 5e-4 reached 0.66
    lr_disc: float = 5e-4
    # the scanner head's few per-site numbers (contrast, noise, blur) must travel ~0.5 in a
    # 200-step schedule; Adam moves a parameter about lr per step, so 5e-4 cannot get there
    lr_scanner: float = 5e-3
    beta1: float = 0.5
    beta2: float = 0.999
    disc_steps_per_gen_step: int = 2  # "Private GANs revisited"; better in the 64 px sanity run
    moment_release: bool = True  # privacy argument point 4
    moment_noise_multiplier: float = 3.0  # sigma of that release (x MOMENT_CLIP): ~0.06 on a mean over 200 patients
    moment_weight: float = 10.0  # weight of G's pull toward the released moments
    balance_fake_grad: bool = True  # clip D's fake-term gradient to max-grad-norm, as the real term
    tissue_stats: bool = True  # D's statistics head (see ProjectionDiscriminator)
    upsample: str = "bilinear"  # G's x2 upsampling: "bilinear" or "nearest" (left 8x8 blocks in the demo)
    psf_radius: int = 4  # taps each side of the scanner head's per-site Gaussian PSF; 0 = no PSF
    share_discriminator: bool = False
    loss: str = "nonsat"

    def __post_init__(self) -> None:
        for key in ("gen_width", "disc_width", "noise_dim", "site_dim", "spade_hidden",
                    "spade_kernel", "disc_steps_per_gen_step"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"options.{key.replace('_', '-')} must be an integer >= 1, "
                                  f"got {getattr(self, key)!r}")
        if not (self.moment_noise_multiplier > 0 and math.isfinite(self.moment_noise_multiplier)):
            raise ConfigError("options.moment-noise-multiplier must be a finite number > 0")
        if not self.moment_weight >= 0:
            raise ConfigError("options.moment-weight must be >= 0")
        for key in ("lr_gen", "lr_disc", "lr_scanner"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"options.{key.replace('_', '-')} must be > 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"options.{key} must be in [0, 1)")
        if not isinstance(self.psf_radius, int) or self.psf_radius < 0:
            raise ConfigError(f"options.psf-radius must be an integer >= 0, got {self.psf_radius!r}")
        if self.upsample not in ("bilinear", "nearest"):
            raise ConfigError(f"options.upsample must be \"bilinear\" or \"nearest\", got {self.upsample!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"options.loss must be one of {LOSSES}, got {self.loss!r}")


# -- losses, elementwise over patch logits. A batch loss is their plain .mean(): every record
# has the same number of patches, so with Opacus' "mean" reduction each record's
# gradient is that of its own mean patch loss (checked against an autograd loop in tests).
def disc_loss(logits: torch.Tensor, real: bool, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1.0 - logits) if real else F.relu(1.0 + logits)
    return F.softplus(-logits) if real else F.softplus(logits)  # -log sigmoid / -log(1-sigmoid)


def gen_loss(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return -logits if kind == "hinge" else F.softplus(-logits)




def _assert_disc_released(disc: nn.Module) -> None:
    """The post-processing guard of the G step: D carries only its released parameters.

    Per-sample gradients, their clipped sum before noise, and activations captured by
    Opacus' hooks are functions of the private batch without noise. If any were left on
    D when G trains, G's update could read them; refuse instead.
    """
    for name, p in disc.named_parameters():
        for attr in ("grad_sample", "summed_grad"):
            if getattr(p, attr, None) is not None:
                raise AssertionError(f"disc.{name}.{attr} holds un-noised private state during "
                                     "the G step; zero D's gradients after every D step")
    for name, module in disc.named_modules():
        if getattr(module, "activations", None):
            raise AssertionError(f"disc.{name} holds captured private activations during the G step")


def _clip_total_norm(grads: list[torch.Tensor | None], max_norm: float) -> list[torch.Tensor | None]:
    """Scale a list of gradients down to total L2 norm ``max_norm`` (no-op when below).

    D's real term reaches the optimizer as a mean of per-patient gradients clipped to C,
    while its fake term is exact and unclipped: its norm was often several times C, so D
    learned mostly "push fakes down" and hardly what real scans of its site look like.
    Bounding the fake term by the same C balances the two. Post-processing of public
    inputs: it changes nothing in the accounting.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in present))
    scale = min(1.0, max_norm / (float(norm) + 1e-12))
    return [None if g is None else g * scale for g in grads]


def _cpu_copy(obj: Any) -> Any:
    """Optimizer state dicts as CPU tensors (the client torch.saves local_state)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _restore(optimizer: torch.optim.Optimizer, local_state: dict[str, Any], key: str) -> None:
    if key not in local_state:
        return
    try:
        optimizer.load_state_dict(local_state[key])
    except (ValueError, KeyError) as err:
        raise RuntimeError(f"local_state['{key}'] does not match the network ({err}); the recipe "
                           "options changed since the last round: delete this node's local state") from None


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

    def ensure_moment_release(self, model: nn.Module, data, private: "PrivateTraining",
                              site_index: int, local_state: dict[str, Any]) -> None:
        """Release this site's scanner moments ONCE (models/scanner_moments.py); afterwards
        reuse them and spend nothing."""
        self.release_once(model.gen.site_moments[site_index], data, private, local_state,
                          "moment_release", patient_moments, MOMENT_CLIP, self.options.moment_noise_multiplier)

    def build(self) -> nn.Module:
        o, size = self.options, self.config.image_size
        with torch.random.fork_rng(devices=[]):  # deterministic, global RNG untouched
            torch.manual_seed(self.config.seed)
            gen = ConditionalGenerator(size, self.num_sites, o.gen_width, o.noise_dim,
                                       o.site_dim, o.spade_hidden, o.spade_kernel, o.psf_radius,
                                       o.upsample)
            disc = ProjectionDiscriminator(size, self.num_sites, o.disc_width, o.tissue_stats)
        return ConditionalGAN(gen, disc)

    # -- training ---------------------------------------------------------------------
    def train_local(self, model: nn.Module, data: "torch.utils.data.Dataset", public: PublicData,
                    private: "PrivateTraining", site_index: int, steps: int,
                    local_state: dict[str, Any], device: torch.device) -> dict[str, float]:
        o = self.options
        self._check_inputs(public, site_index, steps)
        device = torch.device(device)
        model.to(device).train()
        if o.moment_release:
            self.ensure_moment_release(model, data, private, site_index, local_state)
        n_fake = self.config.batch_size  # fixed: never the realised Poisson batch size
        rounds_done = int(local_state.get("rounds_trained", 0))
        rng = torch.Generator().manual_seed(
            (self.config.seed * 1_000_003 + site_index * 10_007 + rounds_done) % 2**63)

        scanner = model.gen.head.scanner_parameters()
        body = [p for p in model.gen.parameters() if all(p is not q for q in scanner)]
        opt_g = torch.optim.Adam([{"params": body}, {"params": scanner, "lr": o.lr_scanner}],
                                 lr=o.lr_gen, betas=(o.beta1, o.beta2))
        opt_d = torch.optim.Adam(model.disc.parameters(), lr=o.lr_disc, betas=(o.beta1, o.beta2))
        _restore(opt_g, local_state, "opt_gen")
        _restore(opt_d, local_state, "opt_disc")
        disc, dp_opt, loader = private.make_private(model.disc, opt_d, data, self.config.batch_size)

        start, sums = time.perf_counter(), {"loss_disc_fake": 0.0, "loss_gen": 0.0, "disc_fake_score": 0.0}
        d_steps = g_steps = 0
        try:
            batches = iter(loader)
            for i in range(steps):
                try:
                    batch = next(batches)
                except StopIteration:  # the Poisson loader's "epoch" ended: start another
                    batches = iter(loader)
                    batch = next(batches)
                images, labels = self.real_batch(batch, device)
                sums["loss_disc_fake"] += self._disc_step(model, disc, dp_opt, private, images, labels,
                                                          public, site_index, n_fake, rng, device)
                d_steps += 1
                if (i + 1) % o.disc_steps_per_gen_step == 0 or (i == steps - 1 and g_steps == 0):
                    loss_g, score = self._gen_step(model, disc, opt_g, public, site_index, n_fake, rng, device)
                    sums["loss_gen"] += loss_g
                    sums["disc_fake_score"] += score
                    g_steps += 1
        finally:
            dp_opt.zero_grad(set_to_none=True)
            disc.to_standard_module()  # removes Opacus' hooks and attributes from model.disc
            private.close()  # and the channels_last guard hooks

        local_state["opt_gen"] = _cpu_copy(opt_g.state_dict())
        local_state["opt_disc"] = _cpu_copy(opt_d.state_dict())
        local_state["rounds_trained"] = rounds_done + 1
        return {"loss_gen": sums["loss_gen"] / g_steps, "disc_fake_score": sums["disc_fake_score"] / g_steps,
                "loss_disc_fake": sums["loss_disc_fake"] / d_steps, "disc_steps": float(d_steps),
                "gen_steps": float(g_steps), "seconds": time.perf_counter() - start}

    def _disc_step(self, model, disc, dp_opt, private, images, labels, public: PublicData,
                   site_index: int, n_fake: int, rng: torch.Generator, device) -> float:
        """One DP step of D: private real term (clipped+noised) + public fake term (added)."""
        dp_opt.zero_grad(set_to_none=True)  # DP.md trap 1
        kind = self.options.loss
        # fake term: public label maps, site id, noise; hooks off -> no per-sample grads
        fake_labels, fake_site = self._public_conditions(public, site_index, n_fake, rng, device)
        with torch.no_grad():
            fake = model.gen(fake_labels, fake_site, *model.gen.draw_noise(n_fake, rng, device))
        with private.public_pass(disc):
            loss_fake = disc_loss(disc(fake, fake_labels, fake_site), real=False, kind=kind).mean()
            public_grads = private.public_grads(loss_fake, dp_opt)
        if self.options.balance_fake_grad:
            public_grads = _clip_total_norm(public_grads, self.config.max_grad_norm)
        # real term: the only place private records enter; per-sample grads via the hooks.
        # An empty Poisson batch has no backward: step() then takes a noise-only,
        # accounted step (zero-length per-sample grads).
        if images.shape[0] > 0:
            real_site = torch.full((images.shape[0],), site_index, dtype=torch.long, device=device)
            logits = disc(images, one_hot_labels(labels, NUM_CLASSES), real_site)
            disc_loss(logits, real=True, kind=kind).mean().backward()
        private.step(dp_opt, public_grads)  # clip+noise real, add public, step, zero grads
        return float(loss_fake.detach())

    def _gen_step(self, model, disc, opt_g, public: PublicData, site_index: int, n: int,
                  rng: torch.Generator, device) -> tuple[float, float]:
        """One G step from public inputs only (post-processing); D frozen, hooks off (trap 2)."""
        _assert_disc_released(model.disc)
        labels, site = self._public_conditions(public, site_index, n, rng, device)
        disc.disable_hooks()
        model.disc.requires_grad_(False)
        try:
            fake = model.gen(labels, site, *model.gen.draw_noise(n, rng, device))
            logits = model.disc(fake, labels, site)
            loss = gen_loss(logits, self.options.loss).mean()
            if self.options.moment_release and self.options.moment_weight > 0:
                target = moments_from_release(model.gen.site_moments[site_index]).to(fake.device)
                achieved = tissue_statistics(fake, labels).mean(dim=0)
                loss = loss + self.options.moment_weight * (achieved - target).square().sum()
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        finally:
            model.disc.requires_grad_(True)
            disc.enable_hooks()
        return float(loss.detach()), float(torch.sigmoid(logits.detach()).mean())

    def _public_conditions(self, public: PublicData, site_index: int, n: int, rng, device):
        labels = one_hot_labels(public.draw(n, generator=rng), NUM_CLASSES).to(device)
        return labels, torch.full((n,), site_index, dtype=torch.long, device=device)

    def _check_inputs(self, public: PublicData, site_index: int, steps: int) -> None:
        self.check_train_args(site_index, steps)
        size = self.config.image_size
        maps = public.label_maps
        if maps.dim() != 3 or maps.shape[0] < 1 or tuple(maps.shape[1:]) != (size, size):
            raise ValueError(f"public label maps have shape {tuple(maps.shape)}; expected "
                             f"[M>=1, {size}, {size}] for image-size {size}")

    # -- sampling ---------------------------------------------------------------------
    def sample(self, model: nn.Module, label_maps: torch.Tensor, site_index: torch.Tensor | int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [N,1,H,W] in [-1,1] on the model's device; eval mode, no grad."""
        device = next(model.parameters()).device
        site = self.site_ids(site_index, label_maps.shape[0])
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                labels = one_hot_labels(label_maps, NUM_CLASSES).to(device)
                noise = model.gen.draw_noise(label_maps.shape[0], generator, device)
                return model.gen(labels, site.to(device), *noise)
        finally:
            model.train(was_training)
