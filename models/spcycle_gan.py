"""spcycle-gan: SPCycle-GAN (Iacono & Khan 2023) between the federation's sites, under DP.

A CycleGAN with a structure term: a frozen segmenter S must still find the source's
anatomy in the translated image. In a federation site k's images never leave site k, so a
cycle between two sites cannot hold both domains' real images in one place. The design:
ONE site-conditioned generator G(x, target site) and ONE site-conditioned PatchGAN
discriminator D(x, site) (projection head), both shared. At site k, for each real x_k and
a target j != k drawn from public randomness:
  adversarial  D(x_k, k) real, D(G(x_k, j), j) fake; G wants D(G(x_k, j), j) real
  cycle        G(G(x_k, j), k) ~ x_k          identity  G(x_k, k) ~ x_k
  structure    S(G(x_k, j)) against x_k's label map (or S(x_k)'s argmax when the site has
               no labels): ``structure-weight`` 0 is the plain CycleGAN, the ablation.
What site j's style looks like reaches site k only through D's row j, trained as "real"
at site j and averaged by FedAvg. Design and measurements: docs/recipes/spcycle-gan.md.

PRIVACY ARGUMENT (DP.md "Which networks need DP-SGD"). Unit: the patient (one dataset item).
  1. Every term above reads a real record, and together they touch G AND D (the cycle,
     identity and structure terms reach G through x_k itself; the adversarial terms both
     networks). So G and D form ONE private module (``cycle``), trained through ONE
     ``DPModule`` over ``PrivateTraining``: Poisson sampling of patients, one record's
     loss = the sum of all its terms, its gradient over ALL of G's and D's parameters
     clipped together, one noise draw and ONE accountant step per step (no second
     mechanism to compose; the site's ledger holds exactly ``steps`` entries a round).
  2. In one backward, D must receive only the D terms and G only the G terms. D's fake
     term reads G(x_k, j) detached; G's adversarial term reads D through a hook-free twin
     evaluated at D's current parameters detached (``functional_call``), so no gradient of
     it reaches D. Both are parts of the same record's clipped gradient (an oracle test
     checks Opacus' per-record gradients against an autograd loop).
  3. S is public: loaded from ``options.seg-init`` (trained by the coordinator on public
     renderings only, ``medgen pretrain-segmenter``) or pretrained in round 1 on public
     renderings with a site-independent seed; it is frozen (``requires_grad`` off, never
     in an optimizer), so no site's data changes it. Gradients flow THROUGH it into G,
     inside the record's clipped gradient.
  4. The target sites j are public randomness (the round's stream). No one-off release:
     the plan is exactly Opacus' DP-SGD calibration.
  5. Shared weights are G and D (DP releases) and S (public); translating and sampling are
     post-processing. Returned metrics: step counts, wall time and S's Dice on G's
     translations of PUBLIC renderings (no loss on a private batch leaves the site).
``CycleSteps.central_step`` is the same objective without DP-SGD on pooled data: the
non-private centralised ceiling for benches only; nothing in the product calls it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn
from torch.func import functional_call

from medgen.config import ConfigError
from medgen.models.blocks import DownBlock, ProjectionHead, group_count
from medgen.models.dp_cgan import disc_loss, gen_loss
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import PublicData, Recipe, RoundContext
from medgen.models.segmenter import SegmenterSettings, build_segmenter, fit_segmenter, public_batches
from medgen.privacy.dp_step import DPModule
from medgen.sim.random_contrast import RandomContrast, render_random_contrast


# -- networks ----------------------------------------------------------------------------
class SiteFiLM(nn.Module):
    """GroupNorm without affine, then a per-target-site scale and shift (switchable AdaIN,
    Song & Ye 2021): the target site alone selects the style; identity at init."""

    def __init__(self, channels: int, num_sites: int):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(channels), channels, affine=False)
        self.scale = nn.Embedding(num_sites, channels)
        self.shift = nn.Embedding(num_sites, channels)
        nn.init.zeros_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (1 + self.scale(site)[:, :, None, None]) + self.shift(site)[:, :, None, None]


class SiteGenerator(nn.Module):
    """G(x, target): conv -> stride-2 down -> residual FiLM blocks -> up -> conv on
    cat(features, x) -> tanh. The input skip makes identity easy, so early rounds keep anatomy."""

    def __init__(self, num_sites: int, width: int, blocks: int):
        super().__init__()
        # no conv bias before a norm: it is normalised away, and would only collect DP noise
        self.inp = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.down = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False)
        self.films = nn.ModuleList(SiteFiLM(c, num_sites) for c in [width, 2 * width] + [2 * width] * blocks + [width])
        self.blocks = nn.ModuleList(nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False) for _ in range(blocks))
        self.up = nn.Conv2d(2 * width, width, 3, padding=1, bias=False)
        self.out = nn.Conv2d(width + 1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        act = lambda h, i: F.leaky_relu(self.films[i](h, site), 0.2)  # noqa: E731
        h = act(self.down(act(self.inp(x), 0)), 1)
        for i, block in enumerate(self.blocks):
            h = h + act(block(h), 2 + i)
        h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
        h = act(self.up(h), len(self.films) - 1)
        return torch.tanh(self.out(torch.cat([h, x], dim=1)))


class PatchDiscriminator(nn.Module):
    """D(x, site): stride-2 GroupNorm stages down to 4x4, projection on the site (PatchGAN)."""

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


class CycleNets(nn.Module):
    """G and D: the ONE private module (privacy argument, point 1)."""

    def __init__(self, gen: SiteGenerator, disc: PatchDiscriminator):
        super().__init__()
        self.gen = gen
        self.disc = disc


class SPCycleModel(nn.Module):
    """``cycle`` (G, D: DP-trained) and ``seg`` (S: public, frozen); every key travels."""

    def __init__(self, cycle: CycleNets, seg: nn.Module):
        super().__init__()
        self.cycle = cycle
        self.seg = seg.requires_grad_(False)


# -- options (why these defaults: docs/recipes/spcycle-gan.md) ------------------------------
@dataclass(frozen=True)
class SPCycleOptions(RecipeOptions):
    gen_width: int = option(16, at_least=1)
    gen_blocks: int = option(2, at_least=0)
    disc_width: int = option(16, at_least=1)
    lr_gen: float = option(1e-3, above=0)
    lr_disc: float = option(1e-3, above=0)
    beta1: float = option(0.5, at_least=0, below=1)
    adversarial_weight: float = option(1.0, at_least=0)
    cycle_weight: float = option(10.0, at_least=0)
    identity_weight: float = option(5.0, at_least=0)
    structure_weight: float = option(1.0, at_least=0)  # 0 = the plain CycleGAN (ablation)
    # S: paths on the SERVER's disk, comma-separated (an ensemble); else pretrained in round 1
    seg_init: str = ""
    seg_pretrain_steps: int = option(300, at_least=0)
    loss: str = option("nonsat", choices=("nonsat", "hinge"))
    public_eval_samples: int = option(8, at_least=0)  # the public structure-Dice metric

    @property
    def seg_init_paths(self) -> tuple[Path, ...]:
        return tuple(Path(p.strip()).expanduser() for p in self.seg_init.split(",") if p.strip())


# -- the objective, shared by the private step and the central ceiling -------------------
class CycleSteps:
    """The per-record SPCycle-GAN loss (a batch loss = the mean of per-record losses, as
    Opacus' "mean" reduction needs) and a non-private step on pooled data."""

    def __init__(self, options: SPCycleOptions, num_sites: int, num_classes: int):
        self.o, self.num_sites, self.num_classes = options, num_sites, num_classes
        self.structure_fn = DiceCELoss(to_onehot_y=True, softmax=True)  # per-record Dice, pixel-mean CE

    def targets(self, source: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """A target site != source per record (public randomness); the source itself with one site."""
        if self.num_sites < 2:
            return source.clone()
        offset = torch.randint(1, self.num_sites, source.shape, generator=rng).to(source.device)
        return (source + offset) % self.num_sites

    def loss(self, nets: nn.Module, disc_twin: nn.Module, seg: nn.Module, x: torch.Tensor,
             labels: torch.Tensor | None, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over records of every term (privacy argument, points 1-3). ``labels`` None:
        S's own prediction on x is the structure target."""
        o, kind = self.o, self.o.loss
        gen, disc = nets.gen, nets.disc
        fake = gen(x, target)
        # D's terms: real at the record's own site, the translation (detached) as fake
        loss = disc_loss(disc(x, source), True, kind).mean() + disc_loss(disc(fake.detach(), target), False, kind).mean()
        # G's terms; D read at its current weights, detached (point 2): no gradient to D
        weights = {name: p.detach() for name, p in disc.named_parameters()}
        if o.adversarial_weight > 0:
            loss = loss + o.adversarial_weight * gen_loss(functional_call(disc_twin, weights, (fake, target)), kind).mean()
        if o.cycle_weight > 0:
            loss = loss + o.cycle_weight * (gen(fake, source) - x).abs().mean()
        if o.identity_weight > 0:
            loss = loss + o.identity_weight * (gen(x, source) - x).abs().mean()
        if o.structure_weight > 0:
            if labels is None:
                with torch.no_grad():
                    labels = seg(x).argmax(dim=1)
            loss = loss + o.structure_weight * self.structure_fn(seg(fake), labels[:, None].long())
        return loss

    def central_step(self, model: SPCycleModel, optimizer: torch.optim.Optimizer, disc_twin: nn.Module,
                     x: torch.Tensor, labels: torch.Tensor | None, source: torch.Tensor,
                     rng: torch.Generator) -> float:
        """The same objective on a pooled batch of every site, no DP: the ceiling baseline."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(model.cycle, disc_twin, model.seg, x, labels, source, self.targets(source, rng))
        loss.backward()
        optimizer.step()
        return float(loss.detach())


# -- the recipe ----------------------------------------------------------------------------
class SPCycleGAN(Recipe):
    """Site-conditioned CycleGAN + structure loss, G and D DP-trained; see the docstring."""

    name: ClassVar[str] = "spcycle-gan"
    Options: ClassVar[type[RecipeOptions]] = SPCycleOptions
    private_modules: ClassVar[tuple[str, ...]] = ("cycle",)
    shared_prefixes: ClassVar[tuple[str, ...] | None] = None  # G, D: DP releases; S: public
    requires_labels: ClassVar[bool] = False  # unlabelled sites: S's prediction is the target

    def __init__(self, config):
        super().__init__(config)
        self.objective = CycleSteps(self.options, self.num_sites, self.num_classes)

    def build(self) -> SPCycleModel:
        o = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            cycle = CycleNets(SiteGenerator(self.num_sites, o.gen_width, o.gen_blocks),
                              PatchDiscriminator(self.config.image_size, self.num_sites, o.disc_width))
        seg = build_segmenter(SegmenterSettings(), self.config.seed + 1, max(1, len(o.seg_init_paths)),
                              num_classes=self.num_classes)
        return SPCycleModel(cycle, seg)

    def initialise(self, model: SPCycleModel) -> None:
        """S from ``options.seg-init`` on the coordinator (public data only: no privacy cost)."""
        paths = self.options.seg_init_paths
        members = list(model.seg.members) if len(paths) > 1 else [model.seg]
        for path, member in zip(paths, members):
            if not path.is_file():
                raise ConfigError(f"options.seg-init: {path} does not exist on the coordinator; make it "
                                  f"with `medgen pretrain-segmenter --public DATA/public --out {path}`")
            member.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def disc_twin(self, model: SPCycleModel) -> nn.Module:
        """A hook-free structural copy of D, evaluated with D's detached weights (point 2)."""
        return PatchDiscriminator(self.config.image_size, self.num_sites,
                                  self.options.disc_width).to(next(model.parameters()).device).requires_grad_(False)

    def optimizer(self, model: SPCycleModel) -> torch.optim.Optimizer:
        o = self.options
        return torch.optim.Adam([{"params": model.cycle.gen.parameters(), "lr": o.lr_gen},
                                 {"params": model.cycle.disc.parameters(), "lr": o.lr_disc}],
                                betas=(o.beta1, 0.999))

    def train_local(self, model: SPCycleModel, ctx: RoundContext) -> dict[str, float]:
        self.check_round(ctx)
        device, site, start = ctx.device, ctx.site_index, time.perf_counter()
        model.to(device).train()
        if ctx.rounds_done == 0 and not self.options.seg_init and self.options.seg_pretrain_steps > 0:
            self.pretrain_segmenter(model, ctx.public)
        model.seg.eval().requires_grad_(False)  # point 3: public and frozen
        labelled = getattr(ctx.data, "has_labels", True) is not False
        rng, twin = ctx.generator(), self.disc_twin(model)
        opt = self.optimizer(model)
        ctx.restore_optimizer(opt, "opt_cycle")
        with DPModule(ctx.private, model.cycle, opt, ctx.data, self.config.batch_size) as d:
            for batch in d.batches(ctx.steps):
                d.zero_grad()
                x, labels = self.real_batch(batch, device)
                if x.shape[0] > 0:  # an empty Poisson batch: step() takes a noise-only, accounted step
                    source = torch.full((x.shape[0],), site, dtype=torch.long, device=device)
                    self.objective.loss(d.module, twin, model.seg, x, labels if labelled else None, source,
                                        self.objective.targets(source, rng)).backward()
                d.step()
        ctx.keep_optimizer(opt, "opt_cycle")
        ctx.recipe_state["rounds_trained"] = ctx.rounds_done + 1
        metrics = {"steps": float(ctx.steps), "seconds": time.perf_counter() - start}
        if ctx.public is not None and self.options.public_eval_samples > 0:
            metrics["public_structure_dice"] = self.public_structure_dice(model, ctx.public, ctx.generator(1))
        return metrics

    def pretrain_segmenter(self, model: SPCycleModel, public: PublicData) -> None:
        """S on random-contrast renderings of public maps; the seed is the run's, not the
        site's, so every site computes the same S from the same broadcast weights."""
        settings = SegmenterSettings(steps=self.options.seg_pretrain_steps, batch_size=16, lr=3e-3)
        model.seg.requires_grad_(True)
        fit_segmenter(model.seg, public_batches(public.label_maps.long(), settings.batch_size,
                                                num_classes=self.num_classes), settings, seed=self.config.seed + 1)
        model.seg.requires_grad_(False)

    def public_structure_dice(self, model: SPCycleModel, public: PublicData, rng: torch.Generator) -> float:
        """Mean Dice (foreground classes) of S on G's translations of PUBLIC renderings to
        random sites: a metric computed from public inputs and released weights only."""
        maps = public.draw(self.options.public_eval_samples, generator=rng).long()
        fake = self.sample(model, maps, torch.randint(0, self.num_sites, (maps.shape[0],), generator=rng), rng)
        with self.inference(model):
            pred = model.seg(fake).argmax(dim=1).cpu()
        dice = [(2 * ((pred == c) & (maps == c)).sum() / ((pred == c).sum() + (maps == c).sum()).clamp_min(1))
                for c in range(1, self.num_classes)]
        return float(torch.stack(dice).mean())

    # -- using the trained model (capability: Translation) -----------------------------
    def sample(self, model: SPCycleModel, label_maps: torch.Tensor, site_index: torch.Tensor | int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """A random-contrast rendering of each public map (medgen.sim.random_contrast),
        translated into the site's style: post-processing of the released G."""
        site = self.site_ids(site_index, label_maps.shape[0])
        rendered = render_random_contrast(label_maps.long().cpu(), generator or torch.Generator().manual_seed(0),
                                          RandomContrast(), num_classes=self.num_classes)
        with self.inference(model) as device:
            return model.cycle.gen(rendered.to(device), site.to(device))

    def site_style(self, model: SPCycleModel, public: Any, site_index: int, seed: int = 0) -> int:
        """A site's style is its id: G is conditioned on the target site alone."""
        if not 0 <= site_index < self.num_sites:
            raise ValueError(f"site_index {site_index} out of range for sites {self.config.site_names}")
        return int(site_index)

    def translate_images(self, model: SPCycleModel, images: torch.Tensor, source: int,
                         target: int) -> torch.Tensor:
        """Images [N,1,H,W] in [-1,1] into site ``target``'s style (the source is implied by
        the image: the cycle trained G from every site's images into every other's)."""
        with self.inference(model) as device:
            return model.cycle.gen(images.float().to(device), self.site_ids(int(target), images.shape[0]).to(device))
