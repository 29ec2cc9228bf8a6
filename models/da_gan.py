"""da-gan: deformation-aware MR->CT synthesis from paired but misaligned images (Xin et al.
2024, DA-GAN), under DP, at sites that hold both modalities of their patients.

A paired site's dataset.toml declares ``[paired] modality = "MR"`` and ``registered =
false`` (data/manifest.py; the head federation's ``--paired-sites``): every patient has a
CT and an MR of the same anatomy in another pose, so a plain paired L1 teaches the
generator the misregistration. Three networks, per record (MR x, CT y) at CT site k:
  G(x, k)        MR -> site k's CT (models/cycle.py's site-conditioned generator)
  R(a, b)        MONAI LocalNet -> a stationary velocity field -> ``DVF2DDF`` (scaling and
                 squaring) -> a displacement that ``Warp`` uses to move a onto b
  D(c, y, k)     a PatchGAN on (MR moved into the CT's pose, CT): it judges appearance
                 with the shape mismatch registered away (deformation-aware)
  fake = G(x, k);  phi = R(fake, y) (MR pose -> CT pose);  psi = R(y, fake) (the inverse)
  synthesis     |W(fake, phi) - y| + |W(y, psi) - fake|        registered L1, both ways
  inverse cons. |phi + W(psi, phi)|^2 + |psi + W(phi, psi)|^2   phi and psi undo each other
  smoothness    bending energy of phi and psi (MONAI ``BendingEnergyLoss``)
  adversarial   D(W(x, phi), y) real, D(W(x, phi), W(fake, phi)) fake; G and R want "real"
``register = false`` is the ablation: the same G trained by plain L1 on the misaligned pair
(and D on the unregistered pair). Design and measurements: docs/recipes/da-gan.md.

Translation (models/capabilities.py): MR in, CT out. G's [-1, 1] is the CT window
``ct-window-lo..hi`` (HU), which ``check_site`` holds every training site to, so
``translated_output`` declares it as data and `medgen translate` writes HU, Modality CT.

PRIVACY ARGUMENT (DP.md "Which networks need DP-SGD"). Unit: the patient (one dataset item,
its CT, label map and MR together).
  1. G reads the real MR; R reads the real CT (and G's output); D reads both; the synthesis,
     consistency, smoothness and adversarial terms are functions of the record. So G, R and
     D all form ONE private module (``nets``) trained through ONE ``DPModule`` over
     ``PrivateTraining``: Poisson sampling of patients, one record's loss = the sum of all
     its terms, its gradient over every parameter of G, R and D clipped together, one noise
     draw and ONE accountant step per step. The site's ledger holds exactly ``steps``
     entries a round; no other mechanism reads the records.
  2. In one backward, D receives only D's terms: D's fake term reads W(fake, phi) detached,
     its conditioning image W(x, phi) is detached everywhere, and the G/R adversarial term
     reads D through a hook-free twin at D's detached weights (``functional_call``), so no
     gradient of it reaches D. All of it is inside the record's clipped gradient.
  3. The true deformation exists only in the simulator's held-out ground truth; nothing
     here reads it. The target site k is the training site's own id (public).
  4. Shared weights are G, R and D (DP releases, FedAvg'd). Synthesis (``synthesize``,
     ``sample`` on public label maps, ``medgen translate`` of a hospital's own MR through
     the Translation capability) is post-processing. Returned metrics are step counts
     and wall time only: no loss on a private batch leaves the site.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from monai.losses import BendingEnergyLoss
from monai.networks.blocks import DVF2DDF, Warp
from monai.networks.nets import LocalNet
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call

from medgen.config import ConfigError
from medgen.models.blocks import DownBlock, ProjectionHead
from medgen.models.capabilities import SiteDataRefused, TranslatedOutput
from medgen.models.cycle import SiteGenerator
from medgen.models.dp_cgan import disc_loss, gen_loss
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import Recipe, RoundContext
from medgen.privacy.dp_step import DPModule
from medgen.sim.random_contrast import RandomContrast, render_random_contrast


# -- networks --------------------------------------------------------------------------------
def registration_net(channels: int) -> nn.Module:
    """R(moving, fixed) -> velocity [N,2,H,W]: MONAI's LocalNet with its BatchNorm made
    GroupNorm (Opacus refuses BatchNorm) and a zero output layer (identity at init)."""
    net = LocalNet(spatial_dims=2, in_channels=2, out_channels=2, num_channel_initial=channels,
                   extract_levels=(0, 1, 2), out_kernel_initializer="zeros")
    return ModuleValidator.fix(net)


class AwareDiscriminator(nn.Module):
    """D(condition, ct, site): PatchGAN on the MR moved into the CT's pose beside the CT."""

    def __init__(self, image_size: int, num_sites: int, width: int):
        super().__init__()
        stages, in_ch, out_ch, size = [], 2, width, image_size
        while size > 4:
            stages.append(DownBlock(in_ch, out_ch, norm=bool(stages)))
            in_ch, out_ch, size = out_ch, min(2 * out_ch, 4 * width), size // 2
        self.stages = nn.Sequential(*stages)
        self.head = ProjectionHead(in_ch, num_sites)

    def forward(self, condition: torch.Tensor, ct: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(torch.cat([condition, ct], dim=1)), site)


class DANets(nn.Module):
    """G, R, D: the one private module (point 1)."""

    def __init__(self, gen: nn.Module, reg: nn.Module, disc: nn.Module):
        super().__init__()
        self.gen, self.reg, self.disc = gen, reg, disc


class DAModel(nn.Module):
    def __init__(self, nets: DANets):
        super().__init__()
        self.nets = nets


# -- options (why these defaults: docs/recipes/da-gan.md) -------------------------------------
@dataclass(frozen=True)
class DAGanOptions(RecipeOptions):
    gen_width: int = option(16, at_least=1)
    gen_blocks: int = option(2, at_least=0)
    reg_width: int = option(8, at_least=1)
    disc_width: int = option(16, at_least=1)
    lr_gen: float = option(1e-3, above=0)  # G and R
    lr_disc: float = option(1e-3, above=0)
    beta1: float = option(0.5, at_least=0, below=1)
    register: bool = True  # False: the ablation, plain L1 on the misaligned pairs
    l1_weight: float = option(10.0, at_least=0)
    adversarial_weight: float = option(1.0, at_least=0)
    consistency_weight: float = option(1.0, at_least=0)
    smoothness_weight: float = option(1.0, at_least=0)
    integration_steps: int = option(5, at_least=0)  # DVF2DDF's scaling-and-squaring steps
    loss: str = option("nonsat", choices=("nonsat", "hinge"))
    ct_window_lo: float = option(-1000.0, at_least=-32768)  # HU that G's -1 stands for
    ct_window_hi: float = option(2000.0, at_most=32767)  # HU that G's +1 stands for

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ct_window_lo >= self.ct_window_hi:
            raise ConfigError(f"options.ct-window-lo ({self.ct_window_lo:g}) must be below "
                              f"options.ct-window-hi ({self.ct_window_hi:g})")


# -- the objective -------------------------------------------------------------------------------
class DAObjective:
    """The per-record DA-GAN loss (a batch loss = the mean of per-record losses, as Opacus'
    "mean" reduction needs)."""

    def __init__(self, options: DAGanOptions):
        self.o = options
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.integrate = DVF2DDF(num_steps=options.integration_steps, mode="bilinear",
                                 padding_mode="border")
        self.bending = BendingEnergyLoss()

    def ddf(self, nets: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The displacement that moves ``moving`` onto ``fixed``: W(moving, ddf) ~ fixed."""
        return self.integrate(nets.reg(torch.cat([moving, fixed], dim=1)))

    def loss(self, nets: nn.Module, disc_twin: nn.Module, mr: torch.Tensor, ct: torch.Tensor,
             site: torch.Tensor) -> torch.Tensor:
        o, kind = self.o, self.o.loss
        fake = nets.gen(mr, site)
        if o.register:
            phi, psi = self.ddf(nets, fake, ct), self.ddf(nets, ct, fake)
            moved = self.warp(fake, phi)
            loss = o.l1_weight * ((moved - ct).abs().mean() + (self.warp(ct, psi) - fake).abs().mean())
            loss = loss + o.consistency_weight * ((phi + self.warp(psi, phi)).pow(2).mean()
                                                  + (psi + self.warp(phi, psi)).pow(2).mean())
            loss = loss + o.smoothness_weight * (self.bending(phi) + self.bending(psi))
            condition = self.warp(mr, phi).detach()
        else:  # the ablation: the misaligned pair taken as aligned
            moved, condition = fake, mr
            loss = o.l1_weight * (fake - ct).abs().mean()
        # D's terms: the real pair, and the registered synthetic CT (detached) as fake
        loss = loss + (disc_loss(nets.disc(condition, ct, site), True, kind).mean()
                       + disc_loss(nets.disc(condition, moved.detach(), site), False, kind).mean())
        if o.adversarial_weight > 0:  # G's and R's term: D at its weights, detached (point 2)
            weights = {name: p.detach() for name, p in nets.disc.named_parameters()}
            logits = functional_call(disc_twin, weights, (condition, moved, site))
            loss = loss + o.adversarial_weight * gen_loss(logits, kind).mean()
        return loss


# -- the recipe ------------------------------------------------------------------------------------
class DAGan(Recipe):
    """Deformation-aware MR->CT synthesis at paired sites, G, R and D DP-trained; see the docstring."""

    name: ClassVar[str] = "da-gan"
    Options: ClassVar[type[RecipeOptions]] = DAGanOptions
    private_modules: ClassVar[tuple[str, ...]] = ("nets",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = None  # G, R, D: DP releases
    requires_labels: ClassVar[bool] = False  # no term reads a label map
    paired_modality: ClassVar[str] = "MR"  # what a site's [paired] folder must hold

    def __init__(self, config):
        super().__init__(config)
        self.objective = DAObjective(self.options)

    def check_site(self, data: Any) -> None:
        """Refuse, before any budget, a site that serves no MR paired with its CT."""
        super().check_site(data)
        manifest = getattr(data, "manifest", None)
        paired = getattr(manifest, "paired", None)
        if (getattr(data, "paired", None) is None or paired is None
                or paired.modality != self.paired_modality or manifest.modality != "CT"):
            raise SiteDataRefused(
                f"recipe {self.name!r} needs CT sites that also hold each patient's MR: a CT "
                f"site whose dataset.toml declares [paired] modality = \"MR\" with the MR "
                f"images in that folder (docs/data-model.md); this site serves no such pairs "
                f"(e.g. build the head federation with --paired-sites)")
        window = (self.options.ct_window_lo, self.options.ct_window_hi)
        if tuple(manifest.intensity.window or ()) != window:
            raise SiteDataRefused(
                f"recipe {self.name!r}: this site's dataset.toml [intensity] window = "
                f"{list(manifest.intensity.window or ())} HU differs from the run's CT window "
                f"{list(window)} (options.ct-window-lo/hi), which translations are written in; "
                f"set those options to the federation's window")

    def build(self) -> DAModel:
        o = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            nets = DANets(SiteGenerator(self.num_sites, o.gen_width, o.gen_blocks),
                          registration_net(o.reg_width), self.make_disc())
        return DAModel(nets)

    def make_disc(self) -> AwareDiscriminator:
        return AwareDiscriminator(self.config.image_size, self.num_sites, self.options.disc_width)

    def disc_twin(self, model: nn.Module) -> nn.Module:
        """A hook-free structural copy of D, evaluated with D's detached weights."""
        return self.make_disc().to(next(model.parameters()).device).requires_grad_(False)

    def optimizer(self, model: DAModel) -> torch.optim.Optimizer:
        o, disc = self.options, {id(p) for p in model.nets.disc.parameters()}
        rest = [p for p in model.nets.parameters() if id(p) not in disc]
        return torch.optim.Adam([{"params": rest, "lr": o.lr_gen},
                                 {"params": model.nets.disc.parameters(), "lr": o.lr_disc}],
                                betas=(o.beta1, 0.999))

    def pair_batch(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(CT [B,1,S,S], MR [B,1,S,S]) of a paired site's batch (image, label, paired image)."""
        if not isinstance(batch, (list, tuple)) or len(batch) < 3:
            raise ValueError(f"{self.name} needs paired dataset items (CT, label map, MR): load "
                             "a site whose dataset.toml declares [paired]")
        ct = self.real_images(batch[0], device)
        mr = self.real_images(batch[2], device)
        return ct, mr

    def train_local(self, model: DAModel, ctx: RoundContext) -> dict[str, float]:
        self.check_round(ctx)
        device, start = ctx.device, time.perf_counter()
        model.to(device).train()
        twin, opt = self.disc_twin(model), self.optimizer(model)
        ctx.restore_optimizer(opt, "opt_dagan")
        with DPModule(ctx.private, model.nets, opt, ctx.data, self.config.batch_size) as d:
            for batch in d.batches(ctx.steps):
                d.zero_grad()
                ct, mr = self.pair_batch(batch, device)
                if ct.shape[0] > 0:  # an empty Poisson batch: step() takes a noise-only, accounted step
                    site = torch.full((ct.shape[0],), ctx.site_index, dtype=torch.long, device=device)
                    self.objective.loss(d.module, twin, mr, ct, site).backward()
                d.step()
        ctx.keep_optimizer(opt, "opt_dagan")
        ctx.recipe_state["rounds_trained"] = ctx.rounds_done + 1
        return {"steps": float(ctx.steps), "seconds": time.perf_counter() - start}

    # -- using the trained model: post-processing of the released G ----------------------------
    def synthesize(self, model: DAModel, mr: torch.Tensor, site_index: int) -> torch.Tensor:
        """Synthetic CT [N,1,H,W] in [-1, 1] (site ``site_index``'s CT window) of MR images
        [N,1,H,W] in [-1, 1], in the MR's pose."""
        if not 0 <= site_index < self.num_sites:
            raise ValueError(f"site_index {site_index} out of range for sites {self.config.site_names}")
        with self.inference(model) as device:
            site = self.site_ids(int(site_index), mr.shape[0]).to(device)
            return model.nets.gen(mr.float().to(device), site)

    # -- capability: Translation (MR -> site k's CT, written in HU) ----------------------
    def site_style(self, model: DAModel, public: Any, site_index: int, seed: int = 0) -> int:
        """A site's style is its id: G is conditioned on the target CT site alone."""
        if not 0 <= site_index < self.num_sites:
            raise ValueError(f"site_index {site_index} out of range for sites {self.config.site_names}")
        return int(site_index)

    def translate_images(self, model: DAModel, images: torch.Tensor, source: int, target: int) -> torch.Tensor:
        """MR images [N,1,H,W] in [-1, 1] -> site ``target``'s CT in its window (the source
        site's MR scanner is implied by the image)."""
        return self.synthesize(model, images, target)

    def translated_output(self, target_index: int) -> TranslatedOutput:
        """CT in HU through the window every training site was held to (``check_site``)."""
        return TranslatedOutput(modality="CT", units="HU", reads=self.paired_modality,
                                window=(self.options.ct_window_lo, self.options.ct_window_hi))

    def sample(self, model: DAModel, label_maps: torch.Tensor, site_index: torch.Tensor | int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """A random-contrast rendering of each public map (an MR-like input), synthesised into
        the site's CT: post-processing of the released G."""
        site = self.site_ids(site_index, label_maps.shape[0])
        rendered = render_random_contrast(label_maps.long().cpu(), generator or torch.Generator().manual_seed(0),
                                          RandomContrast(), num_classes=self.num_classes)
        with self.inference(model) as device:
            return model.nets.gen(rendered.to(device), site.to(device))
