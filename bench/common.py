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

RESULTS = Path(__file__).resolve().parent / "results"


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
