"""``medgen-server``: the coordinator's command line.

Subcommands are registered in ``SUBCOMMANDS`` (name -> function adding its parser); the
deployment issue adds ``start``/``run`` there without touching ``simulate``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Callable

from medgen.config import ConfigError, RunConfig, parse_overrides
from medgen.server.deploy_cli import DEPLOY_SUBCOMMANDS

DEFAULT_SUBJECTS = 200


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate", help="train on a simulated federation on this machine (Flower simulation engine)",
        description="Build (or reuse) the simulated federation (real MNI anatomy rendered by "
        "simulated scanners, one folder per site), then train on it with Flower's simulation "
        "engine: one simulated SuperNode per site, each training locally with DP-SGD. Prints "
        "progress per round and the report path at the end. Running it again with the same "
        "--out resumes from the last checkpoint (raise num-rounds to train longer).",
    )
    p.add_argument("--config", type=Path, help="RunConfig TOML file (keys as in `--set`); "
                   "defaults apply to keys it does not set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run-config key, e.g. --set num-rounds=3 --set options.gen-width=32; "
                   "repeatable")
    p.add_argument("--sites", type=int, metavar="N", help="number of simulated sites (default: the "
                   "config's `sites`, A,B,C,D)")
    p.add_argument("--subjects-per-site", type=int, default=DEFAULT_SUBJECTS, metavar="N",
                   help="patients (one image each) per simulated site (default: %(default)s)")
    p.add_argument("--public-size", type=int, default=300, metavar="N",
                   help="label maps in the public anatomy bank (conditioning for generation; "
                   "default: %(default)s)")
    p.add_argument("--heldout-size", type=int, default=48, metavar="N",
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
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in RUN_DIR "
                   "(node ledgers still remember what each site spent)")
    p.add_argument("--timeout", type=float, default=6 * 3600, metavar="SECONDS",
                   help="give up (and stop every process) after this long (default: %(default)s)")
    p.add_argument("--port", type=int, help="SuperLink port on 127.0.0.1 (default: a free one)")
    p.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    from medgen.server.simulate import (SimulationError, add_node_ledgers, prepare_federation,
                                        run_simulation)
    from medgen.server.run_log import RunDir

    overrides = parse_overrides(args.overrides)
    config = RunConfig.from_toml(args.config, overrides) if args.config else \
        RunConfig.from_run_config(overrides)
    out = args.out.resolve()
    data_root = (args.data_root or out / "federation").resolve()
    from medgen.sim.config import SimConfigError
    from medgen.sim.federation import FederationExistsError

    print(f"federation data: {data_root}")
    try:
        config = prepare_federation(config, data_root, num_sites=args.sites,
                                    subjects_per_site=args.subjects_per_site,
                                    public_size=args.public_size, heldout_fit=args.heldout_size,
                                    heldout_test=args.heldout_size,
                                    dicom_sites=args.dicom_sites,
                                    reuse_any=args.data_root is not None)
    except (SimConfigError, FederationExistsError) as err:
        print(f"medgen-server simulate: {err}", file=sys.stderr)
        return 2
    config = config.replace(run_dir=str(out), state_root=str(out / "state"),
                            resume=config.resume and not args.fresh)
    try:
        result = run_simulation(config, out / "flower", timeout=args.timeout, port=args.port)
        add_node_ledgers(RunDir(out), config)
    except SimulationError as err:
        print(f"medgen-server simulate: {err}", file=sys.stderr)
        return 1
    print(f"finished round {result.final_round} in {result.seconds:.0f} s")
    print(f"report: {result.report or out / 'report.html (missing: see the log above)'}")
    return 0


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
