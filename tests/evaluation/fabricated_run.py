"""A run directory in the exact format the server writes, made without a federation.

The numbers are real: held-out-like images come from synthetic_heldout's two scanners,
the "generator" of round r is the real conditioning half blurred less each round, and
every evaluation metric is computed by the production ``MetricPanel`` (so keys, floors
and histograms have the production format). Privacy, DONE and config files follow
server/run_log.py and server/app.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from synthetic_heldout import SIZE, random_anatomy, render

from medgen.config import RunConfig
from medgen.evaluation.degradations import blur
from medgen.evaluation.heldout_split import SplitSite
from medgen.evaluation.metric_panel import MetricPanel
from medgen.evaluation.sample_grid import GrayDisplay, render_grid
from medgen.evaluation.tissue_intensity import TissueUnits

SITES = ("A", "B")
BLUR_BY_ROUND = {0: 2.0, 1: 1.0, 2: 0.5, 3: 0.0}
EVIL = '<script>alert("x")</script>'


def synthetic_split(n: int, seed: int = 0) -> dict[str, SplitSite]:
    rng = np.random.default_rng(seed)
    maps = [random_anatomy(rng) for _ in range(2 * n)]
    out = {}
    for site in SITES:
        images = torch.tensor(np.stack([np.clip(render(m, site, rng), 0, 1) for m in maps]),
                              dtype=torch.float32)[:, None] * 2 - 1
        labels = torch.tensor(np.stack(maps), dtype=torch.long)
        out[site] = SplitSite(images[0::2], labels[0::2], images[1::2], labels[1::2])
    return out


def make_run(root: Path, n: int = 16, evil: bool = True,
             units: dict[str, TissueUnits] | None = None,
             displays: dict[str, GrayDisplay] | None = None) -> Path:
    """``units``/``displays`` per site: the default is the brain's (normalised MR)."""
    units = units or {s: TissueUnits() for s in SITES}
    displays = displays or {s: GrayDisplay(units[s]) for s in SITES}
    run = root / "run"
    (run / "samples").mkdir(parents=True)
    config = RunConfig(sites=",".join(SITES), accountant="rdp", delta=1e-5, image_size=SIZE,
                       num_rounds=3, eval_samples=n, recipe="cddpm")
    (run / "config.toml").write_text(config.to_toml())
    split = synthetic_split(n)
    panel = MetricPanel.prepare(split, {s: n for s in SITES}, config.class_names,
                                units)
    lines = []
    for r, sigma in BLUR_BY_ROUND.items():
        if r > 0:
            per_site = {s: {"epsilon": 0.9 * r + 0.1 * k, "delta": 1e-5, "loss_d": 1.0 / r, "loss_g": 2.0 + k,
                            "num-examples": 800.0, "seconds": 3.0 + r, "site-index": float(k)}
                        for k, s in enumerate(SITES)}
            lines.append({"round": r, "kind": "train", "aggregate": {"num-examples": 1600.0, "seconds": 4.0},
                          "per_site": per_site,
                          "excluded": [{"site": "B", "reason": EVIL if evil else "norm"}] if r == 2 else []})
        metrics: dict[str, float] = {}
        rows = []
        for k, site in enumerate(SITES):
            half = split[site]
            rng = np.random.default_rng(r)
            generated = blur(half.cond_images, half.cond_labels, rng, sigma=sigma)[0] if sigma else half.cond_images
            metrics.update(panel.score(site, generated, half.cond_labels, seed=100 + r))
            metrics.update({f"fd/{site}": 10.0 / (r + 1), f"fd_floor/{site}": 0.5, f"kid/{site}": 0.1 / (r + 1),
                            f"site_acc/{site}": 0.3 * r, f"n_gen/{site}": float(n), f"seed/{site}": 123456.0 + r})
            rows.append((site, half.cond_images[0, 0], generated[:6, 0]))
        lines.append({"round": r, "kind": "eval", "metrics": metrics})
        grid = run / "samples" / f"round_{r:03d}.png"
        render_grid(split[SITES[0]].cond_labels[:6], rows, grid, displays)
        grid.with_suffix(".tissue.json").write_text(json.dumps(panel.last_histograms))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    plan = {"accountant": "rdp", "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 0.96,
            "sample_rate": 0.05, "target_epsilon": 8.0, "total_steps": 300, "unit": "patient"}
    (run / "privacy.json").write_text(json.dumps({
        "accountant": "rdp", "delta": 1e-5, "target_epsilon": 8.0, "unit": "patient",
        "reported_by_sites": {s: {"epsilon": 2.7 + 0.1 * k, "delta": 1e-5, "rounds": 3, "excluded_rounds": k,
                                  "last_round": 3, "spent_while_excluded": bool(k)} for k, s in enumerate(SITES)},
        "node_ledgers": {s: {"accountant": "rdp", "delta": 1e-5, "epsilon": 2.7 + 0.1 * k, "plan": plan,
                             "rounds_trained": 3, "site": s, "steps": 300, "unit": "patient"}
                         for k, s in enumerate(SITES)}}))
    (run / "evaluator.json").write_text(json.dumps({
        "extractor_name": "FD_medgenenc-v1", "extractor_sha256": "ab" * 32, "classifier_sha256": "cd" * 32,
        "classifier_real_acc": {"A": 1.0, "B": 0.97}, "panel": panel.info(),
        "display": {s: d.to_dict() for s, d in displays.items()}}))
    (run / "DONE").write_text(json.dumps({"status": "ok", "final_round": 3, "num_rounds": 3}))
    return run
