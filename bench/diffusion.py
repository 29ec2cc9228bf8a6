"""cddpm denoiser: DP step time against the non-private step, and sampling throughput.

One process, one thread, interleaved timing (bench.common.interleaved), same batch:
- "non-private": forward + backward of the batch-mean loss + Adam step;
- "dp-hooks":   Opacus hook-based per-sample gradients, clip, noise, step (K = 1);
- "dp-vmap":    torch.func per-sample gradients (Opacus no_op mode), clip, noise, step,
                with K = 1 and with K = ``--noise-draws`` (DPDM noise multiplicity);
- sampling: images per second of DDIM sampling at ``sample-steps`` (and at 50 steps).
Run by hand:

    .venv/bin/python -m bench.diffusion [--image-size 64 --batch-size 32 --repeats 5]
        -> bench/results/diffusion.json
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import TensorDataset

from bench.common import interleaved, write_result
from medgen.config import RunConfig
from medgen.models.cddpm import ConditionalDDPM
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.ledger import PrivacyPlan


def _recipe(size: int, batch: int, **options) -> ConditionalDDPM:
    return ConditionalDDPM(RunConfig(recipe="cddpm", image_size=size, batch_size=batch, options=options))


def _data(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1, torch.randint(0, 4, (n, size, size), generator=g)


def dp_step_fn(recipe: ConditionalDDPM, images, labels, mode: str):
    """A closure taking one full DP step (per-sample grads, clip, noise, Adam) on the batch."""
    model = recipe.build()
    plan = PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=1.0,
                       total_steps=10**6, noise_multiplier=1.0, max_grad_norm=1.0)
    private = PrivateTraining(plan, [], seed=0)
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=1e-4)
    wrapped, dp_opt, _ = private.make_private(model.denoiser, opt, TensorDataset(images, labels),
                                              len(images), grad_sample_mode=mode)
    rng = torch.Generator().manual_seed(1)

    def step() -> None:
        dp_opt.zero_grad(set_to_none=True)
        recipe.private_backward(model.denoiser, wrapped, images, labels, 0, rng)
        private.step(dp_opt)
    return step


def plain_step_fn(recipe: ConditionalDDPM, images, labels):
    from medgen.models.blocks import one_hot_labels
    from medgen.models.cddpm import record_losses
    model = recipe.build()
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=1e-4)
    rng = torch.Generator().manual_seed(1)
    cond, site = one_hot_labels(labels, 4), torch.zeros(len(images), dtype=torch.long)

    def step() -> None:
        x_t, t, target = recipe.draw_training_noise(images, rng)
        opt.zero_grad(set_to_none=True)
        record_losses(model.denoiser, x_t, cond, site, t, target).mean().backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--noise-draws", type=int, default=4)
    parser.add_argument("--channels", default=None, help="override options.channels")
    parser.add_argument("--sample-images", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    extra = {"channels": args.channels} if args.channels else {}
    size, batch = args.image_size, args.batch_size
    images, labels = _data(batch, size)
    base = _recipe(size, batch, **extra)
    multi = _recipe(size, batch, **extra, **{"noise-draws": args.noise_draws})
    fns = {
        "non-private": plain_step_fn(base, images, labels),
        "dp-hooks": dp_step_fn(_recipe(size, batch, **extra, **{"grad-sample-mode": "hooks"}),
                               images, labels, "hooks"),
        "dp-vmap": dp_step_fn(base, images, labels, "no_op"),
        f"dp-vmap-k{args.noise_draws}": dp_step_fn(multi, images, labels, "no_op"),
    }
    steps = interleaved(fns, repeats=args.repeats, warmup=1)
    plain = steps["non-private"]["median_s"]
    ratios = {name: s["median_s"] / plain for name, s in steps.items()}

    model = base.build()
    params = sum(p.numel() for p in model.parameters())
    maps = labels.repeat((args.sample_images + batch - 1) // batch, 1, 1)[:args.sample_images]
    sampling = {}
    for n_steps in (base.options.sample_steps, 50):
        start = time.perf_counter()
        base.sample(model, maps, torch.zeros(len(maps), dtype=torch.long),
                    torch.Generator().manual_seed(0), steps=n_steps)
        seconds = time.perf_counter() - start
        sampling[f"ddim{n_steps}"] = {"images": len(maps), "seconds": seconds,
                                      "images_per_s": len(maps) / seconds}
    write_result("diffusion", {
        "image_size": size, "batch_size": batch, "options": dict(base.config.options),
        "channels": list(base.options.channel_widths), "parameters": params,
        "step_time": steps, "ratio_to_non_private": ratios, "sampling": sampling,
    })


if __name__ == "__main__":
    main()
