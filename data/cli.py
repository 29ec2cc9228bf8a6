"""`medgen data public-bank`: the data package's commands (core/cli.py dispatches here)."""

from __future__ import annotations

import argparse
import sys

from medgen.data.errors import DataError
from medgen.data.public_bank import build_public_bank

DESCRIPTION = """\
Build a public label bank in the federation's label schema from any folder of public
segmentations (NIfTI or PNG) and a value remap table:

  medgen data public-bank --labels atlas/labels --remap remap.toml \\
      --schema data/head-ct/dataset.toml --out data/public-bank

remap.toml maps every source value to a class of the schema ([remap] "24" = "csf").
Writes OUT/labels/*.nii.gz, OUT/dataset.toml (the schema) and OUT/provenance.json
(sha256 of every source and output, the remap, the schema), atomically.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgen data public-bank", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", required=True, help="folder of public label maps")
    parser.add_argument("--remap", required=True, help="TOML table: source value -> class")
    parser.add_argument("--schema", required=True, help="dataset.toml whose [labels] to follow")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bank")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        provenance = build_public_bank(args.labels, args.remap, args.schema, args.out,
                                       overwrite=args.overwrite)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    voxels = ", ".join(f"{name} {n}" for name, n in provenance["class_voxels"].items())
    print(f"public bank ready in {args.out}: {len(provenance['files'])} label maps; voxels: {voxels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
