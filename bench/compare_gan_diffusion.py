"""cddpm vs dp-cgan at the same per-site epsilon on the same federation: the comparison table.

Both recipes run through `medgen-server simulate` with the same seed, sites, data root,
epsilon, accountant, rounds, local steps and batch size (only the recipe differs), unless
finished run directories are given. From each run it reads (same machine, same code):
  - FD_medgenenc-v1 and its real-vs-real floor, per site, at the last evaluated round
    (metrics.jsonl, coordinator's heldout/test), and site fidelity (site classifier
    accuracy on generated images);
  - synthetic-only segmentation Dice and its ratio to real-only Dice at the same count,
    per site (evaluation/utility.py TSTR, written to <run>/utility.json), and the same
    with acquisition augmentation (bias field + noise) in every arm (utility-augmented.json);
  - sampling throughput (images/s while synthesising the TSTR pairs, one thread);
  - training time per round (mean over rounds of the slowest site's local training
    seconds, and the wall time between round records);
  - epsilon per site (the ledgers' final value, accountant named).
Command (defaults = the default federation: 4 sites, 200 patients each, 64 px, eps 10):

    .venv/bin/python -m bench.compare_gan_diffusion --work /tmp/gan_vs_diffusion \\
        [--cddpm-run DIR --gan-run DIR] [--set key=value ...]
        -> bench/results/gan_vs_diffusion.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import write_result
from medgen.evaluation.utility import UtilitySettings, run_utilities

RECIPES = ("cddpm", "dp-cgan")


def simulate(recipe: str, out: Path, data_root: Path, overrides: list[str]) -> list[str]:
    command = [str(Path(sys.executable).parent / "medgen-server"), "simulate", "--out", str(out),
               "--data-root", str(data_root), "--set", f"recipe={recipe}"]
    for item in overrides:
        command += ["--set", item]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    return command


def evaluate_checkpoint(run_dir: Path) -> tuple[int, dict[str, float]]:
    """The coordinator's Evaluator on the run's checkpoint (for rounds the run did not evaluate)."""
    from medgen.config import RunConfig
    from medgen.evaluation.evaluator import Evaluator
    from medgen.models.registry import build_recipe
    from medgen.server.checkpoint import load_checkpoint

    config = RunConfig.from_toml(run_dir / "config.toml")
    checkpoint = load_checkpoint(run_dir)
    recipe = build_recipe(config)
    model = recipe.build()
    model.load_state_dict({**model.state_dict(), **checkpoint.shared_state})
    root = Path(config.data_root)
    evaluator = Evaluator.prepare(config, root / "heldout", root / "cache" / "evaluator")
    return checkpoint.server_round, evaluator.evaluate(recipe, model, checkpoint.server_round)


def read_run(run_dir: Path) -> dict:
    """Numbers of one run at its CHECKPOINT's round (train records up to that round)."""
    from medgen.server.checkpoint import load_checkpoint

    final = load_checkpoint(run_dir).server_round
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    trains = [r for r in records if r["kind"] == "train" and r["round"] <= final]
    evals = [r for r in records if r["kind"] == "eval" and r["round"] == final]
    if not trains:
        raise SystemExit(f"{run_dir}: metrics.jsonl has no train records")
    last = evals[-1]["metrics"] if evals else evaluate_checkpoint(run_dir)[1]
    sites = sorted(trains[-1]["per_site"])
    round_wall = [b["time"] - a["time"] for a, b in zip(trains, trains[1:])]
    local = [max(s["seconds"] for s in r["per_site"].values()) for r in trains]
    config = (run_dir / "config.toml").read_text()
    return {
        "eval_round": final,
        "fd": {s: last[f"fd/{s}"] for s in sites},
        "fd_floor": {s: last[f"fd_floor/{s}"] for s in sites},
        "site_fidelity": {s: last[f"site_acc/{s}"] for s in sites},
        "n_generated": {s: last[f"n_gen/{s}"] for s in sites},
        "epsilon": {s: trains[-1]["per_site"][s]["epsilon"] for s in sites},
        "local_train_seconds_per_round": statistics.mean(local),
        "wall_seconds_per_round": statistics.mean(round_wall) if round_wall else None,
        "rounds": trains[-1]["round"],
        "accountant": next((line.split("=")[1].strip().strip('"') for line in config.splitlines()
                            if line.startswith("accountant")), None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/gan_vs_diffusion"))
    parser.add_argument("--cddpm-run", type=Path, default=None)
    parser.add_argument("--gan-run", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="run-config override for BOTH runs, e.g. --set num-rounds=5")
    parser.add_argument("--utility-steps", type=int, default=UtilitySettings.steps)
    parser.add_argument("--per-site", type=int, default=None)
    parser.add_argument("--name", default="gan_vs_diffusion", help="bench/results/<name>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_root = (args.work / "federation").resolve()
    runs = {"cddpm": args.cddpm_run, "dp-cgan": args.gan_run}
    commands = {}
    for recipe in RECIPES:
        if runs[recipe] is None:
            runs[recipe] = (args.work / recipe).resolve()
            commands[recipe] = " ".join(simulate(recipe, runs[recipe], data_root, args.overrides))
    table = {}
    for recipe in RECIPES:
        row = read_run(runs[recipe])
        utility, augmented = run_utilities(runs[recipe], args.per_site,
                                           (UtilitySettings(steps=args.utility_steps),
                                            UtilitySettings(steps=args.utility_steps, augment=True)))
        row.update({"tstr_augmented_dice_synthetic": augmented["dice"]["synthetic"],
                    "tstr_augmented_dice_real": augmented["dice"]["real"],
                    "tstr_augmented_ratio": augmented["ratio"],
                    "tstr_augmented_min_ratio": augmented["min_ratio"]})
        row.update({"tstr_dice_synthetic": utility["dice"]["synthetic"],
                    "tstr_dice_real": utility["dice"]["real"],
                    "tstr_dice_real_plus_synthetic": utility["dice"]["real+synthetic"],
                    "tstr_ratio": utility["ratio"], "tstr_min_ratio": utility["min_ratio"],
                    "tstr_counts": utility["counts"],
                    "sampling_images_per_s": utility["sampling_images_per_s"],
                    "run_dir": str(runs[recipe])})
        table[recipe] = row
    write_result(args.name, {
        "commands": commands or "existing run dirs (see run_dir)", "table": table,
        "utility_command": f"python -m medgen.evaluation.utility RUN_DIR --steps {args.utility_steps} "
                           "[--augment]",
        "fd_extractor": "medgenenc-v1", "unit": "patient",
    })


if __name__ == "__main__":
    main()
