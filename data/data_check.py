"""``medgen-client data check DIR``: what in a site folder trains, what does not, and why.

The verdict is the training loader's own reading, not a second opinion: the same listing
(data/site_folder.py: no symbolic link followed, regular files only, unreadable files
skipped and named), the same readers, the same checks (NaN/inf voxels, constant images,
label maps of another shape or with values out of range) and the same label rule per
record (data/site_records.py). Only the resizing into tensors is left out. So the
record count and the number of distinct patients printed here are what a node trains on
(its num-examples, and the privacy unit), whatever the folder's shape.

DIR is the site folder (``images/``, optionally ``labels/``; docs/data-layout.md). A folder
with neither (a bare PACS export) is read as if it were ``images/``, so its files can be
checked before they are arranged, and the verdict says a node cannot train on it as it is.

One row per record (DICOM series with their short hash id, never a UID or a name; NIfTI
and PNG files), then every skipped entry with its reason, then counts per modality.
Nothing is written or modified. Exit code 0 if a node would train on DIR (a site folder
with a usable record), 1 otherwise, 2 on a usage error (argparse). Paths are relative to
DIR: the hospital's own, printed locally.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medgen.data.dicom.reader import DicomReadOptions, DicomSeriesReader
from medgen.data.manifest import DatasetManifest
from medgen.data.readers import Reader, default_readers
from medgen.data.site_folder import SiteFolder
from medgen.data.site_data import site_manifest
from medgen.data.site_records import SiteReading, SiteRecord


@dataclass
class Row:
    item: str          # path relative to DIR of the record's file or folder
    where: str         # folder (relative to DIR) holding it
    kind: str          # reader format: "dicom" | "nifti" | "png" ("-" when skipped)
    modality: str
    series: str        # DICOM series short id ("-" otherwise)
    slices: int        # slices that train (constant slices dropped)
    shape: str
    spacing: str
    labels: str        # the label map used ("none" without one)
    status: str        # "usable" or "skipped: <reason>"


@dataclass
class Report:
    root: str
    site_folder: bool                  # DIR holds images/ (what a node trains on)
    labelled: bool                     # DIR holds labels/: label maps needed per record
    rows: list[Row] = field(default_factory=list)
    patients: int = 0                  # distinct patients among usable records

    @property
    def usable(self) -> int:
        return sum(r.status.startswith("usable") for r in self.rows)

    @property
    def trains(self) -> bool:
        return self.site_folder and self.usable > 0

    @property
    def skipped(self) -> list[Row]:
        return [r for r in self.rows if not r.status.startswith("usable")]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {}
        for row in self.rows:
            if row.status.startswith("usable"):
                c = out.setdefault(row.modality, Counter())
                c["usable"] += 1
                c["slices"] += row.slices
        return {m: dict(c) for m, c in sorted(out.items())}


def _spacing(spacing) -> str:
    if spacing is None:
        return "unknown"
    return "x".join("?" if not math.isfinite(v) else f"{v:.2f}" for v in spacing)


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else "."


def check_readers(allow_burned_in: bool = False) -> list[Reader]:
    """The node's default readers, with the DICOM reader's burned-in option set."""
    options = DicomReadOptions(allow_burned_in=allow_burned_in)
    return [DicomSeriesReader(options) if r.name == "dicom" else r for r in default_readers()]


def check_folder(root: Path, allow_burned_in: bool = False, image_size: int | None = None,
                 readers: list[Reader] | None = None,
                 manifest: DatasetManifest | None = None) -> Report:
    """Read ``root`` the way training does (read-only) and return the report; the manifest
    is the one training reads (``site_manifest``: dataset.toml here over the federation's)."""
    root = Path(root)
    manifest = manifest if manifest is not None else site_manifest(root)
    site_folder = (root / "images").is_dir() or (root / "labels").is_dir()
    images = "images" if site_folder else "."
    folder = SiteFolder.scan(root, ("images", "labels") if site_folder else (".",))
    readers = readers if readers is not None else check_readers(allow_burned_in)
    reading = SiteReading(folder, readers, images=images, manifest=manifest)
    report = Report(root=str(root), site_folder=site_folder and images in folder.present,
                    labelled=reading.labelled)
    patients: set[str] = set()
    for record in reading.records():
        patients.add(record.patient_key)
        report.rows.append(_usable_row(record, image_size))
    report.patients = len(patients)
    for skipped in reading.skipped:
        rel = reading.skips.relative(skipped.path)
        why = skipped.reason[len(rel) + 2:] if skipped.reason.startswith(rel + ": ") else skipped.reason
        report.rows.append(Row(rel, _parent(rel), "-", "-", "-", 0, "-", "-", "-", f"skipped: {why}"))
    return report


def _usable_row(record: SiteRecord, image_size: int | None) -> Row:
    volume, meta = record.volume, record.volume.meta
    kind = str(meta.get("format", "?"))
    kept = int(record.scaling.keep.sum())
    shape = "x".join(map(str, volume.array.shape))
    if image_size:
        shape += f" -> {image_size}x{image_size}x{kept}"
    dropped = volume.array.shape[2] - kept
    status = "usable" + (f" ({dropped} constant slice(s) dropped)" if dropped else "")
    return Row(record.source, _parent(record.source), kind, str(meta.get("modality", kind.upper())),
               str(meta.get("series", "-")), kept, shape, _spacing(volume.spacing),
               record.label_source or "none", status)


def format_report(report: Report) -> str:
    header = ("item", "folder", "kind", "modality", "series", "slices", "shape", "spacing (mm)",
              "labels", "status")
    usable = [r for r in report.rows if r.status.startswith("usable")]
    rows = [header] + [(r.item, r.where, r.kind, r.modality, r.series, str(r.slices), r.shape,
                        r.spacing, r.labels, r.status) for r in usable]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]
             for row in rows]
    if report.skipped:
        lines += ["", f"skipped ({len(report.skipped)}):"]
        lines += [f"  {r.item}: {r.status[len('skipped: '):]}" for r in report.skipped]
    lines += ["", "per modality:"]
    for modality, c in report.counts().items():
        lines.append(f"  {modality}: {c.get('usable', 0)} usable ({c.get('slices', 0)} slices)")
    lines.append("")
    lines += _verdict(report)
    return "\n".join(lines)


def _verdict(report: Report) -> list[str]:
    lines = []
    if not report.site_folder:
        lines.append(f"{report.root} has no images/ folder, so a node cannot train on it as it "
                     "is: put these files under <site>/images/ (labels under <site>/labels/; "
                     "docs/data-layout.md). Shown: this folder read as if it were images/.")
    elif not report.labelled:
        lines.append("warning: no labels/ folder: the node loads these images without label "
                     "maps (has_labels False): the label-free recipes (e.g. site-gan, "
                     "restore-diffusion, blind-denoise) train on it; those that need label maps "
                     "(e.g. dp-cgan, cddpm) refuse it until labels/<name>.nii.gz are added.")
    lines.append(f"{report.usable} usable record(s) of {report.patients} distinct patient(s) in "
                 f"{report.root}: a node trains on {report.patients if report.trains else 0} "
                 "patient(s) (one example each); nothing was modified.")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgen-client data check",
        description="Check a site folder (images/, labels/: DICOM, NIfTI, PNG) read-only, "
                    "exactly as training reads it: what is usable, what is skipped and why. "
                    "Exit code 0 if a node would train on it, 1 otherwise.")
    parser.add_argument("dir", type=Path, help="the site folder (holding images/ and labels/)")
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
    loader_log = logging.getLogger("medgen.data")
    level = loader_log.level
    loader_log.setLevel(logging.ERROR)  # every skip is in the report; no second copy on stderr
    try:
        report = check_folder(args.dir, allow_burned_in=args.allow_burned_in,
                              image_size=args.image_size)
    finally:
        loader_log.setLevel(level)
    if args.json:
        print(json.dumps({"root": report.root, "site_folder": report.site_folder,
                          "labelled": report.labelled, "usable": report.usable,
                          "patients": report.patients, "trains": report.trains,
                          "rows": [asdict(r) for r in report.rows],
                          "counts": report.counts()}, indent=2))
    else:
        print(format_report(report))
    return 0 if report.trains else 1


if __name__ == "__main__":
    raise SystemExit(main())
