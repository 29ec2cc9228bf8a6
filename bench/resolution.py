"""Every recipe at 128 and 256 px (volume-gan at 64^3): DP step time, non-private step time
and peak memory, on the CPU, through the recipe's own ``train_local``.

Issue 19, item 5. One case = (recipe, size, mode) in its own process, so that its peak
resident memory (``ru_maxrss``) is its own:

- ``dp``: ``recipe.train_local(model, RoundContext(...))`` with the product's
  ``PrivateTraining`` (Opacus: Poisson sampling, per-patient clipping, noise, accounting),
  exactly as the node's round calls it (client/app.py, privacy/round.py);
- ``plain``: the SAME ``train_local`` with ``NonPrivateTraining``, a bench-only stand-in
  for ``PrivateTraining`` (fixed-size shuffled batches, no per-sample gradients, no
  clipping, noise or accounting; plain optimizer steps). Recipes that compute per-sample
  gradients themselves (``grad_sample_mode`` "no_op": cddpm/restore-diffusion "vmap",
  blind-denoise) still do so: their plain time keeps that cost (``plain_has_per_sample``).

Data: random images in [-1, 1] and random label maps of the run's 4 classes (content does
not change step time), 2 x batch patients (sample rate 1/2), sites A,B, the recipe's
default options (volume-gan: depth = size) except ``BENCH_OPTIONS`` (recorded in the row as
``options``): the PUBLIC pre-work of a first round (a segmenter pretrained on public
renderings, a one-off style release) and the public per-round extras (segmenter updates,
public denoiser steps, a public metric) are switched off, so the row is the private step
a round repeats, not one-off or public work. A recipe that trains on paired records
(da-gan: ``paired_modality``) gets PatientDataset's paired item, (CT, label map, MR). Time: process CPU seconds of one
``train_local`` of ``--steps`` private steps, divided by the steps (it includes the round's
setup: Opacus wrapping; with 1 thread, so other load on the machine does not inflate it).
Memory: the case's peak RSS, and its growth over the RSS after building the model.

``--shared-process`` runs every case in one process (on a loaded machine the ~10 CPU-s of
imports per case process dominate): an untimed dp-cgan case at 32 px first takes the
process's one-time costs (first kernels, Opacus set-up), and each case's peak is VmHWM
reset before it (after freeing the last case). Rows say which (``process``: own / shared);
own-process rows include those one-time costs (about 1-1.5 CPU-s at 128 px).

    .venv/bin/python -m bench.resolution                       -> bench/results/resolution.json
    .venv/bin/python -m bench.resolution --markdown            (docs/performance.md's table)
    .venv/bin/python -m bench.resolution --recipes dp-cgan --sizes 128   (one recipe)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from bench.common import RESULTS, write_result
from medgen.config import RunConfig
from medgen.models.recipe import PublicData, RoundContext
from medgen.models.registry import RECIPES, build_recipe
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.dp_sgd import PrivateTraining
from medgen.privacy.plan import PrivacyPlan

VOLUME_SIZE = 64  # volume recipes: 64^3

# Public work that is not the private step, switched off (each option's own "off" value):
# round 1's segmenter pretraining on public renderings (300-600 steps at batch 16: 135 s
# of spcycle-gan's first round at 128 px) and one-off style release, and the per-round
# public segmenter updates / denoiser steps / public metric.
BENCH_OPTIONS: dict[str, dict[str, object]] = {
    "bridge-translate": {"seg-pretrain-steps": 0, "seg-steps-per-round": 0, "style-release": False},
    "spcycle-gan": {"seg-pretrain-steps": 0, "public-eval-samples": 0},
    "red-gan": {"seg-pretrain-steps": 0},
    "blind-denoise": {"denoiser-steps": 0},
}


class _PlainOptimizer:
    """What DPModule reads of a DPOptimizer: ``params``, ``zero_grad``, ``original_optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.original_optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.params:
            p.grad_sample = None


class NonPrivateTraining(PrivateTraining):
    """Bench-only: PrivateTraining's interface with ordinary training underneath."""

    def make_private(self, module: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
                     batch_size: int, *, grad_sample_mode: str = "hooks") -> tuple[nn.Module, Any, DataLoader]:
        module.train()
        for name in ("disable_hooks", "enable_hooks"):  # DPModule.frozen/public_pass call them
            setattr(module, name, lambda: None)
        self._batch = batch_size
        self.saw_per_sample = False  # the recipe wrote p.grad_sample itself ("no_op" mode)
        self._optimizer = _PlainOptimizer(optimizer)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.seed or 0))
        return module, self._optimizer, loader

    def step(self, optimizer: Any, public_grads=None) -> None:
        for i, p in enumerate(optimizer.params):
            if p.grad is None and getattr(p, "grad_sample", None) is not None:  # "no_op" recipes
                p.grad = p.grad_sample.sum(0) / self._batch
                self.saw_per_sample = True
            if public_grads is not None and public_grads[i] is not None:
                p.grad = public_grads[i].detach().clone() if p.grad is None else p.grad + public_grads[i]
        optimizer.original_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._steps_taken += 1

    def gaussian_release(self, vectors: torch.Tensor, clip_norm: float, noise_multiplier: float) -> torch.Tensor:
        return vectors.sum(0)  # what a non-private recipe would use: the plain sum

    def stored_release(self, noise_multiplier: float, dim: int) -> torch.Tensor | None:
        return None

    def close(self) -> None:
        pass


def consumes_volumes(name: str) -> bool:
    return build_recipe(RunConfig(recipe=name, image_size=32, sites="A,B")).consumes == "volumes"


def case_setup(name: str, size: int, batch: int, device: str = "cpu", options: dict | None = None,
               volume_size: int = VOLUME_SIZE):
    """(recipe, model, dataset, public, size) for one recipe at one size, on ``device``;
    a volume recipe gets volumes of ``volume_size``^3 instead."""
    volumes = consumes_volumes(name)
    size = volume_size if volumes else size
    extra = {"depth": size} if volumes else {}
    config = RunConfig(recipe=name, image_size=size, batch_size=batch, sites="A,B", seed=0,
                       options={**extra, **(options or {})})
    recipe = build_recipe(config)
    model = recipe.build().to(device)
    n, gen = 2 * batch, torch.Generator().manual_seed(0)
    shape = (n, 1, size, size, size) if volumes else (n, 1, size, size)
    images = torch.rand(shape, generator=gen) * 2 - 1
    labels = torch.randint(0, 4, (n, *shape[2:]), generator=gen)
    public = None if volumes else PublicData(torch.randint(0, 4, (8, size, size), generator=gen))
    paired = (torch.rand(shape, generator=gen) * 2 - 1,) if getattr(recipe, "paired_modality", None) else ()
    return recipe, model, TensorDataset(images, labels, *paired), public, size


def train_round(recipe, model, data, public, steps: int, private: PrivateTraining, device: str) -> dict:
    """One site round as the node runs it: ``train_local`` with a RoundContext."""
    return recipe.train_local(model, RoundContext(data, public, private, 0, steps, {}, device, 0))


def plan_for(recipe, n: int, batch: int) -> PrivacyPlan:
    return PrivacyPlan(target_epsilon=10.0, delta=1e-5, accountant="rdp", sample_rate=sample_rate_for(n, batch),
                       total_steps=1000, noise_multiplier=1.0, max_grad_norm=1.0,
                       releases=recipe.one_off_releases())


def _peak_rss() -> int:
    """This process's peak resident memory (bytes): VmHWM, which ``_reset_peak_rss`` resets."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    """Free what the last case left (gc, glibc malloc_trim) and restart VmHWM from the
    current RSS (Linux: ``5`` to /proc/self/clear_refs)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_case(name: str, size: int, mode: str, steps: int, batch: int, shared: bool = False) -> dict:
    """One case; ``shared``: other cases ran in this process before (peak = VmHWM since the
    reset, not the process's lifetime maximum)."""
    torch.set_num_threads(1)
    options = BENCH_OPTIONS.get(name, {})
    recipe, model, data, public, size = case_setup(name, size, batch, options=options)
    built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if shared:
        built_rss = _peak_rss()
    kind = PrivateTraining if mode == "dp" else NonPrivateTraining
    private = kind(plan_for(recipe, len(data), batch), [], seed=0)
    start = time.process_time()
    metrics = train_round(recipe, model, data, public, steps, private, "cpu")
    seconds = time.process_time() - start
    peak = _peak_rss() if shared else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"recipe": name, "size": size, "mode": mode, "steps": steps, "batch": batch,
            "cpu_s_per_step": round(seconds / steps, 3), "peak_rss_gib": round(peak / 2 ** 30, 3),
            "step_rss_growth_gib": round((peak - built_rss) / 2 ** 30, 3),
            "private_steps_taken": private.steps_taken,
            "plain_has_per_sample": bool(getattr(private, "saw_per_sample", False)),
            "finite_metrics": all(v == v for v in metrics.values()), "options": options,
            "paired_records": len(data[0]) == 3, "process": "shared" if shared else "own"}


def markdown_table(rows: list[dict]) -> str:
    """docs/performance.md's table from the result rows (one line per recipe and size)."""
    by = {(r["recipe"], r["size"], r["mode"]): r for r in rows}
    lines = ["| recipe | size | DP s/step | plain s/step | DP peak RSS GiB (round growth) | plain peak RSS GiB | notes |",
             "|---|---|---|---|---|---|---|"]
    for name, size in sorted({(r["recipe"], r["size"]) for r in rows}):
        dp, plain = by.get((name, size, "dp"), {}), by.get((name, size, "plain"), {})

        def cell(row, key, fmt="{:.2f}"):
            return fmt.format(row[key]) if key in row else ("error" if "error" in row else "-")
        notes = []
        if plain.get("plain_has_per_sample"):
            notes.append("plain keeps per-sample grads")
        if dp.get("options"):
            notes.append("off: " + ", ".join(f"{k}={v}" for k, v in dp["options"].items()))
        if dp.get("paired_records"):
            notes.append("paired (CT, label, MR) items")
        if dp.get("process") == "shared":
            notes.append("shared process")
        if dp.get("includes_one_time_costs") or plain.get("includes_one_time_costs"):
            notes.append("first case of its process: incl. one-time costs")
        unit = f"{size}^3" if dp.get("size", plain.get("size")) == VOLUME_SIZE and name.startswith("volume") else f"{size} px"
        lines.append(f"| {name} | {unit} | {cell(dp, 'cpu_s_per_step')} | {cell(plain, 'cpu_s_per_step')} | "
                     f"{cell(dp, 'peak_rss_gib')} ({cell(dp, 'step_rss_growth_gib')}) | "
                     f"{cell(plain, 'peak_rss_gib')} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=sorted(RECIPES))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--modes", nargs="+", default=["dp", "plain"], choices=("dp", "plain"))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case")
    parser.add_argument("--keep", action="store_true", help="keep the rows of bench/results/resolution.json "
                        "that this call does not measure (several calls build one table)")
    parser.add_argument("--shared-process", action="store_true",
                        help="run every case in this process instead of one process each (skips the "
                        "~10 CPU-s of imports per case on a loaded machine); peak memory is then "
                        "VmHWM reset before each case after freeing the last one")
    parser.add_argument("--markdown", action="store_true", help="print the table of "
                        "bench/results/resolution.json for docs/performance.md and exit")
    parser.add_argument("--case", nargs=3, metavar=("RECIPE", "SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads((RESULTS / "resolution.json").read_text())["rows"]))
        return 0
    if args.case:  # the child: one case, one JSON line
        name, size, mode = args.case
        print(json.dumps(run_case(name, int(size), mode, args.steps, args.batch)), flush=True)
        return 0
    rows = []
    if args.shared_process:  # untimed: the process's one-time costs (first kernels, Opacus) go here
        run_case("dp-cgan", 32, "dp", 1, 2, shared=True)
    for name in args.recipes:
        for size in ([VOLUME_SIZE] if consumes_volumes(name) else args.sizes):
            for mode in args.modes:
                if args.shared_process:
                    _reset_peak_rss()
                    try:
                        row = run_case(name, size, mode, args.steps, args.batch, shared=True)
                    except Exception as err:  # noqa: BLE001 - recorded in the row, the table goes on
                        row = {"recipe": name, "size": size, "mode": mode, "error": f"{type(err).__name__}: {err}"}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    continue
                command = [sys.executable, "-m", "bench.resolution", "--case", name, str(size), mode,
                           "--steps", str(args.steps), "--batch", str(args.batch)]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                    row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                        {"recipe": name, "size": size, "mode": mode, "error": done.stderr.strip()[-600:]}
                except subprocess.TimeoutExpired:
                    row = {"recipe": name, "size": size, "mode": mode, "error": f"timeout {args.timeout} s"}
                print(json.dumps(row), flush=True)
                rows.append(row)
    commands = ["python -m bench.resolution " + " ".join(argv or sys.argv[1:])]
    previous = RESULTS / "resolution.json"
    if args.keep and previous.exists():
        old = json.loads(previous.read_text())
        measured = {(r["recipe"], r["size"], r["mode"]) for r in rows}
        rows = [r for r in old["rows"] if (r["recipe"], r["size"], r["mode"]) not in measured] + rows
        commands = old.get("commands", [old.get("command")]) + commands
    write_result("resolution", {"commands": commands, "clock": "process CPU time, 1 thread", "rows": rows})
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
