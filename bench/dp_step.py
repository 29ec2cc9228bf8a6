"""DP step time against the non-private step time of the dp-cgan recipe, same process.

    python -m bench.dp_step [--image-size 64] [--batch 32] [--repeats 10]

The private network is the discriminator: a DP D step (Opacus hooks: per-sample
gradients, per-patient clipping, noise, accounting, plus the public fake term) is timed
interleaved with a non-private D step doing the same forward/backward work on a batch of
the same size, and the G step (identical in both settings: it never sees real data).
Thread CPU time with one thread, so other load on the machine does not inflate it.
Image content does not change step time: random label maps and images are used.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from bench.common import write_result
from medgen.config import RunConfig
from medgen.models.blocks import one_hot_labels
from medgen.models.dp_cgan import disc_loss
from medgen.models.recipe import PublicData
from medgen.models.registry import build_recipe
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.dp_step import DPModule
from medgen.privacy.ledger import PrivacyPlan


def measure(image_size: int, batch: int, repeats: int, patients: int = 320) -> dict:
    torch.set_num_threads(1)
    rng = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (patients, image_size, image_size), generator=rng)
    images = torch.rand(patients, 1, image_size, image_size, generator=rng) * 2 - 1
    dataset, public = TensorDataset(images, labels), PublicData(labels[:200].clone())
    config = RunConfig(image_size=image_size, batch_size=batch)
    recipe = build_recipe(config)
    model = recipe.build().train()
    plain_disc = copy.deepcopy(model.disc)
    plain_opt = torch.optim.Adam(plain_disc.parameters(), 1e-3, betas=(0.5, 0.999))
    plan = PrivacyPlan(10.0, 1e-5, "prv", sample_rate_for(patients, batch), 10_000, 1.0, 1.0)
    private = PrivateTraining(plan, [], seed=0)
    dp_disc = DPModule(private, model.disc, torch.optim.Adam(model.disc.parameters(), 1e-3, betas=(0.5, 0.999)),
                       dataset, batch)  # the recipe's own DP-step plumbing (privacy/dp_step.py)
    gen_opt = torch.optim.Adam(model.gen.parameters(), 1e-3, betas=(0.5, 0.999))
    device, noise_rng = torch.device("cpu"), torch.Generator().manual_seed(1)
    site = torch.zeros(batch, dtype=torch.long)
    times: dict[str, list[float]] = {"dp_disc_step": [], "plain_disc_step": [], "gen_step": []}
    with dp_disc as d:
        for k, (x, y) in enumerate(d.batches(repeats + 2)):
            t0 = time.thread_time()
            recipe.disc_step(model, d, x, y, public, 0, noise_rng, device)
            t1 = time.thread_time()
            recipe.gen_step(model, d, gen_opt, public, 0, noise_rng, device)
            t2 = time.thread_time()
            real_x, real_y = images[:batch], labels[:batch]
            fake_labels, fake_sites = recipe._public_conditions(public, 0, batch, noise_rng, device)
            t3 = time.thread_time()
            with torch.no_grad():
                fake = model.gen(fake_labels, fake_sites, *model.gen.draw_noise(batch, noise_rng, device))
            plain_opt.zero_grad()
            loss = (disc_loss(plain_disc(real_x, one_hot_labels(real_y, 4), site), True, "nonsat").mean()
                    + disc_loss(plain_disc(fake, fake_labels, fake_sites), False, "nonsat").mean())
            loss.backward()
            plain_opt.step()
            t4 = time.thread_time()
            if k >= 2:  # warm-up
                times["dp_disc_step"].append(t1 - t0)
                times["gen_step"].append(t2 - t1)
                times["plain_disc_step"].append(t4 - t3)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"image_size": image_size, "batch": batch, "repeats": repeats, "median_thread_cpu_s": med,
            "ratio_dp_over_plain_disc_step": med["dp_disc_step"] / med["plain_disc_step"],
            "ratio_dp_over_plain_local_step": (med["dp_disc_step"] + med["gen_step"])
            / (med["plain_disc_step"] + med["gen_step"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, nargs="+", default=[64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    write_result("dp_step", {"recipe": "dp-cgan", "clock": "thread CPU time, 1 thread",
                             "results": [measure(s, args.batch, args.repeats) for s in args.image_size]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
