"""The default simulation with site B as a DICOM folder, against the same run with B as NIfTI.

Issue 7: "a simulation in which one site's data is a DICOM folder trains like the NIfTI
sites". Two federations are built from the same seed (the default: 4 sites x 200 patients,
64 px), one all-NIfTI and one with ``--dicom-sites B`` (B's folder then holds 200 DICOM
series and no NIfTI image), and the same ``medgen-server simulate`` run (seed 0, fewer rounds
than the demo) trains on each. Recorded side by side per round and site: num-examples,
epsilon, the recipe's losses, and the held-out FD per site; then whether B's node trained on
the same tensors (its cache entries) and whether the final weights are the same. Run by hand:

    .venv/bin/python -m bench.dicom_site_simulation        -> bench/results/dicom_site_simulation.json
    (options: --rounds 3 --work runs/bench-dicom-site; a second call reuses the builds)

Per variant it runs exactly these user-facing commands:

    python -m medgen.sim.cli build --out WORK/<variant>/data --seed 0 --workers 2 [--dicom-sites B]
    medgen-server simulate --data-root WORK/<variant>/data --out WORK/<variant>/run --fresh --delete-previous \\
        --set num-rounds=ROUNDS [--dicom-sites B]

The held-out data of both builds are byte-identical, so the evaluation networks trained for
the first run (cached under <data>/cache/evaluator, keyed on the held-out tensors) are
copied to the second data root instead of being trained twice; the key is checked on load.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import write_result
from medgen.server.checkpoint import load_checkpoint
from medgen.server.run_log import read_metrics
from medgen.sim.federation import Manifest

VARIANTS = {"nifti": [], "dicom": ["--dicom-sites", "B"]}


def _run(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def _tree_sha256(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _per_round(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [{"round": r["round"], "excluded": r["excluded"],
              "aggregate_epsilon": r["aggregate"].get("epsilon"),
              "per_site": {site: dict(sorted(m.items())) for site, m in sorted(r["per_site"].items())}}
             for r in records if r["kind"] == "train"]
    evals = [{"round": r["round"], **dict(sorted(r["metrics"].items()))}
             for r in records if r["kind"] == "eval"]
    return train, evals


def _untimed(train: list[dict]) -> list[dict]:
    return [{site: {k: v for k, v in m.items() if k != "seconds"} for site, m in t["per_site"].items()}
            for t in train]


def _site_b_tensors(run_dir: Path) -> dict:
    [entry] = list((run_dir / "state" / "B" / "cache").glob("site-*.pt"))
    return torch.load(entry, map_location="cpu", weights_only=True)["value"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-dicom-site"))
    parser.add_argument("--subjects-per-site", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="further run-config overrides for both runs (smoke tests)")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    load_start = os.getloadavg()
    result: dict = {"rounds": args.rounds, "subjects_per_site": args.subjects_per_site,
                    "image_size": args.image_size, "overrides": args.overrides, "commands": {},
                    "seconds": {}, "site_formats": {}}
    runs: dict[str, dict] = {}
    for variant, extra in VARIANTS.items():
        data, run = work / variant / "data", work / variant / "run"
        sizes = [] if (args.subjects_per_site, args.image_size) == (200, 64) else \
            ["--subjects-per-site", str(args.subjects_per_site), "--image-size", str(args.image_size)]
        build = [sys.executable, "-m", "medgen.sim.cli", "build", "--out", str(data), "--seed", "0",
                 "--workers", "2", *sizes, *extra]
        sets = [f"num-rounds={args.rounds}", *([f"image-size={args.image_size}"] if sizes else []),
                *args.overrides]
        simulate = [sys.executable, "-m", "medgen.server.cli", "simulate", "--data-root", str(data),
                    "--out", str(run), "--fresh", "--delete-previous", *[a for s in sets for a in ("--set", s)], *extra]
        result["commands"][variant] = [" ".join(build), " ".join(simulate)]
        build_s = _run(build)
        manifest = Manifest.load(data)
        result["site_formats"][variant] = manifest.data.get("site_formats")
        if variant != "nifti":  # reuse the evaluation networks of the identical held-out data
            source = work / "nifti" / "data" / "cache" / "evaluator"
            target = data / "cache" / "evaluator"
            target.mkdir(parents=True, exist_ok=True)
            for path in source.glob("evaluator-*.pt"):
                if not (target / path.name).exists():
                    shutil.copy2(path, target / path.name)
        site_b = data / "sites" / "B"
        before = _tree_sha256(site_b)
        simulate_s = _run(simulate)
        train, evals = _per_round(run)
        runs[variant] = {"train": train, "eval": evals, "run_dir": run,
                         "site_b_unchanged": _tree_sha256(site_b) == before,
                         "site_b_files": sorted({p.suffix or "(no suffix)" for p in
                                                 (site_b / "images").rglob("*") if p.is_file()})}
        result["seconds"][variant] = {"build": round(build_s, 1), "simulate": round(simulate_s, 1)}

    nifti, dicom = runs["nifti"], runs["dicom"]
    heldout_same = _tree_sha256(work / "nifti" / "data" / "heldout") == \
        _tree_sha256(work / "dicom" / "data" / "heldout")
    b_nifti, b_dicom = _site_b_tensors(nifti["run_dir"]), _site_b_tensors(dicom["run_dir"])
    w_nifti = load_checkpoint(nifti["run_dir"]).shared_state
    w_dicom = load_checkpoint(dicom["run_dir"]).shared_state
    max_weight_diff = max(float((w_nifti[k].float() - w_dicom[k].float()).abs().max())
                          for k in w_nifti)
    side_by_side = []
    for t_n, t_d in zip(nifti["train"], dicom["train"]):
        fd_n = next((e for e in nifti["eval"] if e["round"] == t_n["round"]), {})
        fd_d = next((e for e in dicom["eval"] if e["round"] == t_d["round"]), {})
        for site in t_n["per_site"]:
            side_by_side.append({
                "round": t_n["round"], "site": site,
                "num_examples": {"nifti": t_n["per_site"][site].get("num-examples"),
                                 "dicom": t_d["per_site"].get(site, {}).get("num-examples")},
                "epsilon": {"nifti": t_n["per_site"][site].get("epsilon"),
                            "dicom": t_d["per_site"].get(site, {}).get("epsilon")},
                "fd": {"nifti": fd_n.get(f"fd/{site}"), "dicom": fd_d.get(f"fd/{site}")}})
    result.update({
        "setup": "default simulation (4 sites, seed 0, dp-cgan, default run config) with fewer "
                 "rounds, plus the options above; B as DICOM vs B as NIfTI",
        "side_by_side": side_by_side,
        "round0_fd": {"nifti": next((e for e in nifti["eval"] if e["round"] == 0), None),
                      "dicom": next((e for e in dicom["eval"] if e["round"] == 0), None)},
        "checks": {
            "b_dicom_folder_holds": dicom["site_b_files"],
            "b_nifti_folder_holds": nifti["site_b_files"],
            "b_dicom_folder_unchanged_by_run": dicom["site_b_unchanged"],
            "heldout_identical": heldout_same,
            "b_trained_tensors_equal": bool(torch.equal(b_nifti["images"], b_dicom["images"])
                                            and torch.equal(b_nifti["labels"], b_dicom["labels"])),
            "b_in_every_round_dicom": all("B" in t["per_site"] for t in dicom["train"]),
            "b_excluded_dicom": [x for t in dicom["train"] for x in t["excluded"]],
            # every per-site metric but the wall-clock `seconds`
            "per_site_metrics_identical": _untimed(nifti["train"]) == _untimed(dicom["train"]),
            "eval_metrics_identical": nifti["eval"] == dicom["eval"],
            "final_weights_max_abs_diff": max_weight_diff,
        },
        "runs": {v: {"train": r["train"], "eval": r["eval"]} for v, r in runs.items()},
        "load_average": {"start": load_start, "end": os.getloadavg()},
    })
    write_result("dicom_site_simulation", result)


if __name__ == "__main__":
    main()
