"""Named latent directions (survey [5,6]) on a DP-trained site-gan (docs/recipes/controllable.md).

    .venv/bin/python -m bench.controls          # a few CPU-minutes at the defaults

1. Build a brain federation (sites A,B, 32 px) and train site-gan through the product's
   in-process rounds at epsilon 10 per site (RDP).
2. Per site: ``find_control`` (contrast) from generated samples only; the disentanglement
   check along it and along 10 random unit directions, on the same z: change in contrast,
   foreground area, edge map (1 - Canny-edge Dice). Post-processing: epsilon unchanged.
3. The same on site-gan's non-private ceiling (``non_private_ceiling``): the same training
   at epsilon 1e8 (bench/common.py ``noise_free``: DP-SGD noise ~0, clipping kept).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import NOISE_FREE_ARM, noise_free, write_result
from bench.redgan import train
from medgen.config import RunConfig
from medgen.models.controls import contrast, find_control, traverse
from medgen.sim.config import SimConfig
from medgen.sim.federation import build_federation

NAME = "controls"


def site_controls(gen: torch.nn.Module, site: int, strength: float, samples: int) -> dict:
    """The named contrast direction against 10 random unit directions, on the same z."""
    control = find_control(gen, site, samples=samples, generator=torch.Generator().manual_seed(site))
    z = torch.randn(64, gen.noise_dim, generator=torch.Generator().manual_seed(100 + site))
    named = traverse(gen, site, control.direction, z, strength)
    dirs = torch.randn(10, gen.noise_dim, generator=torch.Generator().manual_seed(200 + site))
    randoms = [traverse(gen, site, d / d.norm(), z, strength) for d in dirs]
    rand = {k: float(np.mean([abs(r[k]) for r in randoms])) for k in named}
    base = float(contrast(gen(torch.full((64,), site), z).detach()).mean())
    return {"base_contrast": base, "named": named, "random_mean_abs": rand,
            "contrast_ratio_named_over_random": abs(named["contrast_change"]) / max(rand["contrast_change"], 1e-9),
            "contrast_per_edge_change": {"named": abs(named["contrast_change"]) / max(named["edge_change"], 1e-3),
                                         "random": rand["contrast_change"] / max(rand["edge_change"], 1e-3)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=15)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--strength", type=float, default=2.0)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--root", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.root or tempfile.mkdtemp(prefix="bench-controls-"))
    sim = SimConfig(seed=0, sites="A,B", subjects_per_site=args.subjects, public_size=4, heldout_fit=0,
                    heldout_test=1, image_size=32)
    build_federation(sim, work / "data", workers=1)
    config = RunConfig.from_run_config({
        "recipe": "site-gan", "sites": "A,B", "data-root": str(work / "data"), "image-size": 32,
        "num-rounds": args.rounds, "local-steps": args.local_steps, "batch-size": 8, "seed": 0,
        "target-epsilon": 10.0, "accountant": "rdp", "eval-every": 0}).replace(
        run_dir=str(work / "run"), state_root=str(work / "run" / "state"))
    _, model, facts = train(config)
    _, ceiling, ceiling_facts = train(noise_free(config.replace(
        run_dir=str(work / "ceiling"), state_root=str(work / "ceiling" / "state"))))
    result = {"federation": sim.to_dict(), "training": facts, "strength": args.strength,
              "command": "python -m bench.controls " + " ".join(sys.argv[1:] if argv is None else argv),
              "sites": {}, NOISE_FREE_ARM: {"training": ceiling_facts, "sites": {}}}
    for site in range(2):
        result["sites"]["AB"[site]] = site_controls(model.gen.eval(), site, args.strength, args.samples)
        result[NOISE_FREE_ARM]["sites"]["AB"[site]] = site_controls(ceiling.gen.eval(), site, args.strength,
                                                                    args.samples)
        print("AB"[site], result["sites"]["AB"[site]], result[NOISE_FREE_ARM]["sites"]["AB"[site]], flush=True)
    write_result(NAME, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
