"""``medgen report RUN [RUN ...]``: (re)write a run's report, or compare runs side by side.

    medgen report runs/demo                    -> runs/demo/report.html
    medgen report runs/dp runs/nodp [--out F]  -> each run's report.html, and F (default
                                                  ./medgen-compare.html) with the runs
                                                  side by side (report_compare.py)

Reading only: nothing in a run directory changes except its report.html.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medgen.atomic import atomic_write_text
from medgen.evaluation.report import write_report
from medgen.evaluation.report_compare import render_comparison

DEFAULT_COMPARISON = Path("medgen-compare.html")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgen report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the comparison page for two or more runs (default ./{DEFAULT_COMPARISON})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        print(f"medgen report: not a run directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.out is not None and len(args.runs) < 2:
        print("medgen report: --out names the comparison page, which needs two or more runs", file=sys.stderr)
        return 2
    for run in args.runs:
        print(f"report: {write_report(run)}")
    if len(args.runs) > 1:
        out = args.out or DEFAULT_COMPARISON
        atomic_write_text(out, render_comparison(args.runs))
        print(f"comparison: {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
