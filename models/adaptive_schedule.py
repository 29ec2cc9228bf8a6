"""Adaptive MedGAN (survey [16], Guo et al. 2023) under DP: a Wasserstein estimate drives G/D.

The measure is the critic's Wasserstein estimate W = E_real[D(x)] - E_fake[D(G(z))] (D's
mean patch logit): large when D tells real from generated apart (G lags), near zero when
it cannot (D lags). site-gan's ``schedule = "adaptive"`` (models/site_gan.py) sets each
round's number of G steps per D step from it, around the fixed schedule r0 = 1 /
disc-steps-per-gen-step: ``clamp(r0 * exp(W / wd-scale), min, max)`` (W = 0: the fixed
schedule; D ahead: more G steps; D behind: fewer). Under DP-SGD D steps are what costs
budget and G steps are free post-processing, so only the G side adapts: a site spends
exactly the planned ``ctx.steps`` private steps every round, whatever W says.

Privacy (unit = one patient; the rest of site-gan's argument is unchanged):
  1. The real term reads every patient's image: it is a Gaussian release, made at the end
     of each round with D's trained (released) weights, through ``ctx.private.
     gaussian_release``. Patient i contributes the row (a clamp(m_i, -B, B) / B, b), with
     m_i = mean patch logit of D on the patient's image and a^2 + b^2 = 1: its L2 norm is
     <= 1 = C by construction, so adding or removing a patient moves the sum by at most C.
     Noise N(0, (sigma_w C)^2) on both coordinates; the second one is a noisy patient
     count. a = 0.9: the count is the same every round, so its noise is averaged over the
     rounds' releases (4), while the critic mean is new each round.
  2. Declared: ``one_off_releases`` = (sigma_w, 1.0, num-rounds), so the plan calibrates
     the DP-SGD noise for the composition of the training steps with one release per
     round; each release is the accountant entry (sigma_w, 1.0, 1) in the site's ONE
     history (ledger), and a site cannot release more than planned (``gaussian_release``).
  3. Computing the rows changes nothing: D runs without gradients, outside DP-SGD.
  4. The real mean B (s0 / a) / max(n, 1), n = the mean over this site's releases so far
     of s1 / b, is post-processing of the releases; it is kept in the node-local recipe
     state and read in the NEXT round, when D is the same network (D never leaves the
     site) and G is the new global one.
  5. The fake term is D's released weights on generated images: public, free.
  6. The schedule is a function of (4) and (5) only: post-processing. It never reads a
     real record (tests/models/test_adaptive_schedule.py checks it is identical for two
     data sets). The number of D steps is never adapted (the plan's schedule holds).
  7. Metrics: the released real mean and W, the schedule's ratio: post-processing.
Round 1 (no release yet) uses the fixed schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from medgen.models.round_context import RoundContext

SCHEDULES = ("fixed", "adaptive")
REAL_MEAN_KEY = "wd_real_mean"   # node-local recipe state: the last released real term
COUNTS_KEY = "wd_noisy_counts"   # node-local: (sum of the released counts / b, releases)
VALUE_WEIGHT = 0.9               # a; the count's weight is b = sqrt(1 - a^2)
COUNT_WEIGHT = math.sqrt(1.0 - VALUE_WEIGHT ** 2)


@dataclass(frozen=True)
class AdaptiveSchedule:
    """The rule and its release; the options of site-gan that configure it."""

    noise_multiplier: float   # sigma_w of the per-round release
    bound: float              # B: per-patient critic means clamped to [-B, B] (logits)
    base_ratio: float         # r0: the fixed schedule's G steps per D step
    scale: float              # W (logits) per factor e of G steps per D step
    min_ratio: float
    max_ratio: float
    fake_count: int           # generated images for the fake term

    def releases(self, num_rounds: int) -> tuple[tuple[float, float, int], ...]:
        return ((float(self.noise_multiplier), 1.0, int(num_rounds)),)

    def ratio(self, wasserstein: float) -> float:
        return min(self.max_ratio, max(self.min_ratio, self.base_ratio * math.exp(wasserstein / self.scale)))

    # -- the two terms ---------------------------------------------------------------
    def rows(self, disc: nn.Module, images: torch.Tensor, site_index: int) -> torch.Tensor:
        """[N, 2] release rows, one per patient image [N,1,S,S] (step 1); L2 norm <= 1."""
        site = torch.full((images.shape[0],), site_index, dtype=torch.long, device=images.device)
        with torch.no_grad():
            means = disc(images, site).flatten(1).mean(dim=1)
        scaled = VALUE_WEIGHT * means.clamp(-self.bound, self.bound) / self.bound
        return torch.stack([scaled, torch.full_like(scaled, COUNT_WEIGHT)], dim=1)

    def real_mean(self, noisy_sum: torch.Tensor, counts: tuple[float, int]) -> tuple[float, tuple[float, int]]:
        """Step 4: the released real critic mean, and the running (count sum, releases)."""
        total, releases = counts[0] + float(noisy_sum[1]) / COUNT_WEIGHT, counts[1] + 1
        patients = max(total / releases, 1.0)
        return float(self.bound * noisy_sum[0] / VALUE_WEIGHT / patients), (total, releases)

    def fake_mean(self, recipe, model: nn.Module, site_index: int, generator: torch.Generator,
                  device: torch.device) -> float:
        """Step 5: D's mean logit on generated images, clamped as the real term."""
        with torch.no_grad():
            fake, site = recipe._fake(model, site_index, self.fake_count, generator, device)
            means = model.disc(fake, site).flatten(1).mean(dim=1)
        return float(means.clamp(-self.bound, self.bound).mean())

    # -- one round ---------------------------------------------------------------------
    def plan_round(self, recipe, model: nn.Module, ctx: RoundContext) -> float | None:
        """G steps per D step for this round from released values only (step 6); None
        (the fixed schedule) before the site's first release."""
        real = ctx.recipe_state.get(REAL_MEAN_KEY)
        if real is None:
            return None
        fake = self.fake_mean(recipe, model, ctx.site_index, ctx.generator(7), ctx.device)
        return self.ratio(float(real) - fake)

    def release(self, recipe, model: nn.Module, ctx: RoundContext) -> dict[str, float]:
        """End of round: release the real term (steps 1-4), store it, report W (step 7)."""
        data = ctx.data
        images = torch.stack([data[i][0] if isinstance(data[i], (list, tuple)) else data[i]
                              for i in range(len(data))])
        images = recipe.real_images(images, ctx.device)
        was_training = model.training
        model.eval()
        try:
            rows = self.rows(model.disc, images, ctx.site_index)
            noisy = ctx.private.gaussian_release(rows, 1.0, self.noise_multiplier)
            real, counts = self.real_mean(noisy, tuple(ctx.recipe_state.get(COUNTS_KEY, (0.0, 0))))
            fake = self.fake_mean(recipe, model, ctx.site_index, ctx.generator(8), ctx.device)
        finally:
            model.train(was_training)
        ctx.recipe_state[REAL_MEAN_KEY], ctx.recipe_state[COUNTS_KEY] = real, counts
        return {"wd_real_mean": real, "wd_estimate": real - fake}
