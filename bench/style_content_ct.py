"""style-content-ct on the head-CT federation: does a transfer take the style CT's texture
and keep the content CT's anatomy?

    python -m bench.style_content_ct [--rounds 6] [--local-steps 12] [--subjects 48]
                                     [--image-size 32] [--data-root DIR]

Training goes through the product's rounds (server/inprocess.py: each site's real
``train_round``, DP-SGD on D, ledger, the one aggregation pipeline) on the head-CT
federation's sites A (standard kernel, routine dose) and B (sharp kernel, 3x the noise):
the two differ in texture, which is what a style must carry.

Then, on held-out test CTs of both sites (never trained on), for every ordered pair
(content site c, style site s): ``transfer(model, content CTs of c, style CTs of s)``,
each content image paired with a different style image. Measured with the texture metrics
of evaluation/: the power-spectrum distance (``psd``, RMS dB of the mean radial log
spectra, evaluation/power_spectrum.py) and the multi-scale Laplacian SWD
(evaluation/laplacian_swd.py) of the outputs against the real test CTs of s and of c;
and the content kept: the L1 of edge maps (the recipe's own content measure) between an
output and its content CT, against the same for an unrelated CT of the content site (the
chance level). Each site's test CTs are split in thirds: content, style, reference (the
metrics' real set), so no image is compared with itself. Baseline rows: the untouched
content CTs (identity) against each site's reference third (for their own site: the
real-vs-real floor). Rows "site code s": G on random-contrast renderings of public label
maps with site s's learnt style code (the style D taught, without the style encoder).

The non-private ceiling (``rows_non_private_ceiling``, unless ``--no-ceiling``): the same
training at epsilon 1e8 (bench/common.py ``noise_free``: DP-SGD noise ~0, per-patient
clipping kept), measured on the same parts: is it DP or the design?
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import NOISE_FREE_ARM, noise_free, privacy_record, write_result
from medgen.client.simulated_site import simulated_sites
from medgen.config import RunConfig
from medgen.data.manifest import load_manifest
from medgen.data.public_bank_loader import load_public_bank
from medgen.data.site_data import load_site
from medgen.evaluation.laplacian_swd import describe_patches, swd_statistic
from medgen.evaluation.power_spectrum import radial_log_spectra, spectrum_statistic
from medgen.models.registry import build_recipe
from medgen.models.style_content_ct import content_loss
from medgen.privacy.site_update import specs_of
from medgen.server.aggregation import AggregationPipeline
from medgen.server.inprocess import InProcessRunner
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import build_head_federation

SITES = "A,B"


def texture(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    ia, ib = np.arange(images.shape[0]), np.arange(reference.shape[0])
    psd = spectrum_statistic(radial_log_spectra(images), radial_log_spectra(reference))(ia, ib)["psd"]
    swd = swd_statistic(describe_patches(images.float()), describe_patches(reference.float()))(ia, ib)["swd"]
    return {"psd": psd, "swd": swd}


def train(config: RunConfig) -> tuple:
    recipe = build_recipe(config)
    model = recipe.build()
    initial = {k: v.detach().cpu().numpy() for k, v in recipe.shared_state(model).items()}
    pipeline = AggregationPipeline.for_run(config, specs_of(initial), recipe.site_indexed_keys, None, resume=False)
    runner = InProcessRunner(config, pipeline, simulated_sites(config), run_key="style-content-bench")
    start = time.perf_counter()
    shared = runner.run(initial, config.num_rounds, on_round_end=lambda r, _: print(
        f"  round {r}/{config.num_rounds}: max eps {runner.results[-1].metrics.get('epsilon', 0):.2f}", flush=True))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in shared.items()}, strict=False)
    info = {"seconds": time.perf_counter() - start,
            "max_epsilon": max(r.metrics.get("epsilon", 0.0) for r in runner.results),
            "privacy": privacy_record(config.state_root)}
    return recipe, model, info


def measure(recipe, model, parts: dict, maps: torch.Tensor) -> dict:
    """Every row of the module docstring for one trained model, on the same held-out parts."""
    rows = {}
    for c, (content, _, _) in parts.items():
        rows[f"identity {c}"] = {f"vs_real_{t}": texture(content, parts[t][2]) for t in parts}
        for s, (_, style, _) in parts.items():
            out = recipe.transfer(model, content, style)
            rows[f"content {c} x style {s}"] = {
                **{f"vs_real_{t}": texture(out, parts[t][2]) for t in parts},
                "content_edge_l1": float(content_loss(out, content).mean()),
                "chance_edge_l1": float(content_loss(out, torch.roll(content, 1, dims=0)).mean())}
    for index, site in enumerate(parts):  # G(public rendering, site code): the adversarially taught style
        out = recipe.sample(model, maps, index, torch.Generator().manual_seed(index))
        rows[f"site code {site} on public content"] = {f"vs_real_{t}": texture(out, parts[t][2]) for t in parts}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--subjects", type=int, default=48)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the non-private ceiling run")
    parser.add_argument("--name", default="style_content_ct")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="medgen-style-bench-"))
    try:
        root = args.data_root or work / "federation"
        if args.data_root is None:
            build_head_federation(HeadSimConfig(seed=0, sites=SITES, subjects_per_site=args.subjects, public_size=64,
                                                heldout_fit=0, heldout_test=args.heldout,
                                                image_size=args.image_size), root)
        root = root.resolve()
        config = RunConfig.from_run_config({
            "recipe": "style-content-ct", "sites": SITES, "data-root": str(root), "image-size": args.image_size,
            "num-rounds": args.rounds, "local-steps": args.local_steps, "batch-size": 8,
            "target-epsilon": args.epsilon, "accountant": "rdp", "eval-every": 0,
            "state-root": str(work / "state"), "run-dir": str(work / "run"),
            "label-names": ",".join(load_manifest(root=root).labels.names)})  # the head schema (7 classes)
        recipe, model, info = train(config)
        tests = {s: load_site(root / "heldout" / "test" / s, args.image_size, need_labels=False, root=root).images.float()
                 for s in SITES.split(",")}
        k = min(t.shape[0] for t in tests.values()) // 3  # thirds: content, style, reference
        parts = {s: (t[:k], t[k:2 * k], t[2 * k:3 * k]) for s, t in tests.items()}
        maps = load_public_bank(root / "public", args.image_size).label_maps[:k]  # public anatomy only
        rows = measure(recipe, model, parts, maps)
        ceiling = {}
        if not args.no_ceiling:
            print(f"{NOISE_FREE_ARM}: training", flush=True)
            c_recipe, c_model, c_info = train(noise_free(config.replace(
                state_root=str(work / "ceiling" / "state"), run_dir=str(work / "ceiling" / "run"))))
            ceiling = {f"training_{NOISE_FREE_ARM}": c_info,
                       f"rows_{NOISE_FREE_ARM}": measure(c_recipe, c_model, parts, maps)}
        payload = {"config": {k: v for k, v in config.to_run_config().items() if k not in ("data-root", "state-root", "run-dir")},
                   "federation": {"kind": "head-ct", "sites": SITES, "subjects_per_site": args.subjects,
                                  "images_per_part": k},
                   "training": info, "rows": rows, **ceiling}
        write_result(args.name, payload)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
