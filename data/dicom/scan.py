"""Walk a folder as it comes out of a PACS export and read every DICOM header in it.

File names mean nothing in a PACS export (``IM000123``, ``1.2.840...``, no extension), so
every regular file is tried: a DICOM file starts with a 128-byte preamble and ``DICM``
(PS3.10 7.1); files without it are reported as not DICOM, never guessed at. The folder is
walked by the walk every reader of a site shares (data/site_folder.py): no symbolic link
is followed, a FIFO, socket or device is reported from its ``lstat`` and never opened
(opening a FIFO blocks forever), and a file that cannot be read is reported, not raised.
Nothing is opened for writing. Problems are reported by the path relative to the scanned
folder (the hospital's own path, fine for local logs, never sent anywhere).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from pydicom.errors import InvalidDicomError

from medgen.data.dicom.headers import DicomHeader, read_header
from medgen.data.site_folder import (Entry, NotRegularFile, open_regular, regular_files,
                                       unreadable_reason)

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


def read_preamble(path: Path) -> bytes:
    """The first 132 bytes of the regular file ``path`` (OSError if it cannot be read)."""
    with open_regular(path) as handle:
        return handle.read(132)


def is_dicom_file(path: Path) -> bool:
    """True if ``path`` is a readable regular file with the PS3.10 preamble + 'DICM' magic."""
    try:
        head = read_preamble(Path(path))
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under root, lazily, sorted per folder; links, special and hidden
    files are left out (``scan_folder`` reports them)."""
    return (entry.path for entry in regular_files(Path(root)) if entry.kind == "file")


def scan_folder(root: str | os.PathLike, salt: bytes | None = None,
                only: Sequence[Path] | None = None) -> ScanResult:
    """Read the header of every DICOM file under ``root`` (recursively, any file names).

    ``salt`` keys the in-memory hashes of identifiers; a fresh random salt per scan by
    default, so the keys cannot be linked across runs or to the original UIDs.
    ``only``: scan just these files of ``root`` (a lone DICOM file), not the whole folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM folder {root} does not exist or is not a directory")
    result = ScanResult(root=root, salt=salt if salt is not None else secrets.token_bytes(16))
    entries = regular_files(root) if only is None else (Entry(Path(p), "file") for p in only)
    for entry in entries:
        rel = entry.path.relative_to(root).as_posix()
        if entry.kind == "skip":
            result.problems.append(Problem(rel, entry.reason))
            continue
        try:
            head = read_preamble(entry.path)
        except NotRegularFile as err:  # swapped for a pipe or link since it was listed
            result.problems.append(Problem(rel, str(err)))
            continue
        except OSError as err:
            result.problems.append(Problem(rel, unreadable_reason(err)))
            continue
        if len(head) != 132 or head[128:132] != b"DICM":
            result.other_files.append(rel)
            continue
        try:
            header = read_header(entry.path, rel, result.salt)
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
