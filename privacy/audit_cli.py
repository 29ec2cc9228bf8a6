"""`medgen audit RUN_DIR [RUN_DIR ...]`: membership-inference audit of finished runs.

For every site of a run: the global generator (RUN_DIR checkpoint) and the site's own
discriminator (node state dir: it never leaves the node, so in simulation the audit reads
``<state-root>/<site>/local_state.pt``; in deployment a hospital runs the same functions
on its node), the site's training patients as members, the same scanner's held-out
subjects (``<data-root>/heldout/<split>/<site>``, never trained on) as non-members.
Writes ``RUN_DIR/privacy_audit.json`` (atomically) and prints a table; with several run
dirs (e.g. a DP run and a non-DP run of the same data), every json also holds the others'
summary, side by side, with each run's epsilon and accountant.

The private-network attack asks the recipe for its ``MembershipScores`` capability
(models/capabilities.py: a GAN scores with its discriminator, cddpm with its denoising
loss); a recipe that declares none is refused before anything is loaded, with a message
naming the capability. This module is an entry point (the `medgen audit` command): it
composes the run directory's pieces from every layer (see tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from medgen.atomic import atomic_write_json
from medgen.client.local_state import load_local_state
from medgen.data.site_data import load_heldout, load_public_bank, load_site
from medgen.config import ConfigError, RunConfig
from medgen.evaluation.report import write_report
from medgen.models.capabilities import MembershipScores, require
from medgen.models.registry import build_recipe
from medgen.privacy.audit import (AttackResult, attack_result, generated_samples,
                                  nearest_generated_scores, per_patient, private_network_scores,
                                  reconstruction_scores)
from medgen.server.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

AUDIT_FILE = "privacy_audit.json"


@dataclass(frozen=True)
class Records:
    images: torch.Tensor          # [N,1,H,W]
    labels: torch.Tensor          # [N,H,W]
    patient_index: torch.Tensor   # [N] slice -> patient


def audit_site(recipe: MembershipScores, model, site_index: int, members: Records, nonmembers: Records,
               public_maps: torch.Tensor, num_generated: int, seed: int) -> list[AttackResult]:
    """Every attack on one site's networks; scores are averaged per patient."""
    def both(score_fn):
        return (per_patient(score_fn(members), members.patient_index),
                per_patient(score_fn(nonmembers), nonmembers.patient_index))

    results = [attack_result("discriminator-logit", *both(
        lambda r: private_network_scores(recipe, model, r.images, r.labels, site_index)))]
    pick = torch.Generator().manual_seed(seed)
    maps = public_maps[torch.randint(0, public_maps.shape[0], (num_generated,), generator=pick)]
    generated = generated_samples(recipe, model, maps, site_index, seed=seed)
    results.append(attack_result("nearest-generated", *both(
        lambda r: nearest_generated_scores(r.images, generated))))
    results.append(attack_result("conditional-reconstruction", *both(
        lambda r: reconstruction_scores(recipe, model, r.images, r.labels, site_index, seed=seed + 1))))
    return results


def audit_run(run_dir: Path, *, num_generated: int = 256, seed: int = 0,
              splits: Sequence[str] = ("test", "fit")) -> dict:
    """Audit every site of a finished simulated run; writes RUN_DIR/privacy_audit.json."""
    run_dir = Path(run_dir)
    config = _config(run_dir)
    recipe = require(build_recipe(config), MembershipScores, "`medgen audit` (its private-network attack)")
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"{run_dir}: no checkpoint; audit a run that trained at least one round")
    data_root, state_root = Path(config.data_root), Path(config.state_root)
    heldout = [load_heldout(data_root, split, config.image_size) for split in splits]
    public = load_public_bank(data_root / "public", config.image_size).label_maps
    report: dict = {"run_dir": str(run_dir), "recipe": config.recipe, "unit": "patient",
                    "server_round": checkpoint.server_round, "seed": seed,
                    "num_generated": num_generated, "heldout_splits": list(splits),
                    "privacy": _privacy_summary(run_dir, config), "sites": {}}
    for site_index, site in enumerate(config.site_names):
        state_path = state_root / site / "local_state.pt"
        local = load_local_state(state_path, checkpoint.run_key)
        if not local.weights and recipe.local_only_state(recipe.build()):
            log.warning("site %s: no local state for this run at %s: skipped", site, state_path)
            continue
        model = recipe.build()
        try:
            model.load_state_dict({**model.state_dict(), **local.weights, **checkpoint.shared_state})
        except RuntimeError as err:
            raise ConfigError(f"{run_dir}: the stored networks do not fit recipe {config.recipe!r} as "
                              "installed now (did the recipe's defaults change since the run? put "
                              f"its options in config.toml explicitly): {str(err)[:300]}") from None
        data = load_site(data_root / "sites" / site, config.image_size, consumes=recipe.consumes)
        if data.labels is None:
            raise ConfigError(f"{data_root / 'sites' / site}: the audit needs label maps for every image")
        members = Records(data.images, data.labels, data.patient_index)
        nonmembers = _heldout_records([h[site] for h in heldout if site in h])
        results = audit_site(recipe, model, site_index, members, nonmembers, public, num_generated,
                             seed + site_index)
        report["sites"][site] = {r.attack: r.to_dict() for r in results}
    if not report["sites"]:
        raise ConfigError(f"{run_dir}: no site had local state to audit under {state_root}")
    report["summary"] = _summary(report)
    atomic_write_json(run_dir / AUDIT_FILE, report)
    _into_run_report(run_dir, report)
    return report


def _into_run_report(run_dir: Path, report: dict) -> None:
    """The summary joins privacy.json (the report renders it), then the report is rebuilt."""
    path = run_dir / "privacy.json"
    privacy = json.loads(path.read_text()) if path.exists() else {}
    privacy["membership_inference"] = {"file": AUDIT_FILE, "unit": "patient",
                                       "worst_site_per_attack": report["summary"]}
    atomic_write_json(path, privacy)
    try:
        write_report(run_dir)
    except Exception:  # noqa: BLE001 - the audit result stands without the HTML report
        log.warning("could not rebuild the report in %s", run_dir, exc_info=True)


def _config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.toml"
    if not path.exists():
        raise ConfigError(f"{run_dir}: no config.toml; is this a medgen run directory?")
    return RunConfig.from_toml(path)


def _heldout_records(parts) -> Records:
    if not parts:
        raise ConfigError("no held-out subjects for this site: the audit needs non-members "
                          "(<data-root>/heldout/<split>/<site>)")
    images = torch.cat([p.images for p in parts])
    labels = torch.cat([p.labels for p in parts])
    return Records(images, labels, torch.arange(images.shape[0]))


def _privacy_summary(run_dir: Path, config: RunConfig) -> dict:
    summary = {"target_epsilon": config.target_epsilon, "delta": config.delta,
               "accountant": config.accountant}
    path = run_dir / "privacy.json"
    if path.exists():
        privacy = json.loads(path.read_text())
        summary["max_epsilon_spent"] = privacy.get("max_epsilon")
    return summary


def _summary(report: dict) -> dict:
    """Per attack, the worst site (highest AUC) and its TPR at 1 % FPR."""
    out = {}
    for site, attacks in report["sites"].items():
        for name, result in attacks.items():
            if name not in out or result["auc"] > out[name]["auc"]:
                out[name] = {"site": site, "auc": result["auc"],
                             "tpr_at_1pct_fpr": result["tpr_at_1pct_fpr"],
                             "auc_null_sd": result["auc_null_sd"]}
    return out


def side_by_side(reports: Sequence[dict]) -> str:
    lines = [f"{'run':<28} {'epsilon':>10}  {'attack':<27} {'site':>4} {'AUC':>6} {'TPR@1%FPR':>10}"]
    for report in reports:
        eps = report["privacy"].get("max_epsilon_spent")
        eps_text = f"{eps:.3g}" if isinstance(eps, (int, float)) else "?"
        for name, worst in report["summary"].items():
            lines.append(f"{Path(report['run_dir']).name[:28]:<28} {eps_text:>10}  {name:<27} "
                         f"{worst['site']:>4} {worst['auc']:6.3f} {worst['tpr_at_1pct_fpr']:10.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medgen audit", description=(
            "Membership-inference audit of finished runs: for every site, attack its "
            "discriminator (logit of real records) and the generator (nearest generated "
            "sample, reconstruction from the record's own label map) with the site's training "
            "patients as members and held-out subjects as non-members; report AUC and TPR at "
            "1%% FPR per patient. Writes RUN_DIR/privacy_audit.json. Give a DP and a non-DP "
            "run to see them side by side."))
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--generated", type=int, default=256,
                        help="generated samples per site for the nearest-neighbour attack")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--splits", default="test,fit",
                        help="held-out splits used as non-members (comma-separated)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    reports = []
    try:
        for run_dir in args.run_dirs:
            reports.append(audit_run(run_dir, num_generated=args.generated, seed=args.seed,
                                     splits=tuple(s for s in args.splits.split(",") if s)))
    except (ConfigError, OSError, ValueError) as err:
        print(f"medgen audit: {err}", file=sys.stderr)
        return 2
    if len(reports) > 1:
        for report in reports:
            others = [{"run_dir": r["run_dir"], "privacy": r["privacy"], "summary": r["summary"]}
                      for r in reports if r is not report]
            atomic_write_json(Path(report["run_dir"]) / AUDIT_FILE, {**report, "compared_with": others})
    print(side_by_side(reports))
    for report in reports:
        print(f"wrote {Path(report['run_dir']) / AUDIT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
