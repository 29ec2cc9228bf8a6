"""`python -m medgen.sim.cli build --federation head-ct ...`: the head federation's build.

sim/cli.py parses the shared options and hands them here; the brain-only options
(--severity, --quantity-skew, --dicom-sites) are refused rather than silently ignored.
"""

from __future__ import annotations

import argparse
import sys
import time

from medgen.sim.config import SimConfigError
from medgen.sim.federation import FederationExistsError
from medgen.sim.head_anatomy import HeadAnatomyMissingError
from medgen.sim.head_config import HeadSimConfig
from medgen.sim.head_federation import build_head_federation

HEAD_DEFAULT_SITES = "A,B,C,D,M"


def parse_window(text: str) -> tuple[float, float]:
    """'-1000,2000' -> (-1000.0, 2000.0) (argparse type of --window)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window '{text}' must be lo,hi in HU, e.g. "
                                         "-1000,2000") from None
    return low, high


def _paired(args: argparse.Namespace) -> dict:
    """--paired-sites / --misregistration-mm, only when a site is paired (default builds keep
    the config they had before the option existed)."""
    sites = getattr(args, "paired_sites", "")
    return {"paired_sites": sites, "misregistration_mm": args.misregistration_mm} if sites else {}


def build_head(args: argparse.Namespace) -> int:
    """Build the head-CT federation from parsed `build` arguments; returns an exit code."""
    brain_only = [flag for flag, value in (("--severity", args.severity),
                                           ("--quantity-skew", args.quantity_skew),
                                           ("--dicom-sites", args.dicom_sites)) if value]
    if brain_only:
        print(f"error: {', '.join(brain_only)}: brain federation only; drop "
              "them for --federation head-ct", file=sys.stderr)
        return 2
    try:
        config = HeadSimConfig(seed=args.seed, sites=args.sites or HEAD_DEFAULT_SITES,
                               subjects_per_site=args.subjects_per_site,
                               public_size=args.public_size, heldout_fit=args.heldout_fit,
                               heldout_test=args.heldout_test, image_size=args.image_size,
                               dims=args.dims, **({"window": args.window} if args.window else {}),
                               **_paired(args))
        start = time.perf_counter()
        manifest = build_head_federation(config, args.out, overwrite=args.overwrite,
                                         workers=max(1, args.workers), progress=print)
    except (SimConfigError, FederationExistsError, HeadAnatomyMissingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{group} {n}" for group, n in manifest.data["counts"].items())
    print(f"head-CT federation ready in {manifest.root} ({time.perf_counter() - start:.1f} s): "
          f"{counts}")
    print(f"content hash {manifest.content_hash}")
    return 0
