"""The cycle machinery that the cross-site translation recipes compose (spcycle-gan,
icycle-gan; open to da-gan): one site-conditioned generator G(x, target site), one
site-conditioned PatchGAN D(x, site), the per-record adversarial + cycle + identity loss,
and a ``CycleRecipe`` base whose private module is ``model.cycle`` (G, D and whatever a
recipe adds there), trained through ONE ``DPModule``.

Why one site-conditioned G and D (Song & Ye 2021; StarGAN): site k's images never leave
site k, so no site can hold two domains' real images for a two-generator CycleGAN. At
site k, for each real x_k and a target j != k drawn from public randomness:
  adversarial  D(x_k, k) real, D(T(x_k, j), j) fake; T wants D(T(x_k, j), j) real
  cycle        T(T(x_k, j), k) ~ x_k          identity  T(x_k, k) ~ x_k
where T is the recipe's translator (``CycleObjective.translate``: G alone, or a correction
network after G). Every term reads a real record and together they reach every network
in ``model.cycle``: that whole module is the private module (the recipes' privacy
arguments say it per recipe). In one backward D must receive only D's terms: D's fake term
reads the translation detached; the generator's adversarial term reads D through a
hook-free twin evaluated with D's detached weights (``functional_call``), so no gradient
of it reaches D and Opacus' hooks never see it.

The API the recipes use (kept small): ``SiteGenerator``, ``SiteDiscriminator``,
``CycleNets``, ``CycleOptions``, ``CycleObjective`` (``targets``, ``translate``, ``loss``,
``extra_terms``, ``central_step``) and ``CycleRecipe`` (``build_cycle``, ``disc_twin``,
``optimizer``, ``train_local`` with the hooks ``prepare`` and ``public_metrics``, the
Translation capability and ``sample``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from medgen.models.blocks import SiteDiscriminator, group_count
from medgen.models.dp_cgan import disc_loss, gen_loss
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import Recipe, RoundContext
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


class CycleNets(nn.Module):
    """G and D: the private module of a cycle recipe (a recipe may subclass it to add
    networks that the real-data terms also reach, e.g. icycle-gan's correction network)."""

    def __init__(self, gen: SiteGenerator, disc: SiteDiscriminator):
        super().__init__()
        self.gen = gen
        self.disc = disc


# -- options --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CycleOptions(RecipeOptions):
    gen_width: int = option(16, at_least=1)
    gen_blocks: int = option(2, at_least=0)
    disc_width: int = option(16, at_least=1)
    lr_gen: float = option(1e-3, above=0)  # every network of the cycle but D
    lr_disc: float = option(1e-3, above=0)
    beta1: float = option(0.5, at_least=0, below=1)
    adversarial_weight: float = option(1.0, at_least=0)
    cycle_weight: float = option(10.0, at_least=0)
    identity_weight: float = option(5.0, at_least=0)
    loss: str = option("nonsat", choices=("nonsat", "hinge"))


# -- the objective, shared by the private step and the central ceiling -------------------
class CycleObjective:
    """The per-record cycle loss (a batch loss = the mean of per-record losses, as Opacus'
    "mean" reduction needs). Recipes override ``translate`` (what T is) and ``extra_terms``
    (their own per-record terms); ``public`` is the recipe's frozen public networks or None."""

    def __init__(self, options: CycleOptions, num_sites: int):
        self.o, self.num_sites = options, num_sites

    def targets(self, source: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """A target site != source per record (public randomness); the source itself with one site."""
        if self.num_sites < 2:
            return source.clone()
        offset = torch.randint(1, self.num_sites, source.shape, generator=rng).to(source.device)
        return (source + offset) % self.num_sites

    def translate(self, nets: nn.Module, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        """T(x, site): the recipe's translator (here G alone)."""
        return nets.gen(x, site)

    def extra_terms(self, nets: nn.Module, public: nn.Module | None, x: torch.Tensor, labels: torch.Tensor | None,
                    fake: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor | float:
        return 0.0

    def loss(self, nets: nn.Module, disc_twin: nn.Module, public: nn.Module | None, x: torch.Tensor,
             labels: torch.Tensor | None, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over records of D's terms, the adversarial, cycle and identity terms, and the
        recipe's ``extra_terms``."""
        o, kind = self.o, self.o.loss
        fake = self.translate(nets, x, target)
        # D's terms: real at the record's own site, the translation (detached) as fake
        loss = disc_loss(nets.disc(x, source), True, kind).mean() + disc_loss(nets.disc(fake.detach(), target), False,
                                                                              kind).mean()
        # the translator's terms; D read at its current weights, detached: no gradient to D
        weights = {name: p.detach() for name, p in nets.disc.named_parameters()}
        if o.adversarial_weight > 0:
            loss = loss + o.adversarial_weight * gen_loss(functional_call(disc_twin, weights, (fake, target)), kind).mean()
        if o.cycle_weight > 0:
            loss = loss + o.cycle_weight * (self.translate(nets, fake, source) - x).abs().mean()
        if o.identity_weight > 0:
            loss = loss + o.identity_weight * (self.translate(nets, x, source) - x).abs().mean()
        return loss + self.extra_terms(nets, public, x, labels, fake, source, target)

    def central_step(self, nets: nn.Module, optimizer: torch.optim.Optimizer, disc_twin: nn.Module,
                     public: nn.Module | None, x: torch.Tensor, labels: torch.Tensor | None, source: torch.Tensor,
                     rng: torch.Generator) -> float:
        """The same objective on a pooled batch of every site, no DP: the ceiling baseline
        (benches only; nothing in the product calls it)."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(nets, disc_twin, public, x, labels, source, self.targets(source, rng))
        loss.backward()
        optimizer.step()
        return float(loss.detach())


# -- the recipe base ----------------------------------------------------------------------
class CycleRecipe(Recipe):
    """A cycle translation recipe: ``model.cycle`` is the one private module; subclasses set
    ``objective`` (a ``CycleObjective``) in ``__init__`` and build the model around
    ``build_cycle()``. ``public_nets(model)`` is the frozen public part (None here)."""

    private_modules = ("cycle",)
    requires_labels = False  # no recipe term needs a label map it cannot replace
    objective: CycleObjective

    def build_cycle(self, nets: type[CycleNets] = CycleNets, **extra: nn.Module) -> CycleNets:
        """G and D (and ``extra`` networks, for a ``nets`` subclass), seeded by the run only."""
        o = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            parts = {"gen": SiteGenerator(self.num_sites, o.gen_width, o.gen_blocks),
                     "disc": SiteDiscriminator(self.config.image_size, self.num_sites, o.disc_width)}
            parts.update({name: make() for name, make in extra.items()})
        return nets(**parts)

    def public_nets(self, model: nn.Module) -> nn.Module | None:
        return None

    def disc_twin(self, model: nn.Module) -> nn.Module:
        """A hook-free structural copy of D, evaluated with D's detached weights."""
        return SiteDiscriminator(self.config.image_size, self.num_sites,
                                  self.options.disc_width).to(next(model.parameters()).device).requires_grad_(False)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o, disc = self.options, {id(p) for p in model.cycle.disc.parameters()}
        rest = [p for p in model.cycle.parameters() if id(p) not in disc]
        return torch.optim.Adam([{"params": rest, "lr": o.lr_gen},
                                 {"params": model.cycle.disc.parameters(), "lr": o.lr_disc}], betas=(o.beta1, 0.999))

    def prepare(self, model: nn.Module, ctx: RoundContext) -> None:
        """Before the private steps (public work only, e.g. a public network's pretraining)."""

    def public_metrics(self, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        """Metrics from public inputs and the released weights only (none here)."""
        return {}

    def train_local(self, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        self.check_round(ctx)
        device, site, start = ctx.device, ctx.site_index, time.perf_counter()
        model.to(device).train()
        self.prepare(model, ctx)
        public = self.public_nets(model)
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
                    self.objective.loss(d.module, twin, public, x, labels if labelled else None, source,
                                        self.objective.targets(source, rng)).backward()
                d.step()
        ctx.keep_optimizer(opt, "opt_cycle")
        ctx.recipe_state["rounds_trained"] = ctx.rounds_done + 1
        metrics = {"steps": float(ctx.steps), "seconds": time.perf_counter() - start}
        return metrics | self.public_metrics(model, ctx)

    # -- using the trained model (capability: Translation) -----------------------------
    def sample(self, model: nn.Module, label_maps: torch.Tensor, site_index: torch.Tensor | int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """A random-contrast rendering of each public map (medgen.sim.random_contrast),
        translated into the site's style: post-processing of the released networks."""
        site = self.site_ids(site_index, label_maps.shape[0])
        rendered = render_random_contrast(label_maps.long().cpu(), generator or torch.Generator().manual_seed(0),
                                          RandomContrast(), num_classes=self.num_classes)
        with self.inference(model) as device:
            return self.objective.translate(model.cycle, rendered.to(device), site.to(device))

    def site_style(self, model: nn.Module, public: Any, site_index: int, seed: int = 0) -> int:
        """A site's style is its id: the translator is conditioned on the target site alone."""
        if not 0 <= site_index < self.num_sites:
            raise ValueError(f"site_index {site_index} out of range for sites {self.config.site_names}")
        return int(site_index)

    def translate_images(self, model: nn.Module, images: torch.Tensor, source: int, target: int) -> torch.Tensor:
        """Images [N,1,H,W] in [-1,1] into site ``target``'s style (the source is implied by
        the image: the cycle trained T from every site's images into every other's)."""
        with self.inference(model) as device:
            return self.objective.translate(model.cycle, images.float().to(device),
                                            self.site_ids(int(target), images.shape[0]).to(device))
