"""blind-denoise against a Gaussian-only denoiser and the classical denoisers, on each site's REAL noise.

    python -m bench.blind_denoise [--federation head-ct|brain] [--rounds 3] [--local-steps 8]
                                  [--subjects 60] [--heldout 16] [--no-ceiling] [--seeds 3]

Three runs of the recipe through the product's rounds (bench/restoration.py's ``train``:
server/inprocess.py, every site's real ``train_round``, ledger and DP-SGD):
  dp        synth-noise = learned, at --epsilon (the method);
  gaussian  synth-noise = gaussian, the SAME denoiser and schedule, its pairs made with white
            Gaussian noise of the site's TRUE noise std (measured on the held-out noisy/clean
            pairs: the baseline's best case, matched per site);
  ceiling   synth-noise = learned at epsilon 1e3 (RDP): the non-private ceiling.
Every method then denoises the held-out split's noisy scans (the site's real scanner noise,
never a synthetic degradation) and is scored against their clean twins (evaluation/
restoration.py ``evaluate_real_noise``: PSNR/SSIM over the body, HU MAE for CT), beside
NLM, wavelet and BM3D (if installed) told the true std. Every learned arm is trained and scored
once per seed (``seed`` = 0..seeds-1: DP noise, Poisson batches, public draws, initialisation);
per site the mean and std over seeds, and the per-seed dp - gaussian PSNR differences.
Results: bench/results/blind_denoise.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import write_result
from bench.restoration import CEILING_ACCOUNTANT, CEILING_EPSILON, train
from medgen.config import RunConfig, parse_overrides
from medgen.data.heldout_data import load_heldout
from medgen.data.manifest import load_manifest
from medgen.evaluation.restoration import evaluate_real_noise, learned_restorer, real_noise_std
from medgen.server.simulate import prepare_federation

NAME = "blind_denoise"


def site_facts(config: RunConfig, images: int) -> dict:
    """Per site: held-out (noisy, clean), HU per network unit (CT) and the true noise std."""
    root = Path(config.data_root) / "heldout"
    heldout = load_heldout(root, "test", config.image_size)
    out = {}
    for site in config.site_names:
        intensity = load_manifest(root / "test" / site, root=root.parent).intensity
        units = (intensity.window[1] - intensity.window[0]) / 2.0 if intensity.normalisation == "window" else None
        noisy, clean = heldout[site].images[:images], heldout[site].clean[:images]
        out[site] = {"noisy": noisy, "clean": clean, "units": units, "std": real_noise_std(noisy, clean)}
    return out


def summarise(facts: dict, seeds: list[dict], learned: list[str]) -> dict:
    """One site over seeds: each method's mean (and std over seeds for the learned arms) and
    the per-seed PSNR differences dp - gaussian."""
    methods = {}
    for name in seeds[0]:
        runs = [s[name] for s in seeds if name in s]
        row = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        if name in learned:
            row.update({f"{k}_std": float(torch.tensor([r[k] for r in runs], dtype=torch.float64).std(unbiased=False))
                        for k in ("psnr", "ssim")}, seeds=len(runs))
        methods[name] = row
    classical = [m for m in methods if m not in learned and m != "identity"]
    best = max(classical, key=lambda m: methods[m]["psnr"]) if classical else None
    diffs = [s["dp"]["psnr"] - s["gaussian"]["psnr"] for s in seeds if "dp" in s and "gaussian" in s]
    out = {"noise_std": facts["std"], "noise_std_units": facts["std"] * facts["units"] if facts["units"] else None,
           "units": "HU" if facts["units"] else "normalised [-1, 1]", "methods": methods}
    if not diffs:  # one arm alone (bench/merge_blind_denoise.py joins the arms)
        return out
    return {**out, "dp_minus_gaussian_psnr_db_per_seed": diffs, "dp_minus_gaussian_psnr_db": sum(diffs) / len(diffs),
            "dp_beats_gaussian_every_seed": all(d > 0 for d in diffs),
            "dp_minus_best_classical_psnr_db": methods["dp"]["psnr"] - methods[best]["psnr"] if best else None,
            "best_classical": best}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--federation", default="head-ct", choices=("brain", "head-ct"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--subjects", type=int, default=60, help="patients per site")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--heldout", type=int, default=16, help="held-out test images per site")
    parser.add_argument("--no-ceiling", action="store_true")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per learned arm")
    parser.add_argument("--arms", default="", help="comma list of the arms to run (default: all; "
                        "bench/merge_blind_denoise.py joins runs split by arm or seed)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1 "
                        "(run seeds as parallel processes; the classical rows are scored with seed 0 only)")
    parser.add_argument("--data-root", type=Path, help="reuse a built federation")
    parser.add_argument("--name", default=NAME, help="results file bench/results/<name>.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="medgen-bench-blind-"))
    try:
        base = RunConfig.from_run_config({
            "recipe": "blind-denoise", "num-rounds": args.rounds, "local-steps": args.local_steps,
            "image-size": args.image_size, "batch-size": args.batch_size, "target-epsilon": args.epsilon,
            "eval-every": 0, **parse_overrides(args.overrides)})
        base = prepare_federation(base, args.data_root or work / "federation", num_sites=None,
                                  subjects_per_site=args.subjects, reuse_any=args.data_root is not None,
                                  federation=args.federation, public_size=16, heldout_fit=4,
                                  heldout_test=args.heldout)
        facts = site_facts(base, args.heldout)
        stds = ",".join(f"{facts[s]['std']:.6g}" for s in base.site_names)
        variants = {"dp": (args.epsilon, base.accountant, {}),
                    "gaussian": (args.epsilon, base.accountant, {"synth-noise": "gaussian", "gaussian-std": stds})}
        if not args.no_ceiling:
            variants["ceiling"] = (CEILING_EPSILON, CEILING_ACCOUNTANT, {})
        if args.arms:
            variants = {k: v for k, v in variants.items() if k in args.arms.split(",")}
        runs, per_seed = {}, []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            models = {}
            for name, (epsilon, accountant, options) in variants.items():
                print(f"{args.federation} blind-denoise {name} seed {seed}: training at epsilon {epsilon:g}", flush=True)
                config = base.replace(options={**base.options, **options}, target_epsilon=epsilon, accountant=accountant,
                                      seed=seed, state_root=str(work / f"state-{name}-{seed}"),
                                      run_dir=str(work / f"run-{name}-{seed}"))
                recipe, model, runs[f"{name}-seed{seed}"] = train(config)
                models[name] = (recipe, model)
            per_seed.append({site: evaluate_real_noise(
                facts[site]["noisy"], facts[site]["clean"],
                {name: learned_restorer(r, m, k, 0) for name, (r, m) in models.items()}, facts[site]["units"],
                skip=() if seed == 0 else ("identity", "nl_means", "wavelet", "bm3d"))
                for k, site in enumerate(base.site_names)})
        per_site = {site: summarise(facts[site], [s[site] for s in per_seed], list(variants)) for site in base.site_names}
        for site, v in per_site.items():
            print(f"  site {site} (noise std {v['noise_std']:.4f}): " + ", ".join(
                f"{m} {r['psnr']:.2f}+-{r.get('psnr_std', 0):.2f} dB" for m, r in v["methods"].items()), flush=True)
        write_result(args.name, {"command": "python -m bench.blind_denoise " + " ".join(sys.argv[1:] if argv is None else argv),
                            "federation": args.federation,
                            "config": base.replace(target_epsilon=args.epsilon).to_run_config(),
                            "training": runs, "per_site": per_site,
                            "seeds": list(range(args.first_seed, args.first_seed + args.seeds)), "unit": "one patient (one slice per simulated subject)",
                            "accountant": base.accountant})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
