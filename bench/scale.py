"""Scale in simulation: K simulated hospitals, round time and peak memory per K.

Issue 19, item 4. For each K it runs exactly these user-facing commands:

    python -m medgen.sim.cli build --out WORK/data --sites max(K) --subjects-per-site S \\
        --quantity-skew SKEW --public-size 4 --heldout-fit 0 --heldout-test 0 --image-size 32
    medgen-server simulate --data-root WORK/k<K>/data --out WORK/k<K>/run --fresh --delete-previous \\
        --set num-rounds=2 --set local-steps=1 --set image-size=16 --set batch-size=4 \\
        --set eval-every=0 --set simulate-actors=A --set simulate-dropout=P \\
        --set options.gen-width=4 --set options.disc-width=4 --set options.noise-dim=16

WORK/k<K>/data is the first K sites of the one build (links to its site folders and
public bank, and its manifest cut to those sites): site k has the same patients and
scanner in every K, and the sizes fall from S (site A) to round(S exp(-SKEW (K-1))).
(dp-cgan, DP-SGD at every site, Flower's real simulation engine with A concurrent Ray
actors). While a run goes, every process of it is sampled twice a second from /proc: the
CLI's descendants plus any process carrying the coordinator's MEDGEN_RUN_DIR marker (the
SuperLink, the simulation process, Ray's GCS, raylet and workers, the supervisor). Peak
memory = the largest sum of their resident set sizes (RSS; shared pages count once per
process, so it is an upper bound). Round times come from metrics.jsonl's timestamps: round
1 includes starting Ray and its actors, later rounds are steady state. Sites answered =
the replies the server aggregated (K minus the dropped minus the excluded).

    .venv/bin/python -m bench.scale                       -> bench/results/scale.json
    .venv/bin/python -m bench.scale --ks 4 16 --dropout 0  (a cheaper sweep)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import write_result
from medgen.sim.federation import Manifest

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_pids(root: int, marker: str) -> set[int]:
    """``root`` and its descendants, plus every process whose environment has
    MEDGEN_RUN_DIR=``marker`` (Ray daemons re-parented away from the tree keep it)."""
    parents, marked = {}, set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                marked.add(pid)
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = {root} | marked, [root, *marked]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in out:
                out.add(pid)
                frontier.append(pid)
    return out


def rss_bytes(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


class PeakMemory:
    """Samples the run's process tree every ``every`` seconds in a thread."""

    def __init__(self, root: int, marker: str, every: float = 0.5) -> None:
        self.root, self.marker, self.every = root, marker, every
        self.peak, self.peak_processes, self.samples = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree_pids(self.root, self.marker)
            total = rss_bytes(pids)
            self.samples += 1
            if total > self.peak:
                self.peak, self.peak_processes = total, len(pids)
            self._stop.wait(self.every)


def first_sites(full: Path, data: Path, k: int) -> None:
    """A data root holding the first ``k`` sites of the build at ``full`` (links + manifest)."""
    manifest = json.loads((full / "manifest.json").read_text())
    names = list(Manifest.load(full).site_names[:k])  # in site-index order (not the JSON's sorted keys)
    if data.exists():
        shutil.rmtree(data)
    (data / "sites").mkdir(parents=True)
    for name in names:
        (data / "sites" / name).symlink_to((full / "sites" / name).resolve(), target_is_directory=True)
    for entry in full.iterdir():
        if entry.name not in ("sites", "manifest.json", "cache"):
            (data / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    manifest["sites"] = {n: manifest["sites"][n] for n in names}
    manifest["site_formats"] = {n: manifest["site_formats"][n] for n in names}
    manifest["counts"] = {g: c for g, c in manifest["counts"].items()
                          if not g.startswith("sites/") or g[len("sites/"):] in names}
    manifest["subjects"] = {g: v for g, v in manifest["subjects"].items()
                            if not g.startswith("sites/") or g[len("sites/"):] in names}
    manifest["config"]["sites"] = ",".join(names)
    manifest["first_sites_of"] = str(full.resolve())
    (data / "manifest.json").write_text(json.dumps(manifest, indent=1))


def build(data: Path, k: int, args: argparse.Namespace) -> float:
    command = [sys.executable, "-m", "medgen.sim.cli", "build", "--out", str(data), "--sites", str(k),
               "--subjects-per-site", str(args.subjects), "--quantity-skew", str(args.skew),
               "--public-size", "4", "--heldout-fit", "0", "--heldout-test", "0",
               "--image-size", "32", "--workers", str(args.build_workers)]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def simulate(data: Path, run: Path, args: argparse.Namespace) -> dict:
    settings = ["recipe=dp-cgan", f"num-rounds={args.rounds}", "local-steps=1", f"image-size={args.image_size}",
                "batch-size=4", "eval-every=0", f"simulate-actors={args.actors}",
                f"simulate-dropout={args.dropout}", "options.gen-width=4", "options.disc-width=4",
                "options.noise-dim=16"]
    cli = Path(sys.executable).parent / "medgen-server"
    command = [str(cli), "simulate", "--data-root", str(data), "--out", str(run), "--fresh",
               "--delete-previous", "--timeout", str(args.timeout), *[a for s in settings for a in ("--set", s)]]
    print("$", " ".join(command), flush=True)
    start = time.time()
    process = subprocess.Popen(command)
    with PeakMemory(process.pid, f"MEDGEN_RUN_DIR={run.resolve()}") as memory:
        code = process.wait(timeout=args.timeout + 300)
    seconds = time.time() - start
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["round"])
    times = [start] + [r["time"] for r in train]
    return {
        "exit_code": code, "wall_s": round(seconds, 1),
        "round_s": [round(b - a, 2) for a, b in zip(times, times[1:])],
        "sites_answered": [len(r["per_site"]) for r in train],
        "sites_excluded": [len(r["excluded"]) for r in train],
        "trained": [not r["aggregate"].get("kept-previous-weights") for r in train],
        "max_epsilon": max((s.get("epsilon", 0.0) for r in train for s in r["per_site"].values()), default=None),
        "peak_rss_gib": round(memory.peak / 2 ** 30, 3), "processes_at_peak": memory.peak_processes,
        "memory_samples": memory.samples, "settings": settings,
    }


def ray_start_timed_out(run: Path) -> bool:
    log = run / "flower" / "run.log"
    return log.exists() and "timed out during startup" in log.read_text(errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64, 100], help="numbers of sites")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--subjects", type=int, default=6, help="patients of the largest site")
    parser.add_argument("--skew", type=float, default=0.03, help="--quantity-skew of the build")
    parser.add_argument("--dropout", type=float, default=0.1, help="simulate-dropout")
    parser.add_argument("--actors", type=int, default=2, help="simulate-actors (0: one per CPU)")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--build-workers", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--retries", type=int, default=2, help="reruns of a K whose Ray start timed out")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-scale"))
    args = parser.parse_args(argv)
    rows = []
    full = args.work / "data"
    built = build(full, max(args.ks), args)
    for k in args.ks:
        data = args.work / f"k{k}" / "data"
        first_sites(full, data, k)
        manifest = json.loads((data / "manifest.json").read_text())
        sizes = [n for group, n in manifest["counts"].items() if group.startswith("sites/")]
        run = args.work / f"k{k}" / "run"
        result, retries = simulate(data, run, args), 0
        while result["exit_code"] != 0 and retries < args.retries and ray_start_timed_out(run):
            retries += 1  # Ray waits 30 s (hard-coded) for its raylet: a loaded machine misses it
            result = simulate(data, run, args)
        row = {"k": k, "site_sizes": {"max": max(sizes), "min": min(sizes), "total": sum(sizes)},
               "ray_startup_retries": retries, **result}
        print(json.dumps(row), flush=True)
        rows.append(row)
        write(args, argv, built, rows)  # after every K: a long sweep keeps what it measured
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


def write(args: argparse.Namespace, argv: list[str] | None, built: float, rows: list[dict]) -> None:
    write_result("scale", {"command": "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "recipe": "dp-cgan", "rounds": args.rounds, "actors": args.actors,
                           "dropout": args.dropout, "quantity_skew": args.skew,
                           "subjects_largest_site": args.subjects, "build_s": round(built, 1), "image_size": args.image_size,
                           "rows": rows})


if __name__ == "__main__":
    raise SystemExit(main())
