"""Learned cross-site translation under DP: spcycle-gan, its ablation (the plain private
CycleGAN, structure-weight 0), icycle-gan and bridge-translate, beside identity, histogram
matching, inverted histogram matching, spcycle-gan's noise-free arm (the same federated
run at bench.common.NOISE_FREE_EPSILON) and the non-private centralised SPCycle-GAN
ceiling, on the brain federation (site-to-site harmonisation) or the head-CT federation
(MR->CT from the MR site M, CT site-to-site, CT->MR), every ordered site pair, over seeds.

    python -m bench.spcycle --work W --federation brain|head-ct [--sites A,B --subjects 24
        --seeds 0,1,2 --rounds 2 --local-steps 5 --batch-size 8 --image-size 32 --width 8
        --epsilon 10 --seg-steps 200 --target-seg-steps 150 --central-steps 400
        --bridge-steps 2 --curve 4,16,64]

The federation is built (or reused) under W/<federation> by the product's
``medgen.server.simulate.prepare_federation`` (as ``medgen-server simulate --federation``).
S (spcycle-gan's frozen structure segmenter) is pretrained ONCE on public renderings
(``medgen pretrain-segmenter``'s code) and shipped to the spcycle arms as ``options.seg-init``.
Each private arm runs the product's rounds in one process (``InProcessRunner``: every
site's real ``train_round``, node ledger, Poisson sampling, per-patient clipping, noise
calibrated for the schedule at ``--epsilon``, the server's aggregation pipeline), in a
fresh state folder (a rerun in the same --work once reused spent ledgers: every site
refused with BudgetExceeded and the arm was scored at its initial weights; an excluded
site now stops the bench). bridge-translate's translation reads only its public S and
each site's one-off DP style release, so it runs ``--bridge-steps`` local steps. The
ceiling is ``CycleObjective.central_step`` on pooled images of every site, no DP, for
``--central-steps`` steps: it once ran only as many steps as one private round (12), in
the GAN's first transient, and scored worse than its own initial weights. ``--curve B1,B2``
instead trains spcycle-gan private, noise-free and central at those per-site step budgets
(central: budget x sites steps) and stores them under <federation>-curve: privacy or
steps? Scores: evaluation/translation_truth.py (SSIM/PSNR/MAE in the head/brain box, MAE in
HU inside the head for CT targets, Dice of target-site segmenters trained on real held-out
fit images) and ``recovery``: the fraction of the domain gap that translation closes for
that segmenter (evaluation/adaptation.py ``recovery``: (Dice on translated - Dice on the
untranslated source) / (Dice on real target images - Dice on the untranslated source)).
Results are merged into bench/results/spcycle.json under the federation.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, noise_free, write_result
from medgen.client.simulated_site import simulated_sites
from medgen.config import RunConfig
from medgen.data.heldout_data import load_heldout
from medgen.data.site_data import load_public_bank, load_site
from medgen.evaluation.adaptation import recovery
from medgen.evaluation.translation import classical_baselines
from medgen.evaluation.translation_truth import evaluate_pairs, hu_windows, target_segmenters
from medgen.models.registry import build_recipe
from medgen.models.site_style import translate
from medgen.models.segmenter import SegmenterSettings
from medgen.models.segmenter_pretrain import pretrain
from medgen.privacy.ledger import PrivacyLedger
from medgen.privacy.site_update import specs_of
from medgen.server.aggregation import AggregationPipeline
from medgen.server.inprocess import InProcessRunner
from medgen.server.run_log import RunDir
from medgen.server.simulate import prepare_federation

ARMS = {"spcycle-dp": ("spcycle-gan", {"structure-weight": 1.0}),
        "cyclegan-dp": ("spcycle-gan", {"structure-weight": 0.0}),  # the ablation of the structure loss
        "icycle-dp": ("icycle-gan", {}),
        # S public and frozen here (no public S steps), styles from the one-off DP release
        "bridge-dp": ("bridge-translate", {"seg-steps-per-round": 0})}
NOISE_FREE = "spcycle-noise-free"  # spcycle-dp's run at NOISE_FREE_EPSILON: same steps, clipping, runner
CEILING = "spcycle-central"
BASELINES = ("identity", "hist-match", "inv-hist-match")
ORDER = (*BASELINES, *ARMS, NOISE_FREE, CEILING)
METRICS = ("ssim", "psnr", "mae", "mae_hu", "dice", "dice_fraction", "recovery")


def train_private(base: RunConfig, recipe_name: str, options: dict, run_dir: Path):
    """One private arm through the product's in-process rounds, in a FRESH ``run_dir`` (its
    node ledgers start empty); returns (recipe, model, epsilon). Raises if any round
    excluded a site or kept the previous weights: the arm would be scored untrained."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = base.replace(recipe=recipe_name, options={**base.options, **options}, run_dir=str(run_dir),
                          state_root=str((run_dir / "state").resolve()))
    recipe = build_recipe(config)
    model = recipe.build()
    recipe.initialise(model)
    current = {k: v.detach().numpy() for k, v in recipe.shared_state(model).items()}
    pipeline = AggregationPipeline.for_run(config, specs_of(current), recipe.site_indexed_keys, RunDir(run_dir),
                                           resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key=uuid.uuid4().hex)
    final = runner.run(current, config.num_rounds)
    for result in runner.results:
        if not result.accepted or result.excluded:
            raise RuntimeError(f"{recipe_name} in {run_dir}: round {result.round} excluded "
                               f"{[e.get('reason') for e in result.excluded]} (accepted: {result.accepted}); "
                               "the arm would be scored at stale weights")
    model.load_state_dict({**model.state_dict(), **{k: torch.from_numpy(np.asarray(v)) for k, v in final.items()}})
    epsilon = {s: PrivacyLedger.open(run_dir / "state" / s / "privacy_ledger.json", site=s).summary()["epsilon"]
               for s in config.site_names}
    return recipe, model.eval(), epsilon


def train_central(base: RunConfig, seg_init: Path, budgets: list[int]):
    """The ceiling: spcycle-gan's objective, no DP, on pooled batches of every site; yields
    (steps, recipe, model in eval mode) after each of the ascending step ``budgets``."""
    config = base.replace(recipe="spcycle-gan", options={**base.options, "seg-init": str(seg_init),
                                                          "seg-pretrain-steps": 0})
    recipe = build_recipe(config)
    model = recipe.build()
    recipe.initialise(model)
    sites = [load_site(Path(config.data_root) / "sites" / s, config.image_size) for s in config.site_names]
    images = torch.cat([s.images for s in sites]).float()
    labels = torch.cat([s.labels for s in sites]).long()
    source = torch.cat([torch.full((s.images.shape[0],), k) for k, s in enumerate(sites)])
    opt, twin, rng = recipe.optimizer(model), recipe.disc_twin(model), torch.Generator().manual_seed(config.seed)
    done = 0
    for budget in budgets:
        model.train()
        model.seg.eval()
        for _ in range(budget - done):
            pick = torch.randint(0, images.shape[0], (config.batch_size,), generator=rng)
            recipe.objective.central_step(model.cycle, opt, twin, model.seg, images[pick], labels[pick],
                                          source[pick], rng)
        done = budget
        yield budget, recipe, model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spcycle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--federation", choices=("brain", "head-ct"), default="brain")
    parser.add_argument("--sites", default="A,B", help="brain: A-D; head-ct: A-D (CT) and M (MR)")
    parser.add_argument("--subjects", type=int, default=24, help="subjects per site when building")
    parser.add_argument("--heldout", type=int, default=16, help="held-out fit and test subjects")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--seg-steps", type=int, default=200, help="S's public pretraining steps")
    parser.add_argument("--target-seg-steps", type=int, default=150, help="the evaluation segmenters' steps")
    parser.add_argument("--central-steps", type=int, default=400, help="the non-private central ceiling's steps")
    parser.add_argument("--bridge-steps", type=int, default=2, help="bridge-translate's local steps (1 round)")
    parser.add_argument("--curve", help="comma-separated per-site step budgets: train spcycle-gan private, "
                                        "noise-free and central at each (instead of the table's arms)")
    parser.add_argument("--table", action="store_true", help="print the stored federation's table, train nothing")
    parser.add_argument("--key", help="store under this key (default: the federation), e.g. one seed per process")
    parser.add_argument("--merge", help="comma-separated stored keys (runs of one federation, other seeds) to "
                                        "merge into the federation's entry (<federation>-curve with --curve); "
                                        "trains nothing")
    args = parser.parse_args(argv)
    entry = args.federation + ("-curve" if args.curve else "")
    if args.table:
        print(markdown(json.loads((RESULTS / "spcycle.json").read_text())["runs"][entry]))
        return 0
    if args.merge:
        runs = json.loads((RESULTS / "spcycle.json").read_text())["runs"]
        write_result("spcycle", {"runs": {**runs, entry: merge([runs[k] for k in args.merge.split(",")])}})
        return 0
    torch.set_num_threads(1)
    command = "python -m bench.spcycle " + shlex.join(sys.argv[1:] if argv is None else argv)
    start, cpu_start, data_root = time.perf_counter(), time.process_time(), args.work / args.federation
    base = RunConfig(image_size=args.image_size, batch_size=args.batch_size, local_steps=args.local_steps,
                     num_rounds=args.rounds, target_epsilon=args.epsilon, accountant="rdp", sites=args.sites,
                     eval_every=0, options={"gen-width": args.width, "disc-width": args.width})
    base = prepare_federation(base, data_root, num_sites=None, subjects_per_site=args.subjects,
                              federation=args.federation, public_size=64, heldout_fit=args.heldout,
                              heldout_test=args.heldout)
    names = list(base.site_names)
    seg_init = (args.work / f"S-{args.federation}.pt").resolve()
    record = seg_init.with_name(seg_init.name + ".json")  # pretrain's provenance: reuse an identical S
    if not (record.is_file() and json.loads(record.read_text()).get("steps") == args.seg_steps):
        pretrain(data_root / "public", seg_init, args.seg_steps, args.image_size, 0)
    public = load_public_bank(data_root / "public", args.image_size)
    fit, test = (load_heldout(data_root, split, args.image_size) for split in ("fit", "test"))
    segmenters = target_segmenters(fit, base.num_classes, SegmenterSettings(steps=args.target_seg_steps,
                                                                            channels=(8, 16, 32)))
    windows = hu_windows(data_root, names)
    baselines = evaluate_pairs(test, classical_baselines(fit), segmenters, base.num_classes, windows)
    with_recovery(baselines["pairs"], baselines)
    per_seed, epsilon, seconds, noise = {}, {}, {}, {}
    for seed in (int(s) for s in args.seeds.split(",")):
        config, translators = base.replace(seed=seed), {}

        def private(arm: str, recipe_name: str, options: dict, run_config: RunConfig) -> None:
            tic = time.process_time()
            if recipe_name in ("spcycle-gan", "bridge-translate"):
                options = {**options, "seg-init": str(seg_init), "seg-pretrain-steps": 0}
            run_dir = args.work / f"{args.federation}-{arm}-{seed}"
            recipe, model, epsilon[f"{arm}@{seed}"] = train_private(run_config, recipe_name, options, run_dir)
            noise[f"{arm}@{seed}"] = PrivacyLedger.open(run_dir / "state" / names[0] / "privacy_ledger.json",
                                                        site=names[0]).plan.noise_multiplier
            translators[arm] = _translator(recipe, model, names, public)
            seconds[f"{arm}@{seed}"] = time.process_time() - tic
            print(f"seed {seed} {arm}: {seconds[f'{arm}@{seed}']:.0f} CPU s", flush=True)

        if args.curve:
            budgets = sorted(int(b) for b in args.curve.split(","))
            for b in budgets:
                steps = config.replace(local_steps=b)
                private(f"spcycle-dp@{b}", *ARMS["spcycle-dp"], steps)
                private(f"{NOISE_FREE}@{b}", *ARMS["spcycle-dp"], noise_free(steps))
            central_budgets = [b * len(names) * config.num_rounds for b in budgets]
        else:
            for arm, (recipe_name, options) in ARMS.items():
                steps = config.replace(local_steps=args.bridge_steps, num_rounds=1) if arm == "bridge-dp" else config
                private(arm, recipe_name, options, steps)
            private(NOISE_FREE, *ARMS["spcycle-dp"], noise_free(config))
            central_budgets = [args.central_steps]
        tic = time.process_time()
        for steps, recipe, model in train_central(config, seg_init, central_budgets):
            label = f"{CEILING}@{steps // (len(names) * config.num_rounds)}" if args.curve else CEILING
            translators[label] = _translator(recipe, copy.deepcopy(model), names, public)  # it trains on
        seconds[f"{CEILING}@{seed}"] = time.process_time() - tic
        per_seed[seed] = with_recovery(evaluate_pairs(test, translators, segmenters, base.num_classes, windows)["pairs"],
                                       baselines)
    pairs = {pair: {**baselines["pairs"][pair], **_mean_over_seeds([per_seed[s][pair] for s in per_seed])}
             for pair in baselines["pairs"]}
    result = {"command": command, "settings": vars(args) | {"work": str(args.work)}, "sites": names,
              "unit": "patient (one slice per simulated subject)", "accountant": "rdp", "delta": base.delta,
              "epsilon": epsilon, "noise_multiplier": noise, "cpu_seconds": seconds, "seeds": list(per_seed),
              "central_steps": args.central_steps, "pairs": pairs,
              "per_seed": {str(s): v for s, v in per_seed.items()}, "reference_dice": baselines["reference_dice"],
              "hu_window": {s: None if w is None else [w.lo, w.hi] for s, w in windows.items()},
              "n_test_per_site": baselines["n"], "total_seconds": time.perf_counter() - start,
              "total_cpu_seconds": time.process_time() - cpu_start}
    (args.work / f"spcycle-{args.key or entry}.json").write_text(json.dumps(result))  # a copy no race can lose
    previous = RESULTS / "spcycle.json"
    runs = json.loads(previous.read_text()).get("runs", {}) if previous.is_file() else {}
    write_result("spcycle", {"runs": {**runs, args.key or entry: result}})
    for pair, row in pairs.items():
        for method, m in row.items():
            print(f"{pair:6s} {method:22s} " + "  ".join(f"{k} {m[k]:.3f}" for k in METRICS if k in m), flush=True)
    return 0


def with_recovery(pairs: dict, baselines: dict) -> dict:
    """Adds ``recovery`` to every method's scores of ``pairs`` ({"s->t": {method: scores}}):
    evaluation/adaptation.py's gap fraction, per pair, with the untranslated source
    (identity) as no adaptation and the target segmenter's Dice on real target images as
    in-domain. Returns ``pairs``."""
    for pair, row in pairs.items():
        target = pair.split("->")[1]
        dice = {"no-adaptation": {pair: baselines["pairs"][pair]["identity"]["dice"]},
                "in-domain": {pair: baselines["reference_dice"][target]}}
        gaps = recovery(dice | {m: {pair: s["dice"]} for m, s in row.items() if m != "identity"})
        for method, scores in row.items():
            scores["recovery"] = 0.0 if method == "identity" else gaps[method].get(pair, float("nan"))
    return pairs


def markdown(result: dict) -> str:
    """One federation's table: a row per method, a column per ordered pair; a cell is
    SSIM / PSNR / Dice / recovery (mean over seeds), led by MAE in HU for a CT target."""
    pairs = list(result["pairs"])
    present = list(result["pairs"][pairs[0]])
    methods = [m for m in ORDER if m in present] + sorted((m for m in present if m not in ORDER),
                                                          key=lambda m: (m.split("@")[0], int(m.split("@")[1])))
    lines = ["| method | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    for method in methods:
        cells = []
        for pair in pairs:
            m = result["pairs"][pair][method]
            hu = f"**{m['mae_hu']:.0f}±{m.get('mae_hu_sd', 0):.0f} HU** · " if "mae_hu" in m else ""
            cells.append(f"{hu}{m['ssim']:.3f} · {m['psnr']:.1f} · {m['dice']:.3f} · {m['recovery']:+.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(parts: list[dict]) -> dict:
    """Runs of one federation with the same settings but other seeds, as one entry."""
    per_seed = {seed: rows for part in parts for seed, rows in part["per_seed"].items()}
    first = parts[0]
    pairs = {pair: {**{m: first["pairs"][pair][m] for m in first["pairs"][pair] if m in BASELINES},
                    **_mean_over_seeds([per_seed[s][pair] for s in per_seed])} for pair in first["pairs"]}
    return {**first, "command": [p["command"] for p in parts], "seeds": [int(s) for s in per_seed], "pairs": pairs,
            "per_seed": per_seed, "epsilon": {k: v for p in parts for k, v in p["epsilon"].items()},
            "noise_multiplier": {k: v for p in parts for k, v in p["noise_multiplier"].items()},
            "cpu_seconds": {k: v for p in parts for k, v in p["cpu_seconds"].items()},
            "total_seconds": sum(p["total_seconds"] for p in parts),
            "total_cpu_seconds": sum(p["total_cpu_seconds"] for p in parts)}


def _mean_over_seeds(rows: list[dict]) -> dict:
    """{method: {metric: mean, metric_sd: sd over seeds}}."""
    out = {}
    for method in rows[0]:
        values = {k: [r[method][k] for r in rows] for k in METRICS if k in rows[0][method]}
        out[method] = {k: float(np.mean(v)) for k, v in values.items()}
        out[method].update({f"{k}_sd": float(np.std(v)) for k, v in values.items()})
        out[method]["seeds"] = len(rows)
    return out


def _translator(recipe, model, names, public):
    """f(images, source, target): the cycle recipes' T(x, target); bridge-translate's S
    with the sites' DP-released styles (as bench/translation.py's "bridge")."""
    if recipe.name == "bridge-translate":
        styles = recipe.site_styles(model, public)
        return lambda x, s, t: translate(model.seg, x, styles[s], styles[t]).detach().cpu()
    return lambda x, s, t: recipe.translate_images(model, x, names.index(s), names.index(t)).detach().cpu()


if __name__ == "__main__":
    sys.exit(main())
