"""``medgen-client data check DIR``: what in a site folder is usable, what is not and why.

Reads everything the way training would (headers, geometry, full pixel decode) and
prints one row per record: DICOM series (short hash id, never a UID or a name) and
NIfTI/PNG files, then every problem file with its reason and counts per modality.
Nothing is written or modified. Exit code 0 if anything is usable, 1 otherwise, 2 on a
usage error (argparse). Paths are relative to DIR: the hospital's own, printed locally.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medgen import TISSUE_CLASSES
from medgen.client.dicom.pixels import PixelOptions, decode_series
from medgen.client.dicom.scan import Problem, scan_folder
from medgen.client.dicom.series import group_series
from medgen.client.readers import ReaderError, default_readers

IMAGE_KINDS = ("dicom", "nifti", "png")  # rows that are training images (not label maps)


@dataclass
class Row:
    item: str          # series short id or relative file path
    where: str         # folder (relative to DIR) holding it
    kind: str          # "dicom" | "nifti" | "png"
    modality: str
    slices: int
    shape: str
    spacing: str
    status: str        # "usable" or "skipped: <reason>"


@dataclass
class Report:
    root: str
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def usable(self) -> int:
        """Usable training images (label maps alone do not make a site usable)."""
        return sum(r.status == "usable" and r.kind in IMAGE_KINDS for r in self.rows)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {}
        for row in self.rows:
            c = out.setdefault(row.modality, Counter())
            c["usable" if row.status == "usable" else "skipped"] += 1
            if row.status == "usable":
                c["slices"] += row.slices
        return {m: dict(c) for m, c in sorted(out.items())}


def _spacing(spacing) -> str:
    if spacing is None:
        return "unknown"
    return "x".join("?" if not math.isfinite(v) else f"{v:.2f}" for v in spacing)


def check_folder(root: Path, allow_burned_in: bool = False, image_size: int | None = None) -> Report:
    """Inspect ``root`` read-only and return the report."""
    report = Report(root=str(root))
    scan = scan_folder(root)
    report.problems.extend(scan.problems)
    all_series = group_series(scan, allow_burned_in=allow_burned_in)
    short_ids = {s.key: s.short_id for s in all_series if not s.is_seg}
    for series in all_series:
        if series.is_seg:
            for seg in series.headers:
                target = short_ids.get(seg.referenced_series_key or "")
                status = (f"usable: labels for series {target}" if target else
                          "skipped: its image series is not in this folder")
                report.rows.append(Row(series.short_id, series.folder, "dicom-seg", "SEG",
                                       seg.number_of_frames, f"{seg.rows}x{seg.columns}", "-", status))
            continue
        status = "usable"
        if series.problems:
            status = "skipped: " + "; ".join(series.problems)
        else:
            _, decode_problems = decode_series(root, series, PixelOptions())
            if decode_problems:
                report.problems.extend(decode_problems)
                status = f"skipped: {len(decode_problems)} image(s) could not be decoded (see below)"
        shape = "x".join(map(str, series.shape))
        if image_size and status == "usable":
            shape += f" -> {image_size}x{image_size}x{series.shape[2]}"
        report.rows.append(Row(series.short_id, series.folder, "dicom", series.modality,
                               len(series.slices), shape, _spacing(series.spacing), status))
    _check_other_files(root, scan.other_files, report, image_size)
    return report


def _check_other_files(root: Path, files: list[str], report: Report, image_size: int | None) -> None:
    readers = [r for r in default_readers() if r.name != "dicom"]
    for rel in files:
        path = root / rel
        reader = next((r for r in readers if r.claims(path)), None)
        if reader is None:
            report.problems.append(Problem(rel, "not an image medgen reads (not DICOM, NIfTI or PNG)"))
            continue
        is_label = rel.startswith("labels/")
        try:
            volume = reader.read(path)
            if is_label:
                _check_label_values(volume.array, rel)
        except ReaderError as err:
            kind = reader.name + ("-label" if is_label else "")
            report.rows.append(Row(rel, str(Path(rel).parent), kind, reader.name.upper(), 0, "-",
                                   "-", f"skipped: {err}"))
            continue
        shape = "x".join(map(str, volume.array.shape))
        if image_size:
            shape += f" -> {image_size}x{image_size}x{volume.array.shape[2]}"
        report.rows.append(Row(rel, str(Path(rel).parent), reader.name + ("-label" if is_label else ""),
                               "LABEL" if is_label else reader.name.upper(),
                               volume.array.shape[2], shape, _spacing(volume.spacing), "usable"))


def _check_label_values(array: np.ndarray, rel: str) -> None:
    values = np.unique(array)
    if not np.array_equal(values, np.round(values)) or values.min() < 0 \
            or values.max() >= len(TISSUE_CLASSES):
        raise ReaderError(f"{rel}: label values must be integers 0..{len(TISSUE_CLASSES) - 1} "
                          f"({', '.join(TISSUE_CLASSES)}); found {values[:8].tolist()}")


def format_report(report: Report) -> str:
    header = ("item", "folder", "kind", "modality", "slices", "shape", "spacing (mm)", "status")
    rows = [header] + [(r.item, r.where, r.kind, r.modality, str(r.slices), r.shape, r.spacing, r.status)
                       for r in report.rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]
             for row in rows]
    if report.problems:
        lines += ["", f"problem files ({len(report.problems)}):"]
        lines += [f"  {p.relpath}: {p.reason}" for p in report.problems]
    lines += ["", "per modality:"]
    for modality, c in report.counts().items():
        lines.append(f"  {modality}: {c.get('usable', 0)} usable ({c.get('slices', 0)} slices), "
                     f"{c.get('skipped', 0)} skipped")
    lines.append(f"\n{report.usable} usable record(s) in {report.root}; nothing was modified.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgen-client data check",
        description="Check a site folder (DICOM export, NIfTI, PNG) read-only: what is usable, "
                    "what is skipped and why. Exit code 0 if anything is usable, 1 otherwise.")
    parser.add_argument("dir", type=Path, help="the site folder (as exported from PACS)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="show the shape each record is resized to for training")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--allow-burned-in", action="store_true",
                        help="accept images flagged BurnedInAnnotation=YES (refused by default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a directory; pass the folder holding the site's images",
              file=sys.stderr)
        return 1
    report = check_folder(args.dir, allow_burned_in=args.allow_burned_in, image_size=args.image_size)
    if args.json:
        print(json.dumps({"root": report.root, "usable": report.usable,
                          "rows": [asdict(r) for r in report.rows],
                          "problems": [asdict(p) for p in report.problems],
                          "counts": report.counts()}, indent=2))
    else:
        print(format_report(report))
    return 0 if report.usable else 1


if __name__ == "__main__":
    raise SystemExit(main())
