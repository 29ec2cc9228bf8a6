"""One prepared script that proves the CUDA path of every recipe and records its speed.

Issue 19, item 5. For every recipe of models/registry.py, on one device:

1. DP steps: the recipe's own ``train_local`` (RoundContext + the product's
   ``PrivateTraining``: Opacus per-patient clipping, noise and accounting) on the device,
   ``--steps`` private steps; images/s = patients the steps sampled (expected batch x
   steps) / seconds, after one warm-up round;
2. sampling: ``recipe.sample`` on the device, images/s;
3. evaluation: the product's evaluation feature network (evaluation/networks.py
   ``FeatureNet``) on the samples and on real images, then ``frechet_distance``, images/s.

It records the device name, every stage's seconds and images/s, whether everything came
back finite and on the asked device, and the peak memory: GPU ``max_memory_allocated``
per recipe on CUDA, the process' peak RSS on the CPU. A GPU machine runs it with

    python -m bench.gpu_check                       -> bench/results/gpu_check.json (128 px, 64^3)

and ``--device cpu`` is the dry run that tests it (
tests/benches/test_gpu_check.py runs ``--device cpu --size 16 --volume-size 16``), writing
bench/results/gpu_check_cpu.json unless ``--out`` says otherwise. It exits 1 if any
recipe failed; a failure is recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.common import write_result
from bench.resolution import case_setup, plan_for, train_round
from medgen.evaluation.feature_metrics import frechet_distance
from medgen.evaluation.networks import FeatureNet
from medgen.models.registry import RECIPES
from medgen.privacy.dp_sgd import PrivateTraining


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def check_recipe(name: str, device: torch.device, size: int, volume_size: int, batch: int, steps: int,
                 samples: int) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    recipe, model, data, public, size = case_setup(name, size, batch, str(device), volume_size=volume_size)
    plan = plan_for(recipe, len(data), batch)
    train_round(recipe, model, data, public, 1, PrivateTraining(plan, [], seed=1), str(device))  # warm-up
    private = PrivateTraining(plan, [], seed=2)
    metrics, train_s = _timed(device, lambda: train_round(recipe, model, data, public, steps, private, str(device)))
    on_device = all(p.device.type == device.type for p in model.parameters())
    labels = torch.randint(0, 4, (samples, size, size), generator=torch.Generator().manual_seed(3))
    generator = torch.Generator(device=device).manual_seed(4)
    fake, sample_s = _timed(device, lambda: recipe.sample(model, labels.to(device), torch.arange(samples) % 2,
                                                          generator))
    real = data.tensors[0][:, :, size // 2] if data.tensors[0].dim() == 5 else data.tensors[0]
    extractor = FeatureNet(num_sites=2).to(device)

    def evaluate() -> float:
        return frechet_distance(extractor.features(fake.to(device).float()).cpu(),
                                extractor.features(real.to(device).float()).cpu())

    fd, eval_s = _timed(device, evaluate)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"recipe": name, "size": size, "volumes": data.tensors[0].dim() == 5, "batch": batch,
            "private_steps": private.steps_taken, "epsilon_spent": private.epsilon(1e-5),
            "train_s": round(train_s, 3), "train_images_per_s": round(batch * steps / train_s, 2),
            "sample_s": round(sample_s, 3), "sample_images_per_s": round(samples / sample_s, 2),
            "eval_s": round(eval_s, 3), "eval_images_per_s": round((samples + len(real)) / eval_s, 2),
            "sample_on_device": fake.device.type == device.type, "parameters_on_device": on_device,
            "finite": bool(torch.isfinite(fake).all()) and all(v == v for v in metrics.values())
            and fd == fd, "fd_random_net": fd,
            "peak_memory_gib": round(peak / 2 ** 30, 3),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check), cpu (the dry run) or auto "
                        "(cuda if one is visible, else the dry run)")
    parser.add_argument("--recipes", nargs="+", default=sorted(RECIPES))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--volume-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--out", default=None, help="result name under bench/results (default "
                        "gpu_check, or gpu_check_cpu for --device cpu)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on "
              "a GPU machine, or pass --device cpu for the dry run", file=sys.stderr)
        return 2
    rows = []
    for name in args.recipes:
        try:
            row = check_recipe(name, device, args.size, args.volume_size, args.batch, args.steps, args.samples)
        except Exception as err:  # noqa: BLE001 - recorded, the other recipes still run
            row = {"recipe": name, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()[-1500:]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    name = args.out or ("gpu_check" if device.type == "cuda" else "gpu_check_cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_result(name, {"command": "python -m bench.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
                        "device": device_name, "rows": rows})
    ok = all("error" not in r and r["finite"] and r["sample_on_device"] and r["parameters_on_device"]
             for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
