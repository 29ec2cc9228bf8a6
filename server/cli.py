"""``medgen-server``: the coordinator's command line.

Subcommands are registered in ``SUBCOMMANDS`` (name -> function adding its parser); the
deployment issue adds ``start``/``run`` there without touching ``simulate``.

Exit codes of ``simulate``: 0 every planned round trained; 1 the run failed; 2 bad
configuration or federation; 3 the run ended but its last rounds trained no site (the
last line says which and why; the checkpoint keeps the last trained round); 4 the run
directory belongs to another coordinator that is still running.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from medgen.config import ConfigError, RunConfig, parse_overrides
from medgen.server.cli_types import non_negative_int, port, positive_int, seconds
from medgen.server.coordinator import Coordinator
from medgen.server.deploy_cli import DEPLOY_SUBCOMMANDS
from medgen.server.previous_run import set_aside
from medgen.server.run_lock import RunDirLocked
from medgen.server.run_log import RunDir
from medgen.server.simulate import (FEDERATIONS, NothingTrained, SimulationError, add_node_ledgers,
                                    prepare_federation, run_simulation)
from medgen.sim.config import SimConfigError
from medgen.sim.federation import FederationExistsError

DEFAULT_SUBJECTS = 200
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_NOTHING_TRAINED, EXIT_LOCKED = 0, 1, 2, 3, 4


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate", help="train on a simulated federation on this machine (Flower simulation engine)",
        description="Build (or reuse) the simulated federation (real MNI anatomy rendered by "
        "simulated scanners, one folder per site), then train on it with Flower's simulation "
        "engine: one simulated SuperNode per site, each training locally with DP-SGD. Prints "
        "progress per round and the report path at the end. Running it again with the same "
        "--out resumes from the last checkpoint (raise num-rounds to train longer). One "
        "coordinator per RUN_DIR: a second one is refused while the first runs, and every "
        "process a coordinator starts is stopped when it ends, even on SIGKILL (a supervisor "
        "process watches it); a rerun after a crash cleans up what was left.",
        epilog="exit codes: 0 all rounds trained; 1 the run failed; 2 bad configuration; 3 the "
        "run ended but its last rounds trained no site (e.g. every site's privacy budget is "
        "spent; the checkpoint keeps the last round that trained); 4 RUN_DIR is in use by "
        "another coordinator.",
    )
    p.add_argument("--config", type=Path, help="RunConfig TOML file (keys as in `--set`); "
                   "defaults apply to keys it does not set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run-config key, e.g. --set num-rounds=3 --set options.gen-width=32; "
                   "repeatable")
    p.add_argument("--federation", choices=FEDERATIONS, default="brain",
                   help="which simulated federation: the brain default (MR, 4 classes) or head-ct "
                   "(CT sites A-D in HU and the MR site M, 7 classes; docs/simulated-federation.md); "
                   "the run's label-names come from its dataset.toml (default: %(default)s)")
    p.add_argument("--sites", type=positive_int, metavar="N", help="number of simulated sites (default: the "
                   "config's `sites`, A,B,C,D; head-ct: all five)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2,
                   help="head-ct: 2 (one axial slice per patient) or 3 (one volume per patient, for "
                   "a recipe that consumes volumes, e.g. volume-gan) (default: %(default)s)")
    p.add_argument("--subjects-per-site", type=positive_int, default=DEFAULT_SUBJECTS, metavar="N",
                   help="patients (one image each) per simulated site (default: %(default)s)")
    p.add_argument("--public-size", type=positive_int, default=300, metavar="N",
                   help="label maps in the public anatomy bank (conditioning for generation; "
                   "default: %(default)s)")
    p.add_argument("--heldout-size", type=non_negative_int, default=48, metavar="N",
                   help="held-out subjects per split (fit: trains the evaluation networks; test: "
                   "reference for every reported metric), rendered at every site (default: %(default)s)")
    p.add_argument("--dicom-sites", default="", metavar="SITES",
                   help="simulated sites whose folder holds DICOM series instead of NIfTI, e.g. B "
                   "or B,C: sites/<site>/images/<subject>/ is one DICOM MR series per patient (the "
                   "same stored values), so that site's client trains through the DICOM reader "
                   "like a hospital's PACS export (default: none; all sites NIfTI)")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), metavar="RUN_DIR",
                   help="run directory: metrics.jsonl, checkpoint, samples/, report.html, and "
                   "(unless --data-root) the federation's data in RUN_DIR/federation; node state "
                   "(privacy ledgers, caches) in RUN_DIR/state (default: %(default)s)")
    p.add_argument("--data-root", type=Path, help="use the federation in this data root as it is "
                   "(its manifest names the sites; --sites/--subjects-per-site/--public-size/"
                   "--heldout-size are then ignored, and --dicom-sites must match how it was "
                   "built), or build one there if it holds none")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming: the "
                   "previous run's results in RUN_DIR (checkpoint, metrics, samples, report, logs) "
                   "move to RUN_DIR.prev-<time> beside it; node state (the sites' privacy ledgers "
                   "still remember what each site spent) and the federation's data stay")
    p.add_argument("--delete-previous", action="store_true", help="with --fresh: delete the "
                   "previous run's results instead of moving them aside")
    p.add_argument("--timeout", type=seconds, default=6 * 3600, metavar="SECONDS",
                   help="give up (and stop every process) after this long (default: %(default)s)")
    p.add_argument("--port", type=port, help="SuperLink port on 127.0.0.1 (default: a free one)")
    p.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    if args.delete_previous and not args.fresh:
        print("medgen-server simulate: --delete-previous only goes with --fresh", file=sys.stderr)
        return EXIT_CONFIG
    overrides = parse_overrides(args.overrides)
    config = RunConfig.from_toml(args.config, overrides) if args.config else \
        RunConfig.from_run_config(overrides)
    out = args.out.resolve()
    data_root = (args.data_root or out / "federation").resolve()
    try:
        with Coordinator.claim(out) as coordinator:
            print(f"coordinator {coordinator.id} (pid {os.getpid()}, supervisor pid "
                  f"{coordinator.supervisor.pid}) owns {out}", flush=True)
            return _simulate_owned(args, config, out, data_root, coordinator)
    except RunDirLocked as err:
        print(f"medgen-server simulate: {err}", file=sys.stderr)
        return EXIT_LOCKED


def _simulate_owned(args: argparse.Namespace, config: RunConfig, out: Path, data_root: Path,
                    coordinator: Coordinator) -> int:
    state_root = out / "state"
    if args.fresh:
        moved = set_aside(out, keep=(data_root, state_root), delete=args.delete_previous)
        if moved is not None:
            print(f"--fresh: the previous run's results are kept in {moved}")
        elif args.delete_previous:
            print("--fresh --delete-previous: the previous run's results were deleted")
    print(f"federation data: {data_root}")
    if args.dims != 2 and args.federation != "head-ct":
        print("medgen-server simulate: --dims 3 builds the head-ct federation as volumes; the brain "
              "federation is one slice per patient (use --federation head-ct)", file=sys.stderr)
        return EXIT_CONFIG
    volumes = {"dims": args.dims} if args.federation == "head-ct" else {}
    try:
        config = prepare_federation(config, data_root, num_sites=args.sites,
                                    subjects_per_site=args.subjects_per_site,
                                    public_size=args.public_size, heldout_fit=args.heldout_size,
                                    heldout_test=args.heldout_size,
                                    dicom_sites=args.dicom_sites,
                                    reuse_any=args.data_root is not None,
                                    federation=args.federation, **volumes)
    except (SimConfigError, FederationExistsError) as err:
        print(f"medgen-server simulate: {err}", file=sys.stderr)
        return EXIT_CONFIG
    config = config.replace(run_dir=str(out), state_root=str(state_root),
                            resume=config.resume and not args.fresh)
    try:
        result = run_simulation(config, out / "flower", timeout=args.timeout, port=args.port,
                                coordinator=coordinator)
    except NothingTrained as err:
        add_node_ledgers(RunDir(out), config)
        print(f"report: {err.result.report or out / 'report.html (missing: see the log above)'}")
        print(f"medgen-server simulate: {err}", file=sys.stderr)
        return EXIT_NOTHING_TRAINED
    except SimulationError as err:
        print(f"medgen-server simulate: {err}", file=sys.stderr)
        return EXIT_FAILED
    add_node_ledgers(RunDir(out), config)
    print(f"report: {result.report or out / 'report.html (missing: see the log above)'}")
    print(f"{result.outcome.summary()} in {result.seconds:.0f} s")
    return EXIT_OK


SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "simulate": _add_simulate,
    **DEPLOY_SUBCOMMANDS,  # start, register-node, run, pki (server/deploy_cli.py)
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgen-server", description="medgen coordinator: federated, differentially private "
        "training of medical image generators")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM -> SystemExit, so `finally` blocks stop the SuperLink and its children
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"medgen-server: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
