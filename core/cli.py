"""``medgen``: the tools that are neither the coordinator's server nor a hospital's node.

    medgen audit RUN_DIR ...      membership-inference audit of a run (privacy/audit_cli.py)
    medgen translate ...          translate a hospital's own files into another site's style
    medgen restore ...            denoise or up-sample a hospital's own files (client/restore.py)
    medgen sim build ...          build a simulated federation on disk (sim/cli.py)
    medgen data check DIR         what medgen can use in a folder, read-only (client/data_check.py)
    medgen data public-bank ...   a public label bank in the federation's schema (data/public_bank.py)
    medgen pretrain-segmenter ... the bridge's S on public label maps only (models/segmenter_pretrain.py)
    medgen report RUN [RUN ...]   a run's HTML report, or runs side by side (evaluation/report_cli.py)

Each subcommand is owned by its package; this file only dispatches, so `--help` of each
subcommand is the owner's own.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "audit": ("medgen.privacy.audit_cli", "membership-inference audit of finished runs"),
    "translate": ("medgen.client.translate", "translate a site folder (NIfTI/DICOM) into a target site's style, in physical units"),
    "restore": ("medgen.client.restore", "denoise or up-sample a site folder (NIfTI/DICOM) with a trained restoration run, in physical units"),
    "sim": ("medgen.sim.cli", "build the simulated federation (`medgen sim build --help`)"),
    "data": ("medgen.data.data_check", "`medgen data check DIR`: usable vs skipped files, read-only"),
    "pretrain-segmenter": ("medgen.models.segmenter_pretrain",
                           "train bridge-translate's segmenter S on public label maps only (options.seg-init)"),
    "report": ("medgen.evaluation.report_cli", "re-write a run's report.html; two or more runs: side by side"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: medgen {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(lines))
        if args and args[0] not in ("-h", "--help"):
            print(f"\nmedgen: unknown command '{args[0]}'", file=sys.stderr)
            return 2
        return 0
    command, rest = args[0], args[1:]
    if command == "data":  # `medgen data check DIR`: the checker's own argv starts at DIR
        if rest and rest[0] == "public-bank":  # medgen.data's own commands
            return int(importlib.import_module("medgen.data.cli").main(rest[1:]) or 0)
        if not rest or rest[0] != "check":
            print("usage: medgen data check DIR [--image-size N] [--json]\n"
                  "       medgen data public-bank --labels DIR --remap FILE --schema FILE --out DIR",
                  file=sys.stderr)
            return 2
        rest = rest[1:]
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
