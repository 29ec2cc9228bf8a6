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
at site j and averaged by FedAvg. G, D, the loop and the adversarial/cycle/identity terms
are models/cycle.py's (shared with icycle-gan); this file adds S and the structure term.
Design and measurements: docs/recipes/spcycle-gan.md.

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
``CycleObjective.central_step`` (models/cycle.py) is the same objective without DP-SGD on
pooled data: the non-private centralised ceiling for benches only; nothing in the product
calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from monai.losses import DiceCELoss
from torch import nn

from medgen.config import ConfigError
from medgen.models.cycle import CycleNets, CycleObjective, CycleOptions, CycleRecipe
from medgen.models.options import RecipeOptions, option
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.segmenter import SegmenterSettings, build_segmenter, fit_segmenter, public_batches


class SPCycleModel(nn.Module):
    """``cycle`` (G, D: DP-trained) and ``seg`` (S: public, frozen); every key travels."""

    def __init__(self, cycle: CycleNets, seg: nn.Module):
        super().__init__()
        self.cycle = cycle
        self.seg = seg.requires_grad_(False)


# -- options (why these defaults: docs/recipes/spcycle-gan.md) ------------------------------
@dataclass(frozen=True)
class SPCycleOptions(CycleOptions):
    structure_weight: float = option(1.0, at_least=0)  # 0 = the plain CycleGAN (ablation)
    # S: paths on the SERVER's disk, comma-separated (an ensemble); else pretrained in round 1
    seg_init: str = ""
    seg_pretrain_steps: int = option(300, at_least=0)
    public_eval_samples: int = option(8, at_least=0)  # the public structure-Dice metric

    @property
    def seg_init_paths(self) -> tuple[Path, ...]:
        return tuple(Path(p.strip()).expanduser() for p in self.seg_init.split(",") if p.strip())


class SPCycleObjective(CycleObjective):
    """The cycle loss plus the structure term: Dice-CE of S(G(x, j)) against x's label map
    (labels None: S's own prediction on x), through the frozen public S (points 1-3)."""

    def __init__(self, options: SPCycleOptions, num_sites: int):
        super().__init__(options, num_sites)
        self.structure_fn = DiceCELoss(to_onehot_y=True, softmax=True)  # per-record Dice, pixel-mean CE

    def extra_terms(self, nets, seg, x, labels, fake, source, target):
        if self.o.structure_weight == 0:
            return 0.0
        if labels is None:
            with torch.no_grad():
                labels = seg(x).argmax(dim=1)
        return self.o.structure_weight * self.structure_fn(seg(fake), labels[:, None].long())


# -- the recipe ----------------------------------------------------------------------------
class SPCycleGAN(CycleRecipe):
    """Site-conditioned CycleGAN + structure loss, G and D DP-trained; see the docstring."""

    name: ClassVar[str] = "spcycle-gan"
    Options: ClassVar[type[RecipeOptions]] = SPCycleOptions
    shared_prefixes: ClassVar[tuple[str, ...] | None] = None  # G, D: DP releases; S: public

    def __init__(self, config):
        super().__init__(config)
        self.objective = SPCycleObjective(self.options, self.num_sites)

    def build(self) -> SPCycleModel:
        seg = build_segmenter(SegmenterSettings(), self.config.seed + 1, max(1, len(self.options.seg_init_paths)),
                              num_classes=self.num_classes)
        return SPCycleModel(self.build_cycle(), seg)

    def public_nets(self, model: SPCycleModel) -> nn.Module:
        return model.seg

    def initialise(self, model: SPCycleModel) -> None:
        """S from ``options.seg-init`` on the coordinator (public data only: no privacy cost)."""
        paths = self.options.seg_init_paths
        members = list(model.seg.members) if len(paths) > 1 else [model.seg]
        for path, member in zip(paths, members):
            if not path.is_file():
                raise ConfigError(f"options.seg-init: {path} does not exist on the coordinator; make it "
                                  f"with `medgen pretrain-segmenter --public DATA/public --out {path}`")
            member.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def prepare(self, model: SPCycleModel, ctx: RoundContext) -> None:
        """S pretrained in round 1 when no ``seg-init`` was given; then frozen (point 3)."""
        if ctx.rounds_done == 0 and not self.options.seg_init and self.options.seg_pretrain_steps > 0:
            self.pretrain_segmenter(model, ctx.public)
        model.seg.eval().requires_grad_(False)

    def public_metrics(self, model: SPCycleModel, ctx: RoundContext) -> dict[str, float]:
        if ctx.public is None or self.options.public_eval_samples == 0:
            return {}
        return {"public_structure_dice": self.public_structure_dice(model, ctx.public, ctx.generator(1))}

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
