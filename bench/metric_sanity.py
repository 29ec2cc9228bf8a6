"""The metric sanity table: every set metric x every degradation of REAL images, per site.

    python -m bench.metric_sanity --data-root DIR [--data-root DIR2 ...]

For each federation (a ``medgen sim build`` output, brain or head-ct) and each site:
the real-vs-real floor with its bootstrap interval, then every degradation of
evaluation/degradations.py scored against the same reference half; a metric *sees* a
degradation when the score is outside the floor's interval (evaluation/metric_sanity.py).
Then, separately:

- sample size: the whole suite again at several sample counts, plus a mild blur (sigma
  0.5 px): for each metric, the smallest count at which it saw every degradation at every
  site ("required_samples"), which is how many images per site an evaluation needs;
- memorisation: near-copies of a site's TRAINING images versus real held-out images,
  scored by nearest-neighbour distances (evaluation/memorisation.py).

Results merge into bench/results/metric_sanity.json by federation name, and the headline
status (``headline_status``) is recomputed over every federation in the file. FD/KID on
medgen's trained encoder (FD_medgenenc-v1) are included, trained here on heldout/fit with
the evaluator's settings and seed (--no-trained-encoder skips them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, machine
from medgen.atomic import atomic_write_json
from medgen.data.manifest import load_manifest
from medgen.data.site_data import load_site
from medgen.evaluation.degradations import DEGRADATIONS, blur
from medgen.evaluation.evaluator import EVALUATOR_SEED
from medgen.evaluation.heldout_split import load_split, split_by_subject
from medgen.evaluation.memorisation import memorisation
from medgen.evaluation.metric_sanity import (CANDIDATES, SanitySettings, headline_status,
                                             site_sanity)
from medgen.evaluation.networks import TrainSettings, train_feature_net
from medgen.evaluation.set_metrics import (QUANTITIES, TrainedEncoderFeatures, quantity,
                                           standard_metrics)
from medgen.evaluation.tissue_intensity import TissueUnits

SWEEP = (32, 64, 128, 256)
MILD_BLUR_PX = 0.5
NEAR_COPY_NOISE = 0.02


def federation_facts(root: Path) -> dict[str, Any]:
    manifest = json.loads((root / "manifest.json").read_text())
    return {"name": manifest.get("federation", "brain"), "image_size": int(manifest["image_size"]),
            "content_hash": manifest.get("content_hash"), "data_root": str(root)}


def site_schema(root: Path, site: str) -> tuple[tuple[str, ...], TissueUnits, str]:
    """Class names, intensity units and modality of a held-out site, from its dataset.toml."""
    manifest = load_manifest(root / "heldout" / "test" / site, root=root)
    policy = manifest.intensity
    units = (TissueUnits.from_window(*policy.window, name=policy.units)
             if policy.normalisation == "window" and policy.window else TissueUnits())
    return tuple(manifest.labels.names), units, manifest.modality


def trained_encoder(root: Path, sites: tuple[str, ...], size: int, classes: int, cache: Path):
    fit = load_split(root / "heldout", "fit", size, sites, cache)
    images = torch.cat([fit[s].images for s in sites])
    labels = torch.cat([fit[s].labels for s in sites])
    site_ids = torch.cat([torch.full((len(fit[s].images),), k) for k, s in enumerate(sites)])
    return train_feature_net(images, labels, site_ids, len(sites), TrainSettings(), EVALUATOR_SEED,
                             num_classes=classes)


def sample_size_sweep(site: str, halves, metrics, counts, bootstrap: int) -> dict[str, Any]:
    """Per sample count: which metrics see each degradation (the suite's and a mild blur)."""
    degradations = {**DEGRADATIONS, "blur_0.5px": lambda i, lab, rng: blur(i, lab, rng, sigma=MILD_BLUR_PX)}
    out = {}
    for n in counts:
        if n > min(len(halves[site].cond_images), len(halves[site].ref_images)):
            continue
        result = site_sanity(site, halves, metrics,
                             SanitySettings(samples=n, bootstrap=bootstrap, degraded_bootstrap=1),
                             degradations=degradations)
        out[str(n)] = {name: {k: v["seen"] for k, v in entry["scores"].items() if k in CANDIDATES}
                       for name, entry in result["degradations"].items()}
    return out


def required_samples(federations: dict[str, Any], only: str | None = None) -> dict[str, int | None]:
    """Per metric: the smallest swept count at which it saw every degradation (or only
    the one named) at every site of every federation; None if no swept count did."""
    out: dict[str, int | None] = {}
    for key in CANDIDATES:
        passing = None
        counts = sorted({int(n) for f in federations.values() for s in f["sites"].values()
                         for n in s.get("sample_size", {})})
        for n in counts:
            seen = [entry.get(key) for f in federations.values() for s in f["sites"].values()
                    for name, entry in s.get("sample_size", {}).get(str(n), {}).items()
                    if only is None or name == only]
            if seen and all(v is True for v in seen):
                passing = n
                break
        out[key] = passing
    return out


def memorisation_check(root: Path, site: str, half, size: int, cache: Path) -> dict[str, Any]:
    training = load_site(root / "sites" / site, size, cache_dir=cache).images
    n = min(len(half.cond_images) // 2, len(training))
    generalising = half.cond_images[:n]                    # new patients: not copies
    probe = half.cond_images[n:2 * n]                      # calibrates the copy threshold
    rng = torch.Generator().manual_seed(0)
    copies = (training[:n] + NEAR_COPY_NOISE * torch.randn(training[:n].shape, generator=rng)).clamp(-1, 1)
    return {"near_copies_of_training": memorisation(copies, training, half.ref_images, probe),
            "heldout_real": memorisation(generalising, training, half.ref_images, probe),
            "near_copy_noise": NEAR_COPY_NOISE}


def run_federation(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    facts = federation_facts(root)
    size, cache = facts["image_size"], Path(args.cache_dir or root / "cache")
    sites = tuple(sorted(p.name for p in (root / "heldout" / "test").iterdir() if p.is_dir()))
    test = load_split(root / "heldout", "test", size, sites, cache)
    halves = {s: split_by_subject(s, test[s]) for s in sites}
    schemas = {s: site_schema(root, s) for s in sites}
    encoder = None
    if not args.no_trained_encoder:
        start = time.perf_counter()
        encoder = trained_encoder(root, sites, size, len(schemas[sites[0]][0]), cache)
        facts["trained_encoder_seconds"] = round(time.perf_counter() - start, 1)
    settings = SanitySettings(samples=args.samples, bootstrap=args.bootstrap,
                              degraded_bootstrap=args.degraded_bootstrap)
    facts.update({"samples_per_half": args.samples, "bootstrap": args.bootstrap,
                  "degraded_bootstrap": args.degraded_bootstrap, "level": 0.95, "sites": {}})
    for site in sites:
        start = time.perf_counter()
        classes, units, modality = schemas[site]
        metrics = standard_metrics(classes, units) + ([TrainedEncoderFeatures(encoder)] if encoder else [])
        result = site_sanity(site, halves, metrics, settings)
        result.update({"modality": modality, "tissue_units": units.name, "classes": list(classes)})
        if args.sweep:
            result["sample_size"] = sample_size_sweep(site, halves, standard_metrics(classes, units),
                                                      args.sweep, args.sweep_bootstrap)
        result["memorisation"] = memorisation_check(root, site, halves[site], size, cache)
        result["seconds"] = round(time.perf_counter() - start, 1)
        facts["sites"][site] = result
        print(f"{facts['name']}/{site}: {result['seconds']} s; missed: "
              + ", ".join(f"{k}:{name}" for name, e in result["degradations"].items()
                          for k, v in e["scores"].items() if k in CANDIDATES and not v["seen"]), flush=True)
    return facts


def rounded(obj: Any) -> Any:
    """Floats to 5 significant digits (the bootstrap decides the third; the file stays small)."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metric_sanity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", action="append", required=True, type=Path,
                        help="a built federation (repeatable): brain or head-ct")
    parser.add_argument("--samples", type=int, default=256,
                        help="images per half (default %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=SanitySettings.bootstrap)
    parser.add_argument("--degraded-bootstrap", type=int, default=SanitySettings.degraded_bootstrap)
    parser.add_argument("--sweep", type=lambda t: tuple(int(x) for x in t.split(",") if x), default=SWEEP,
                        help="sample counts for the sample-size sweep, '' to skip (default 32,64,128,256)")
    parser.add_argument("--sweep-bootstrap", type=int, default=100)
    parser.add_argument("--cache-dir", default=None, help="tensor cache (default DATA_ROOT/cache)")
    parser.add_argument("--out", type=Path, default=RESULTS / "metric_sanity.json",
                        help="results file, merged by federation name (default %(default)s)")
    parser.add_argument("--no-trained-encoder", action="store_true",
                        help="skip FD/KID on medgen's trained encoder (saves its training)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    federations = json.loads(args.out.read_text()).get("federations", {}) if args.out.exists() else {}
    for root in args.data_root:
        facts = run_federation(root.resolve(), args)
        federations[facts["name"]] = facts
    status = headline_status(federations)
    atomic_write_json(args.out, {
        "bench": "metric_sanity", "machine": machine(), "unix_time": time.time(),
        "command": "python -m bench.metric_sanity " + " ".join(f"--data-root {r}" for r in args.data_root),
        "headline": [k for k, v in status.items() if v["headline"]],
        "status": status, "required_samples": required_samples(federations),
        "required_samples_mild_blur": required_samples(federations, only="blur_0.5px"),
        "quantities": {k: {"title": quantity(k).title, "unit": quantity(k).unit,
                           "higher_is_worse": quantity(k).higher_is_worse} for k in CANDIDATES},
        "federations": rounded(federations), "all_quantities": sorted(QUANTITIES)})
    for key, entry in status.items():
        print(f"{key:15s} {'HEADLINE' if entry['headline'] else 'diagnostic'}  "
              f"missed {len(entry['missed'])}/{entry['checks']}: {', '.join(entry['missed'][:6])}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
