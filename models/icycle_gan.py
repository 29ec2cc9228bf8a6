"""icycle-gan: ICycle-GAN (Chen et al. 2024; METHODS.md #2) between the federation's sites, under DP.

A CycleGAN whose translations are refined by a residual encoder-decoder correction network
R, with a loss that treats the generator's blurry outputs as noisy labels. It composes
models/cycle.py (site-conditioned G(x, target) and PatchGAN D(x, site), the adversarial,
cycle and identity terms, the private loop) and adds, at site k for a real x_k and a
public-random target j != k:
  translator   T(x, j) = R(G(x, j), j): every cycle.py term is paid by T, so the identity
               term R(G(x_k, k), k) ~ x_k is a real supervised pair for R: the generator's
               own (blurry) rendering of x_k corrected back to x_k, in site k's style;
  noisy label  |B(T(x_k, j)) - G(x_k, j)|, G's output detached: G's translation is a
               NOISY label of the corrected image, the noise being a known blur B (a
               fixed Gaussian, ``blur-sigma``). Forward loss correction (Patrini et al.
               2017): the prediction goes through the noise model before it meets the
               noisy label, so R may restore detail that B removes but must keep what B
               keeps (G's contrast and anatomy). ``noisy-label-weight`` 0 is the ablation.
R is identity at init (its last conv is zero: T = G), conditioned on the target site by
the same per-site FiLM as G. Design, our reading of the paper, numbers:
docs/recipes/icycle-gan.md.

PRIVACY ARGUMENT (DP.md "Which networks need DP-SGD"). Unit: the patient (one dataset item).
  1. Site k's records reach: D (its real and fake terms), G and R (T's adversarial,
     cycle and identity terms read x_k; the noisy-label term reads x_k through both its
     sides). So G, R and D are ONE private module, ``cycle`` (``ICycleNets``), trained at
     site k through ONE ``DPModule``: Poisson sampling of patients, one record's loss =
     the sum of all its terms, its gradient over ALL of G's, R's and D's parameters
     clipped together (per patient), one noise draw, ONE accountant step per step in
     site k's ledger: nothing else to compose.
  2. D gets only D's terms: its fake term reads T(x_k, j) detached, T's adversarial term
     reads D through a hook-free twin at D's detached weights (models/cycle.py). The
     noisy label G(x_k, j) is computed without gradient: it is a function of the record,
     so the term is inside that record's clipped gradient, and moves R only.
  3. B has no trainable state (a fixed Gaussian, outside every module that travels).
     Labels are never read (``requires_labels`` False): no other private input exists.
  4. Targets j are public randomness (the round's stream); no one-off release.
  5. What travels: G, R and D (DP releases: FedAvg over sites is post-processing of each
     site's release). Translating R(G(x, j), j) and sampling from public renderings are
     post-processing. Returned metrics: step count and wall time only.
``CycleObjective.central_step`` on pooled data is the non-private centralised ceiling
(benches only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from torch import nn

from medgen.models.cycle import CycleNets, CycleObjective, CycleOptions, CycleRecipe, SiteFiLM
from medgen.models.options import RecipeOptions, option

EDGE = 0.999  # R refines in tanh's pre-image: atanh(clamp(y, -EDGE, EDGE)) + residual


class CorrectionNet(nn.Module):
    """R(y, target): a residual encoder-decoder (conv, stride-2 down, conv, up, conv on
    cat(features, skip)); the residual is added in tanh's pre-image of y, and the last conv
    starts at zero, so R is the identity until the data moves it."""

    def __init__(self, num_sites: int, width: int):
        super().__init__()
        self.enc = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.down = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.up = nn.Conv2d(2 * width, width, 3, padding=1, bias=False)
        self.films = nn.ModuleList(SiteFiLM(c, num_sites) for c in (width, 2 * width, 2 * width, width))
        self.out = nn.Conv2d(2 * width, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, y: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        act = lambda h, i: F.leaky_relu(self.films[i](h, site), 0.2)  # noqa: E731
        skip = act(self.enc(y), 0)
        h = act(self.mid(act(self.down(skip), 1)), 2)
        h = act(self.up(F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)), 3)
        return torch.tanh(torch.atanh(y.clamp(-EDGE, EDGE)) + self.out(torch.cat([h, skip], dim=1)))


class ICycleNets(CycleNets):
    """G, D and R: the ONE private module (privacy argument, point 1)."""

    def __init__(self, gen: nn.Module, disc: nn.Module, corr: CorrectionNet):
        super().__init__(gen, disc)
        self.corr = corr


class ICycleModel(nn.Module):
    """Only ``cycle``: every network here is DP-trained and travels."""

    def __init__(self, cycle: ICycleNets):
        super().__init__()
        self.cycle = cycle


@dataclass(frozen=True)
class ICycleOptions(CycleOptions):
    corr_width: int = option(8, at_least=1)
    noisy_label_weight: float = option(5.0, at_least=0)  # 0 = no loss correction (ablation)
    blur_sigma: float = option(1.0, above=0)  # the noise model B, in pixels


class ICycleObjective(CycleObjective):
    """The cycle loss paid by T = R o G, plus the forward-corrected noisy-label term."""

    def __init__(self, options: ICycleOptions, num_sites: int):
        super().__init__(options, num_sites)
        self.blur = GaussianFilter(2, options.blur_sigma).requires_grad_(False)  # point 3

    def translate(self, nets: nn.Module, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return nets.corr(nets.gen(x, site), site)

    def extra_terms(self, nets, public, x, labels, fake, source, target):
        if self.o.noisy_label_weight == 0:
            return 0.0
        with torch.no_grad():  # point 2: the noisy label moves nothing
            noisy = nets.gen(x, target)
        blurred = self.blur.to(fake.device)(fake)
        return self.o.noisy_label_weight * (blurred - noisy).abs().mean()


class ICycleGAN(CycleRecipe):
    """Site-conditioned CycleGAN + correction network + noisy-label loss; G, R, D DP-trained."""

    name: ClassVar[str] = "icycle-gan"
    Options: ClassVar[type[RecipeOptions]] = ICycleOptions
    shared_prefixes: ClassVar[tuple[str, ...] | None] = None  # G, R, D: DP releases

    def __init__(self, config):
        super().__init__(config)
        self.objective = ICycleObjective(self.options, self.num_sites)

    def build(self) -> ICycleModel:
        width = self.options.corr_width
        return ICycleModel(self.build_cycle(ICycleNets, corr=lambda: CorrectionNet(self.num_sites, width)))
