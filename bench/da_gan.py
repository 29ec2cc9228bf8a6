"""MR->CT from paired but misaligned images: da-gan under DP against the same generator
without registration (plain paired L1 on the misaligned pairs) and classical intensity
maps, scored in HU inside the head against the true aligned CT of held-out subjects.

    python -m bench.da_gan --work W [--sites A,B --subjects 48 --heldout 24 --seeds 0
        --rounds 4 --local-steps 10 --batch-size 8 --image-size 32 --width 8 --lr 5e-3
        --epsilon 10 --misregistration-mm 6]

The head-ct federation with every chosen CT site paired (``paired_sites``: each patient's
CT and an MR of the anatomy in another pose, sim/paired_modalities.py) is built (or
reused) under W/head-ct-paired by the product's ``prepare_federation``. Each private arm
runs the product's rounds in one process (``InProcessRunner``: every site's real
``train_round``, which loads the pairs through the site's dataset.toml [paired] table,
node ledger, Poisson sampling, per-patient clipping, noise calibrated for the schedule at
``--epsilon``, the server's aggregation pipeline).

Scores, per held-out test subject of each paired site S: input = the site's paired MR scan
(MR pose), normalised as in training; target = ``heldout/test/S/paired-clean`` (the clean
CT of the anatomy in the MR's pose, HU); ``mae_hu`` = mean |synthetic - target| in HU over
the head (``paired-labels`` > 0), pooled over subjects. Rows:
  da-gan-dp / plain-l1-dp      the recipe with / without registration (``register``)
  da-gan-noise-free            (--noise-free) da-gan at epsilon 1e8: clipping kept, noise ~0,
                               the same steps: what privacy costs at this budget
  hist-match                   MR matched to the pooled CT histogram of heldout/fit/S
  lookup-misaligned            a 64-bin MR->HU lookup fitted on heldout/fit/S's misaligned
                               pairs (its MR against its CT scan: what the recipes see)
  lookup-aligned (oracle)      the same lookup fitted on aligned truth (paired-clean): the
                               best any per-intensity map can do, not a realisable baseline
  real-ct-misaligned           the real CT scan itself (the CT's pose): the misregistration
Results: bench/results/da_gan.json (command and settings beside them).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from skimage.exposure import match_histograms

from bench.common import write_result
from medgen.client.simulated_site import simulated_sites
from medgen.config import RunConfig
from medgen.data.intensity import WindowMap
from medgen.data.manifest import load_manifest
from medgen.data.site_data import load_site
from medgen.models.registry import build_recipe
from medgen.privacy.ledger import PrivacyLedger
from medgen.privacy.site_update import specs_of
from medgen.server.aggregation import AggregationPipeline
from medgen.server.inprocess import InProcessRunner
from medgen.server.run_log import RunDir
from medgen.server.simulate import prepare_federation

ARMS = {"da-gan-dp": {"register": True}, "plain-l1-dp": {"register": False, "adversarial-weight": 0.0}}
NOISE_FREE = "da-gan-noise-free"  # --noise-free: epsilon 1e8 (clipping kept): privacy's share of the gap
BINS = 64


def train_private(base: RunConfig, options: dict, run_dir: Path):
    """One private arm through the product's in-process rounds; (recipe, model, epsilon per site)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = base.replace(options={**base.options, **options}, run_dir=str(run_dir),
                          state_root=str((run_dir / "state").resolve()))
    recipe = build_recipe(config)
    model = recipe.build()
    current = {k: v.detach().numpy() for k, v in recipe.shared_state(model).items()}
    pipeline = AggregationPipeline.for_run(config, specs_of(current), recipe.site_indexed_keys, RunDir(run_dir),
                                           resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key=uuid.uuid4().hex)
    final = runner.run(current, config.num_rounds)
    model.load_state_dict({**model.state_dict(), **{k: torch.from_numpy(np.asarray(v)) for k, v in final.items()}})
    epsilon = {s: PrivacyLedger.open(run_dir / "state" / s / "privacy_ledger.json", site=s).summary()["epsilon"]
               for s in config.site_names}
    return recipe, model.eval(), epsilon


def heldout(root: Path, split: str, site: str, size: int) -> dict[str, np.ndarray]:
    """One paired held-out site: MR in [-1, 1] as training normalises it, and in HU the CT
    scan (CT pose), the aligned clean CT (MR pose) and the head mask (MR pose)."""
    folder = root / "heldout" / split / site
    data = load_site(folder, size, need_labels=False)
    names = sorted(p.name for p in (folder / "paired").iterdir())
    read = lambda sub: np.stack([np.asarray(nib.load(str(folder / sub / n)).dataobj, np.float64) for n in names])  # noqa: E731
    out = {"mr": data.paired[:, 0].numpy().astype(np.float64), "ct": read("images"),
           "aligned": read("paired-clean"), "head": read("paired-labels") > 0}
    if out["mr"].shape != out["aligned"].shape:
        raise RuntimeError(f"{folder}: {out['mr'].shape[0]} served pairs for {len(names)} files")
    return out


def lookup(mr: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Mean HU per MR bin (64 bins over [-1, 1]); empty bins from their nearest neighbour."""
    index = np.clip(((mr + 1) / 2 * BINS).astype(int), 0, BINS - 1).ravel()
    sums, counts = np.bincount(index, hu.ravel(), BINS), np.bincount(index, minlength=BINS)
    filled = np.flatnonzero(counts)
    return np.interp(np.arange(BINS), filled, sums[filled] / counts[filled])


def apply_lookup(table: np.ndarray, mr: np.ndarray) -> np.ndarray:
    return table[np.clip(((mr + 1) / 2 * BINS).astype(int), 0, BINS - 1)]


def mae_hu(pred: np.ndarray, test: dict[str, np.ndarray]) -> float:
    return float(np.abs(pred - test["aligned"])[test["head"]].mean())


def classical(fit: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, float]:
    reference = fit["ct"][fit["ct"] > -1000].reshape(1, -1)  # the site's CT histogram (the field of view)
    matched = np.stack([match_histograms(m, reference) for m in test["mr"]])
    return {"hist-match": mae_hu(matched, test),
            "lookup-misaligned": mae_hu(apply_lookup(lookup(fit["mr"], fit["ct"]), test["mr"]), test),
            "lookup-aligned (oracle)": mae_hu(apply_lookup(lookup(fit["mr"], fit["aligned"]), test["mr"]), test),
            "real-ct-misaligned": mae_hu(test["ct"], test)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sites", default="A,B")
    parser.add_argument("--subjects", type=int, default=48)
    parser.add_argument("--heldout", type=int, default=24)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3, help="lr-gen and lr-disc of both arms")
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--misregistration-mm", type=float, default=6.0)
    parser.add_argument("--noise-free", action="store_true", help="also run da-gan at epsilon 1e8")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python -m bench.da_gan " + shlex.join(sys.argv[1:] if argv is None else argv)
    start, data_root = time.perf_counter(), args.work / "head-ct-paired"
    base = RunConfig(recipe="da-gan", image_size=args.image_size, batch_size=args.batch_size,
                     local_steps=args.local_steps, num_rounds=args.rounds, target_epsilon=args.epsilon,
                     accountant="rdp", sites=args.sites, eval_every=0,
                     options={"gen-width": args.width, "disc-width": args.width, "reg-width": args.width,
                              "lr-gen": args.lr, "lr-disc": args.lr})
    base = prepare_federation(base, data_root, num_sites=None, subjects_per_site=args.subjects,
                              federation="head-ct", public_size=8, heldout_fit=args.heldout,
                              heldout_test=args.heldout, paired_sites=args.sites,
                              misregistration_mm=args.misregistration_mm)
    sites = list(base.site_names)
    fit = {s: heldout(data_root, "fit", s, args.image_size) for s in sites}
    test = {s: heldout(data_root, "test", s, args.image_size) for s in sites}
    rows = {s: classical(fit[s], test[s]) for s in sites}
    per_seed, epsilon, seconds = {}, {}, {}
    arms = {name: (options, args.epsilon) for name, options in ARMS.items()}
    if args.noise_free:
        arms[NOISE_FREE] = (ARMS["da-gan-dp"], 1e8)
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm, (options, target) in arms.items():
            begin = time.perf_counter()
            config = base.replace(seed=seed, target_epsilon=target)
            recipe, model, eps = train_private(config, options, args.work / "runs" / f"{arm}-{seed}")
            seconds[f"{arm}-{seed}"] = round(time.perf_counter() - begin, 1)
            epsilon[f"{arm}-{seed}"] = eps
            for k, site in enumerate(sites):
                fake = recipe.synthesize(model, torch.from_numpy(test[site]["mr"][:, None]).float(), k)
                policy = load_manifest(data_root / "heldout" / "test" / site, root=data_root).intensity
                window = WindowMap(*policy.window, units=policy.units)
                hu = window.inverse(fake[:, 0].numpy().astype(np.float64))
                per_seed.setdefault(site, {}).setdefault(arm, {})[seed] = mae_hu(hu, test[site])
    for site in sites:
        for arm, by_seed in per_seed[site].items():
            values = list(by_seed.values())
            rows[site][arm] = float(np.mean(values))
            rows[site][f"{arm} (std over seeds)"] = float(np.std(values))
    write_result("da_gan", {
        "command": command, "settings": vars(args) | {"work": str(args.work)},
        "metric": "MAE in HU inside the head (paired-labels > 0) of the synthetic CT vs the clean CT of the "
                  "same anatomy in the MR's pose, held-out test subjects, pooled over pixels",
        "n_test_per_site": {s: int(test[s]["mr"].shape[0]) for s in sites},
        "mae_hu": rows, "per_seed": per_seed, "epsilon": epsilon, "seconds": seconds,
        "unit": "patient", "accountant": "rdp", "delta": base.delta,
        "anchors": {"unpaired CycleGAN (Wolterink 2017, brain)": 74, "paired CNN (Wolterink 2017, brain)": 85},
        "wall_seconds": round(time.perf_counter() - start, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
