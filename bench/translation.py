"""bridge-translate: train it federated in-process, evaluate it on ground truth, time it.

    python -m bench.translation pretrain-seg --data-root D --seg-steps 20000 --out S.pt [--no-deform]
    python -m bench.translation train    --data-root D --run-dir R [--rounds 10 --local-steps 20]
                                         [--seg-init S.pt[,S2.pt]]
    python -m bench.translation evaluate --data-root D --run-dir R
    python -m bench.translation adapt    --data-root D --run-dir R
    python -m bench.translation timing   --data-root D
    python -m bench.translation summarise R1 R2 ... --name translation_seeds

``train`` runs the product's rounds in one process (``medgen.server.inprocess``): every
site's REAL round (``train_round``: its node ledger and reply store under R/state, Poisson
sampling of patients, per-patient clipping, noise calibrated once for the whole schedule
at the target epsilon, the accountant named), aggregated by the server's one pipeline
(validation, node-to-site binding, bounded weights, robust screen, FedAvg weighted by
num-examples, site rows from their own site): what ``medgen-server simulate --set
recipe=bridge-translate`` does with Flower, minus the transport. It writes R/config.toml,
R/metrics.jsonl and R/checkpoint.pt in the server's format (so ``medgen translate --run-dir
R`` and the evaluator read them) and R/privacy.json (with each node's ledger summary).

``evaluate`` writes R/translation.json and R/translation/*.png (evaluation/translation.py):
identity, HM, inverted HM, bridge-gan (x -> S -> G), bridge (texture carried, styles from
each site's DP release of its own tissue statistics), bridge-gen-style (the same with styles
measured on G's samples), and the non-private ceiling bridge-central (the same translation with styles measured
centrally on real labelled heldout/fit images, no DP).

``adapt`` writes R/adaptation.json (evaluation/adaptation.py): a UNet trained on site A's
labelled images, tested on every site without adaptation, on bridge-translated inputs,
with heavy intensity augmentation only, and in-domain; plus S itself.

``timing`` writes bench/results/translation.json: DP vs non-private step time of every
private network (D), the public S step, and the time of one round at 4 sites.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from medgen.atomic import atomic_write_json, atomic_write_text
from medgen.config import RunConfig

OPTIONS = {"gen-width": 16, "disc-width": 16, "seg-steps-per-round": 10, "seg-pretrain-steps": 0}


def _config(args) -> RunConfig:
    options = dict(OPTIONS)
    for item in args.option or []:
        key, _, value = item.partition("=")
        options[key] = type(OPTIONS.get(key, 0.0))(value) if key in OPTIONS else float(value)
    if args.seg_init:
        options["seg-init"] = ",".join(str(Path(p.strip()).resolve()) for p in args.seg_init.split(","))
    return RunConfig(recipe="bridge-translate", image_size=args.image_size, batch_size=args.batch_size,
                     local_steps=args.local_steps, num_rounds=args.rounds, seed=args.seed,
                     target_epsilon=args.epsilon, accountant="prv", sites=args.sites,
                     run_dir=str(args.run_dir), options=options)


def _command(args) -> str:
    """The command line that produced a result, recorded beside it (every option included)."""
    return "python -m bench.translation " + shlex.join(args.argv)


def _sites(config: RunConfig, data_root: Path, cache: Path):
    from medgen.data.site_data import load_public_bank, load_site

    public = load_public_bank(data_root / "public", config.image_size)
    sites = [load_site(data_root / "sites" / s, config.image_size, cache_dir=cache) for s in config.site_names]
    return public, sites


def train(args) -> None:
    """The product's rounds in one process (server/inprocess.py): every site's real
    ``train_round`` (node ledger, reply store, DP-SGD) and the server's one aggregation
    pipeline, which also writes R/metrics.jsonl as the server does."""
    import shutil
    import uuid

    from medgen.client.simulated_site import simulated_sites
    from medgen.models.registry import build_recipe
    from medgen.models.segmenter_pretrain import provenance_path
    from medgen.privacy.ledger import PrivacyLedger
    from medgen.privacy.site_update import specs_of
    from medgen.server.aggregation import AggregationPipeline
    from medgen.server.checkpoint import new_checkpoint, save_checkpoint
    from medgen.server.inprocess import InProcessRunner
    from medgen.server.run_log import RunDir

    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = run_dir / "state"
    if state.exists():  # a new training: the nodes' ledgers and reply stores start over
        print(f"removing the previous training's node states in {state}", flush=True)
        shutil.rmtree(state)
    config = _config(args).replace(data_root=str(Path(args.data_root).resolve()), state_root=str(state.resolve()))
    atomic_write_text(run_dir / "config.toml", config.to_toml())
    recipe = build_recipe(config)
    global_model = recipe.build()
    recipe.initialise(global_model)  # options.seg-init: S pretrained on public data, as the server does
    seg_init = []  # how each pretrained S was made (its S.pt.json), in member order
    for path in recipe.options.seg_init_paths:
        record = provenance_path(path)
        seg_init.append(json.loads(record.read_text()) if record.exists() else {"segmenter": str(path)})
    initial = {k: v.numpy() for k, v in recipe.shared_state(global_model).items()}
    run_key = uuid.uuid4().hex
    pipeline = AggregationPipeline.for_run(config, specs_of(initial), recipe.site_indexed_keys, RunDir(run_dir),
                                           resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key=run_key)
    log, started = [], [time.perf_counter()]

    def round_end(server_round: int, current: dict) -> None:
        result = runner.results[-1]
        save_checkpoint(run_dir, new_checkpoint({k: torch.from_numpy(v) for k, v in current.items()},
                                                server_round, config, run_key))
        ledgers = {s: PrivacyLedger.open(state / s / "privacy_ledger.json", site=s).summary()
                   for s in config.site_names}
        eps = {s: ledgers[s]["epsilon"] for s in config.site_names}
        log.append({"round": server_round, "seconds": time.perf_counter() - started[0], "epsilon": eps,
                    "excluded": result.excluded, "aggregate": result.metrics})
        started[0] = time.perf_counter()
        print(json.dumps(log[-1]), flush=True)
        atomic_write_json(run_dir / "privacy.json", {
            "accountant": config.accountant, "delta": config.delta, "unit": "patient",
            "sampling": "Poisson", "plans": [ledgers[s]["plan"] for s in config.site_names], "epsilon": eps,
            "command": _command(args), "seg_init": seg_init, "node_ledgers": ledgers, "rounds": log})

    runner.run(initial, config.num_rounds, on_round_end=round_end)


def pretrain_seg(args) -> None:
    """S on random-contrast renderings of the public bank only (zero privacy cost): what a
    coordinator computes once with ``medgen pretrain-segmenter`` and ships as ``--seg-init``."""
    from medgen.models.segmenter_pretrain import pretrain

    torch.set_num_threads(1)
    record = pretrain(Path(args.data_root) / "public", args.out or "S.pt", args.seg_steps, args.image_size,
                      args.seed, deform=not args.no_deform)
    print(json.dumps(record))


def load_trained(run_dir: Path):
    """(recipe, model) from a run directory written by the server or by ``train``."""
    from medgen.models.registry import build_recipe
    from medgen.server.checkpoint import load_checkpoint

    config = RunConfig.from_toml(run_dir / "config.toml")
    recipe = build_recipe(config)
    model = recipe.build()
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}/checkpoint.pt does not exist: train first")
    missing = set(recipe.shared_keys(model)) - set(checkpoint.shared_state)
    if missing:
        raise ValueError(f"checkpoint in {run_dir} lacks {sorted(missing)[:3]}...: not a {config.recipe} run")
    model.load_state_dict({**model.state_dict(), **checkpoint.shared_state})
    return recipe, model.eval()


def evaluate(args) -> None:
    from medgen.data.site_data import load_heldout, load_public_bank
    from medgen.evaluation.translation import (acceptance, classical_baselines, evaluate_translation,
                                               train_target_segmenters,
                                               write_translation_outputs)
    from medgen.models.bridge_translate import style_from_images, translate

    torch.set_num_threads(1)
    run_dir, root = Path(args.run_dir), Path(args.data_root)
    recipe, model = load_trained(run_dir)
    size = recipe.config.image_size
    public = load_public_bank(root / "public", size)
    fit = load_heldout(root, "fit", size, cache_dir=run_dir / "cache")
    test = load_heldout(root, "test", size, cache_dir=run_dir / "cache")
    dp_styles = recipe.site_styles(model, public, seed=args.seed)  # DP-released statistics
    gen_styles = recipe.generator_styles(model, public, seed=args.seed)  # measured on G's samples
    central = {s: style_from_images(h.images, h.labels) for s, h in fit.items()}
    names = list(recipe.config.site_names)
    translators = dict(classical_baselines(fit))
    translators["bridge-gan"] = lambda x, s, t: recipe.gan_translate(model, x, names.index(t),
                                                                     torch.Generator().manual_seed(0))
    translators["bridge"] = lambda x, s, t: translate(model.seg, x, dp_styles[s], dp_styles[t])
    translators["bridge-gen-style"] = lambda x, s, t: translate(model.seg, x, gen_styles[s], gen_styles[t])
    translators["bridge-central"] = lambda x, s, t: translate(model.seg, x, central[s], central[t])
    seg_path = run_dir / "target_segmenters.pt"  # trained on heldout/fit: reused if present
    if seg_path.exists():
        from medgen.models.segmenter import SegmenterSettings, build_segmenter

        segmenters = {}
        for site, state in torch.load(seg_path, map_location="cpu", weights_only=True).items():
            segmenters[site] = build_segmenter(SegmenterSettings(channels=(8, 16, 32, 64)))
            segmenters[site].load_state_dict(state)
            segmenters[site].eval()
    else:
        segmenters = train_target_segmenters(fit, seed=args.seed)
        torch.save({k: v.state_dict() for k, v in segmenters.items()}, seg_path)
    results = evaluate_translation(test, translators, segmenters)
    results["acceptance"] = {m: acceptance(results, m)
                             for m in ("bridge", "bridge-gen-style", "bridge-central", "bridge-gan")}
    results["styles"] = {"dp": {s: v.to_dict() for s, v in dp_styles.items()},
                         "dp_source": {s: ("released statistics" if recipe.options.style_release
                                           and recipe.has_released_style(model, k) else "generator samples")
                                       for k, s in enumerate(names)},
                         "generator": {s: v.to_dict() for s, v in gen_styles.items()},
                         "central": {s: v.to_dict() for s, v in central.items()}}
    results["commands"] = {"evaluate": _command(args)}
    privacy = run_dir / "privacy.json"
    if privacy.exists():
        ledger = json.loads(privacy.read_text())
        results["epsilon"] = ledger["epsilon"]
        results["commands"]["dp"] = ledger.get("command", "unrecorded (trained before commands were recorded)")
    write_translation_outputs(run_dir, results, test, translators)
    for pair, row in results["pairs"].items():
        print(pair, "  ".join(f"{m} {v['psnr']:.1f}/{v['ssim']:.2f}/{v.get('dice_fraction', float('nan')):.2f}"
                              for m, v in row.items()), flush=True)


def adapt(args) -> None:
    from medgen.data.site_data import load_heldout, load_public_bank, load_site
    from medgen.evaluation.adaptation import evaluate_adaptation
    from medgen.models.bridge_translate import translate
    from medgen.models.segmenter import SegmenterSettings

    torch.set_num_threads(1)
    run_dir, root = Path(args.run_dir), Path(args.data_root)
    recipe, model = load_trained(run_dir)
    size = recipe.config.image_size
    public = load_public_bank(root / "public", size)
    styles = recipe.site_styles(model, public, seed=args.seed)
    test = load_heldout(root, "test", size, cache_dir=run_dir / "cache")
    train_sets = {}
    for site in recipe.config.site_names:
        data = load_site(root / "sites" / site, size, cache_dir=run_dir / "cache")
        train_sets[site] = (data.images, data.labels)
    results = evaluate_adaptation(
        "A", train_sets, test, lambda x, s, t: translate(model.seg, x, styles[s], styles[t]),
        SegmenterSettings(steps=args.seg_steps, channels=(8, 16, 32, 64)), seed=args.seed,
        contrast_agnostic=model.seg)
    results["command"] = _command(args)
    atomic_write_json(run_dir / "adaptation.json", results)
    print(json.dumps(results, indent=1))


def timing(args) -> None:
    from bench.common import interleaved, write_result
    from medgen.data.site_data import PatientDataset
    from medgen.models.dp_cgan import disc_loss
    from medgen.models.registry import build_recipe
    from medgen.models.blocks import one_hot_labels
    from medgen.privacy.accounting import sample_rate_for
    from medgen.privacy.dp_sgd import PrivateTraining
    from medgen.privacy.ledger import PrivacyPlan
    from medgen.models.round_context import RoundContext

    torch.set_num_threads(1)
    args.rounds, args.local_steps = 1, args.local_steps
    config = _config(args)
    recipe = build_recipe(config)
    public, sites = _sites(config, Path(args.data_root), Path(args.run_dir) / "cache")
    model = recipe.build()
    data = PatientDataset(sites[0], generator_seed=0)
    q = sample_rate_for(len(data), config.batch_size)
    plan = PrivacyPlan(10.0, 1e-5, "prv", q, 100, 1.0, 1.0)
    images, labels = sites[0].images[:config.batch_size], sites[0].labels[:config.batch_size]
    onehot = one_hot_labels(labels, 4)
    site = torch.zeros(images.shape[0], dtype=torch.long)
    plain_disc = copy.deepcopy(model.cgan.disc)
    plain_opt = torch.optim.Adam(plain_disc.parameters(), lr=2e-4)
    private = PrivateTraining(plan, [], seed=0)
    dp_disc, dp_opt, _ = private.make_private(model.cgan.disc, torch.optim.Adam(model.cgan.disc.parameters()),
                                              data, config.batch_size)

    def plain_step():
        plain_opt.zero_grad()
        disc_loss(plain_disc(images, onehot, site), True, "nonsat").mean().backward()
        plain_opt.step()

    def dp_step():
        dp_opt.zero_grad()
        disc_loss(dp_disc(images, onehot, site), True, "nonsat").mean().backward()
        dp_opt.step()

    def seg_step():
        recipe.public_segmenter_update(model, public, 0, {}, 0, torch.device("cpu"))

    steps = interleaved({"disc_nonprivate": plain_step, "disc_dp": dp_step}, repeats=args.repeats)
    private.close()
    s_cost = interleaved({"seg_public_round": seg_step}, repeats=2, warmup=1)
    rounds = []
    for k, s in enumerate(sites):
        start = time.perf_counter()
        plan = PrivacyPlan(10.0, 1e-5, "prv", sample_rate_for(s.num_patients, config.batch_size),
                           100, 1.0, 1.0, releases=recipe.one_off_releases())
        recipe.train_local(model, RoundContext(PatientDataset(s, generator_seed=k), public,
                                               PrivateTraining(plan, [], seed=k), site_index=k,
                                               steps=config.local_steps, seed=k))
        rounds.append(time.perf_counter() - start)
    write_result("translation", {
        "config": config.to_run_config(),
        "private_networks": {"cgan.disc": {**steps, "dp_over_nonprivate":
                                           steps["disc_dp"]["median_s"] / steps["disc_nonprivate"]["median_s"]}},
        "public_networks": {"seg (per round, seg-steps-per-round steps)": s_cost["seg_public_round"]},
        "round_seconds_per_site": rounds,
        "round_seconds_4_sites_sequential": sum(rounds),
        "round_seconds_4_sites_2_parallel": max(sum(rounds[0::2]), sum(rounds[1::2])),
        "note": "1 torch thread per process; machine shared with other jobs (timings are upper bounds)"})


def summarise(args) -> None:
    """Per target, over the runs given (e.g. seeds): the acceptance numbers of every run and
    their mean, min and max -> bench/results/<--name>.json."""
    import statistics

    from bench.common import write_result

    runs = {}
    for run_dir in args.runs:
        translation = json.loads((Path(run_dir) / "translation.json").read_text())
        adaptation = json.loads((Path(run_dir) / "adaptation.json").read_text())
        ledger = json.loads((Path(run_dir) / "privacy.json").read_text())
        per_target = {}
        for method in ("bridge", "bridge-central"):
            accepted = translation["acceptance"][method]
            per_target[method] = {
                target: {key: statistics.fmean(v[key] for pair, v in accepted.items() if pair.endswith("->" + target))
                         for key in ("ssim", "baseline_ssim", "dice_fraction")}
                for target in translation["reference_dice"]}
        runs[str(run_dir)] = {
            "command": ledger.get("command"), "seg_init": ledger.get("seg_init"), "epsilon": ledger["epsilon"],
            "noise_multiplier": ledger["plans"][0]["noise_multiplier"], "releases": ledger["plans"][0]["releases"],
            "ssim_pair_wins": sum(v["beats_baseline_ssim"] for v in translation["acceptance"]["bridge"].values()),
            "per_target": per_target, "adaptation_recovery": adaptation["recovery"],
            "adaptation_dice": adaptation["dice"]}
    def spread(method: str, target: str, key: str) -> dict[str, float]:
        values = [r["per_target"][method][target][key] for r in runs.values()]
        return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}

    first = next(iter(runs.values()))["per_target"]
    over_runs = {method: {target: {key: spread(method, target, key) for key in first[method][target]}
                          for target in first[method]}
                 for method in first}
    write_result(args.name, {"runs": runs, "over_runs": over_runs,
                             "command": _command(args), "note": "per target = mean over the 3 source sites"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.translation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("pretrain-seg", "train", "evaluate", "adapt", "timing", "summarise"))
    parser.add_argument("runs", nargs="*", help="summarise: run directories (evaluated and adapted)")
    parser.add_argument("--name", default="translation_seeds", help="summarise: bench/results/NAME.json")
    parser.add_argument("--data-root", help="the federation's data root (every command but summarise)")
    parser.add_argument("--run-dir", default="runs/bridge-translate")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--sites", default="A,B,C,D")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seg-steps", type=int, default=300,
                        help="adapt: steps per segmenter; pretrain-seg: steps of S")
    parser.add_argument("--out", help="pretrain-seg: where to write S's state dict (default S.pt)")
    parser.add_argument("--no-deform", action="store_true",
                        help="pretrain-seg: draw the public maps undeformed (sim/random_deformation.py)")
    parser.add_argument("--seg-init", help="train: S pretrained on public data (pretrain-seg, or "
                        "`medgen pretrain-segmenter`) to start from; comma-separated paths make "
                        "S their ensemble; sets options.seg-init")
    parser.add_argument("--option", action="append", help="recipe option KEY=VALUE (repeatable)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command != "summarise" and not args.data_root:
        parser.error(f"{args.command} needs --data-root")
    {"pretrain-seg": pretrain_seg, "train": train, "evaluate": evaluate, "adapt": adapt,
     "timing": timing, "summarise": summarise}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
