"""Shared bench helpers: interleaved timing, medians, and JSON results with machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import medgen
from medgen.atomic import atomic_write_json
from medgen.config import RunConfig
from medgen.privacy.ledger import PrivacyLedger

RESULTS = Path(__file__).resolve().parent / "results"
#: the non-private ceiling of a recipe: the SAME run (recipe, rounds, steps, batch, clip
#: bound, DP-SGD code path) at this epsilon with the RDP accountant: noise multiplier ~5e-4
#: against ~1 at epsilon 10, i.e. no noise to speak of; per-patient clipping is kept (the
#: product has no switch that turns DP-SGD off, by design). As bench/da_gan.py --noise-free.
NOISE_FREE_EPSILON = 1e8
NOISE_FREE_ARM = "non_private_ceiling"


def noise_free(config: RunConfig) -> RunConfig:
    """``config`` as its non-private ceiling arm (NOISE_FREE_EPSILON, RDP; all else equal)."""
    return config.replace(target_epsilon=NOISE_FREE_EPSILON, accountant="rdp")


def privacy_record(state_root: str | Path) -> dict[str, dict]:
    """What each site's ledger under ``state_root`` planned and spent: the arm's own proof of
    its noise (the ceiling arm's noise multiplier is ~0, a private arm's is ~1)."""
    out = {}
    for path in sorted(Path(state_root).rglob("privacy_ledger.json")):
        ledger = PrivacyLedger.open(path, site=path.parent.name)
        plan = ledger.plan
        out[ledger.site] = {"noise_multiplier": plan.noise_multiplier, "max_grad_norm": plan.max_grad_norm,
                            "target_epsilon": plan.target_epsilon, "accountant": plan.accountant,
                            "epsilon_spent": ledger.spent_epsilon(), "unit": plan.unit}
    return out


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "medgen": medgen.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Time several functions interleaved (A B A B ...), so drift hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "n": len(s)}
            for name, s in samples.items()}


def write_result(name: str, payload: dict) -> Path:
    payload = {"bench": name, "machine": machine(), "unix_time": time.time(), **payload}
    path = atomic_write_json(RESULTS / f"{name}.json", payload)
    print(json.dumps(payload, indent=2))
    return path
