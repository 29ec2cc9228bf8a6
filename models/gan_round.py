"""One local round of a DP GAN whose generator needs no real record: the shared loop.

site-gan and volume-gan (and any recipe of the same shape) train the same way: Adam for G
and D restored from the node's local state, ``ctx.steps`` DP steps of the private
discriminator inside ONE ``DPModule`` (Poisson batches of patients, per-patient clipping,
noise, accounting), a generator step every ``disc-steps-per-gen-step`` D steps (and at
least one per round), the optimizers kept for the next round. What differs between them
is how a batch of real records becomes a tensor (``real``) and the recipe's own
``disc_step``/``gen_step``; the privacy argument stays in each recipe's file.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from medgen.models.round_context import RoundContext
from medgen.privacy.dp_step import DPModule


def train_gan_round(recipe: Any, model: nn.Module, ctx: RoundContext,
                    real: Callable[[Any, torch.device], torch.Tensor],
                    gen_per_disc: float | None = None) -> dict[str, float]:
    """The loop above for ``recipe`` (with ``options.lr_gen/lr_disc/beta1/beta2/
    disc_steps_per_gen_step``, ``disc_step(model, d, real, site, rng, device)`` and
    ``gen_step(model, d, opt_g, site, rng, device)``); returns the round's scalar metrics.
    ``gen_per_disc``: G steps per D step for this round instead of the fixed schedule (an
    adaptive schedule, models/adaptive_schedule.py: after D step i, G has taken
    floor(i * gen_per_disc) steps); it must be computed from released values only."""
    o, device, site = recipe.options, ctx.device, ctx.site_index
    recipe.check_round(ctx)
    if getattr(o, "schedule", "fixed") != "fixed" and gen_per_disc is None:  # before any DP step
        raise ValueError(f"recipe {recipe.name!r} inherits options.schedule = {o.schedule!r} but "
                         "does not implement it (only site-gan does): set options.schedule = fixed")
    model.to(device).train()
    rng = ctx.generator()
    opt_g = torch.optim.Adam(model.gen.parameters(), lr=o.lr_gen, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(model.disc.parameters(), lr=o.lr_disc, betas=(o.beta1, o.beta2))
    ctx.restore_optimizer(opt_g, "opt_gen")
    ctx.restore_optimizer(opt_d, "opt_disc")
    start, loss_fake_sum, loss_g_sum, score_sum = time.perf_counter(), 0.0, 0.0, 0.0
    d_steps = g_steps = 0
    with DPModule(ctx.private, model.disc, opt_d, ctx.data, recipe.config.batch_size) as d:
        for i, batch in enumerate(d.batches(ctx.steps)):
            loss_fake_sum += recipe.disc_step(model, d, real(batch, device), site, rng, device)
            d_steps += 1
            if gen_per_disc is None:
                due = int((i + 1) % o.disc_steps_per_gen_step == 0)
            else:
                due = int((i + 1) * gen_per_disc + 1e-9) - g_steps
            if i == ctx.steps - 1 and g_steps + due == 0:
                due = 1
            for _ in range(due):
                loss_g, score = recipe.gen_step(model, d, opt_g, site, rng, device)
                loss_g_sum, score_sum, g_steps = loss_g_sum + loss_g, score_sum + score, g_steps + 1
    ctx.keep_optimizer(opt_g, "opt_gen")
    ctx.keep_optimizer(opt_d, "opt_disc")
    ctx.recipe_state["rounds_trained"] = ctx.rounds_done + 1
    return {"loss_gen": loss_g_sum / g_steps, "disc_fake_score": score_sum / g_steps,
            "loss_disc_fake": loss_fake_sum / d_steps, "disc_steps": float(d_steps),
            "gen_steps": float(g_steps), "seconds": time.perf_counter() - start}
