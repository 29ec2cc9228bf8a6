"""Run the benches one after the other, each as its own process: ``make bench``.

    python -m bench.run_all [--list] [--only NAME ...] [--work runs/bench]

Each bench writes its own JSON to bench/results/ (bench/common.py ``write_result``); this
runner only sequences them and reports which failed, so one broken bench does not hide the
rest. The order is cheapest first. Benches that need a built federation get one under
``--work`` (built once by ``medgen sim build`` and reused). The translation bench is not in
the list: it is a multi-step, multi-seed protocol (pretrain-seg, train, evaluate, adapt,
summarise; hours on 2 cores) documented in docs/recipes/translation.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

#: (name, arguments after ``python -m bench.<name>``, rough minutes on the 2-core CI machine)
BENCHES: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("dicom_ingest", (), 1),
    ("hostile_folder", (), 1),
    ("dp_step", ("--image-size", "64", "128"), 3),
    ("diffusion", ("--repeats", "3"), 5),
    ("byzantine", ("--work", "{work}/byzantine"), 15),
    ("federated_vs_central", (), 10),
    ("deployment_overhead", (), 10),
    ("metric_sanity", ("--data-root", "{work}/brain", "--data-root", "{work}/head-ct"), 30),
    ("dicom_site_simulation", ("--work", "{work}/dicom-site"), 30),
    ("compare_gan_diffusion", ("--work", "{work}/gan_vs_diffusion"), 90),
    ("scale", ("--work", "{work}/scale"), 60),
    ("resolution", (), 60),
    ("gpu_check", ("--device", "auto"), 10),  # the CUDA check on a GPU machine, else its CPU dry run
    # the recipes' first measurements, with the settings their docs/recipes pages quote
    ("unistable", ("--steps", "1000", "--seeds", "2"), 10),
    ("controls", (), 5),
    ("volume_consistency", (), 15),
    ("restoration", ("--federation", "brain", "--tasks", "denoise", "--rounds", "3", "--local-steps", "4",
                     "--subjects", "60", "--batch-size", "16", "--heldout", "12", "--seeds", "3",
                     "--set", "options.channels=16,32"), 30),
    ("blind_denoise", ("--rounds", "3", "--local-steps", "6", "--subjects", "24", "--heldout", "12",
                       "--batch-size", "8", "--no-ceiling", "--set", "sites=B,D", "--set", "accountant=rdp",
                       "--set", "options.denoiser-steps=100"), 15),
    ("redgan", ("--rounds", "2", "--local-steps", "5", "--subjects", "24", "--seg-steps", "150"), 10),
    ("two_stage", ("--rounds", "2", "--local-steps", "5", "--subjects", "24", "--seg-steps", "150",
                   "--synthetic", "80"), 10),
    ("adaptive_schedule", ("--rounds", "8", "--local-steps", "12", "--subjects", "64", "--heldout", "32"), 15),
    ("style_content_ct", ("--image-size", "64", "--heldout", "30"), 15),
    ("da_gan", ("--work", "{work}/da_gan", "--subjects", "96", "--heldout", "24", "--rounds", "6",
                "--local-steps", "25", "--batch-size", "8", "--width", "8", "--lr", "5e-3", "--noise-free"), 15),
    ("spcycle", ("--work", "{work}/spcycle"), 60),
)

#: federations the benches above read, built once: directory -> ``medgen sim build`` arguments
#: (512 held-out test subjects: the metric sanity table needs 256 per half, docs/evaluation.md)
FEDERATIONS: dict[str, tuple[str, ...]] = {
    "brain": ("--heldout-test", "512"),
    "head-ct": ("--federation", "head-ct", "--heldout-test", "512"),
}


def _build_federations(work: Path, needed: set[str]) -> None:
    for name, extra in FEDERATIONS.items():
        root = work / name
        if name in needed and not (root / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "medgen.sim.cli", "build", "--out", str(root), *extra],
                           check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the benches and exit")
    parser.add_argument("--only", nargs="+", default=None, help="run only these benches")
    parser.add_argument("--work", type=Path, default=Path("runs/bench"), help="work directory")
    args = parser.parse_args(argv)
    known = {name for name, _, _ in BENCHES}
    if args.only and not set(args.only) <= known:
        parser.error(f"unknown bench(es) {sorted(set(args.only) - known)}; known: {sorted(known)}")
    chosen = [b for b in BENCHES if args.only is None or b[0] in args.only]
    if args.list:
        for name, extra, minutes in chosen:
            print(f"{name:24s} ~{minutes:3d} min  python -m bench.{name} {' '.join(extra)}")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    needed = {Path(a).name for _, extra, _ in chosen for a in extra if a.startswith("{work}/")}
    _build_federations(args.work, needed & set(FEDERATIONS))
    failed = []
    for name, extra, _ in chosen:
        command = [sys.executable, "-m", f"bench.{name}", *(a.format(work=args.work) for a in extra)]
        start = time.monotonic()
        code = subprocess.run(command).returncode
        print(f"bench.{name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
