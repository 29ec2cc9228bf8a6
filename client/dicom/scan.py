"""Walk a folder as it comes out of a PACS export and read every DICOM header in it.

File names mean nothing in a PACS export (``IM000123``, ``1.2.840...``, no extension), so
every regular file is tried: a DICOM file starts with a 128-byte preamble and ``DICM``
(PS3.10 7.1); files without it are reported as not DICOM, never guessed at. Nothing is
opened for writing. Problems are reported by the path relative to the scanned folder (the
hospital's own path, fine for local logs, never sent anywhere).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pydicom.errors import InvalidDicomError

from medgen.client.dicom.headers import DicomHeader, read_header

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class Problem:
    """A file (or series) that cannot be used, and why, in words a site admin can act on."""

    relpath: str
    reason: str


@dataclass
class ScanResult:
    root: Path
    headers: list[DicomHeader] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)  # not DICOM (NIfTI, PNG, README...)
    salt: bytes = field(default=b"", repr=False)


def is_dicom_file(path: Path) -> bool:
    """True if the file has the PS3.10 preamble + 'DICM' magic."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under root, lazily, sorted per folder; hidden files are skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def scan_folder(root: str | os.PathLike, salt: bytes | None = None) -> ScanResult:
    """Read the header of every DICOM file under ``root`` (recursively, any file names).

    ``salt`` keys the in-memory hashes of identifiers; a fresh random salt per scan by
    default, so the keys cannot be linked across runs or to the original UIDs.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM folder {root} does not exist or is not a directory")
    result = ScanResult(root=root, salt=salt if salt is not None else secrets.token_bytes(16))
    for path in iter_files(root):
        rel = path.relative_to(root).as_posix()
        if not is_dicom_file(path):
            result.other_files.append(rel)
            continue
        try:
            header = read_header(path, rel, result.salt)
        except (InvalidDicomError, OSError, ValueError, TypeError, KeyError, AttributeError,
                EOFError) as err:
            result.problems.append(Problem(rel, f"unreadable DICOM header ({type(err).__name__})"))
            continue
        if header.sop_class_uid == DICOMDIR_SOP_CLASS:
            result.problems.append(Problem(rel, "DICOMDIR index file (not an image); ignored"))
            continue
        if not header.has_pixels:
            result.problems.append(Problem(
                rel, f"no image pixels (modality {header.modality}: report, plan or structure set)"))
            continue
        result.headers.append(header)
    return result
