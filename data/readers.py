"""Image readers: a registry of small classes that turn one file or folder into a Volume.

The site reading (data/site_records.py) lists ``images/`` and ``labels/`` with the one
walk every reader shares (data/site_folder.py: no links, regular files only) and asks
each reader, in registry order, whether it ``claims`` a listed entry (a file, or a
directory such as a DICOM series folder); the first that does ``read``s it. A directory
nobody claims is walked into, so nested exports work. Adding a format = one class + one
line in ``READERS``; callers needing reader options pass their own instances to ``load_site``.

Reader protocol:
- ``name: str``
- ``claims(path: Path) -> bool``: cheap (suffix, magic bytes); never raises; never claims
  a symbolic link.
- ``read(path: Path) -> Volume | Iterable[Volume | SkippedFile]``: raise ``ReaderError``
  saying what is wrong; a reader that finds several records under one folder (several
  series) may return several volumes and skip some (``SkippedFile(path, why)``). Reasons
  say why, not where: the loader prefixes the path relative to the site folder. Files
  are opened with ``site_folder.open_regular`` (never a link, pipe or device), and a
  folder is walked with ``site_folder.walk``. A volume may carry an aligned label map in
  ``meta["labels"]`` (a DICOM SEG), used when labels/ has no file of the same name.

A Volume carries no identifiers. The site loader keys a record by its file/folder path
relative to the site (in memory only); a reader that knows two sources belong to one
patient (two series of one PatientID) sets ``meta["patient_key"]`` to a NON-identifying
key (a salted hash) so both become one privacy unit.
"""

from __future__ import annotations

import gzip
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import nibabel
import numpy as np
from PIL import Image

from medgen.data.site_folder import open_regular

# name -> "module:Class", in claim order; imported lazily so a format's heavy imports
# cost only the sites that use it.
READERS: tuple[tuple[str, str], ...] = (
    ("nifti", "medgen.data.readers:NiftiReader"),
    ("png", "medgen.data.readers:PngReader"),
    ("dicom", "medgen.data.dicom.reader:DicomSeriesReader"),  # files and series folders
)


class ReaderError(ValueError):
    """A file or folder cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class Volume:
    """One record as read from disk: float32 (H, W, S), S axial slices of one patient."""

    array: np.ndarray
    spacing: tuple[float, float, float] | None
    source: Path
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedFile:
    """A file or folder that was not used, and why.

    From a reader, ``reason`` says why; in a loaded site (``SiteData.skipped``) it starts
    with the path relative to the site folder ("images/x.nii.gz: contains 3 NaN voxels").
    """

    path: Path
    reason: str


@runtime_checkable
class Reader(Protocol):
    name: str

    def claims(self, path: Path) -> bool: ...

    def read(self, path: Path) -> "Volume | Iterable[Volume | SkippedFile]": ...


def default_readers() -> list[Reader]:
    """Fresh instances of every registered reader, in claim order."""
    readers = []
    for _, target in READERS:
        module_name, class_name = target.split(":")
        readers.append(getattr(importlib.import_module(module_name), class_name)())
    return readers


def find_reader(path: Path, readers: Sequence[Reader]) -> Reader | None:
    for reader in readers:
        try:
            if reader.claims(path):
                return reader
        except Exception:  # claims() must not raise; a reader that does claims nothing
            continue
    return None


def to_volume_array(data: np.ndarray, path: Path) -> np.ndarray:
    """Check a raw array is numeric 2D/3D and return float32 (H, W, S).

    Trailing singleton axes beyond the third (NIfTI often stores (H, W, S, 1)) are
    dropped; anything still above 3D (time series, multi-channel) is refused.
    """
    if data.dtype.kind not in "biuf":
        raise ReaderError(f"pixel type {data.dtype} is not a real number type "
                          "(expected integer or float voxels)")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ReaderError(f"has {data.ndim} dimensions {tuple(data.shape)}; "
                          "expected a 2D image (H,W) or a 3D volume (H,W,S) of one patient")
    if data.size == 0:
        raise ReaderError(f"is empty (shape {tuple(data.shape)})")
    return np.asarray(data, dtype=np.float32)


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _read_bytes(path: Path) -> bytes:
    try:
        with open_regular(path) as handle:
            return handle.read()
    except OSError as err:
        raise ReaderError(f"cannot be read ({err.strerror or err})") from None


def _nifti_from_bytes(data: bytes):
    """A NIfTI-1 or NIfTI-2 image from the bytes of a .nii or .nii.gz file (in memory)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        return nibabel.Nifti1Image.from_bytes(data)
    except Exception:  # not NIfTI-1: try NIfTI-2, else report the NIfTI-1 error
        try:
            return nibabel.Nifti2Image.from_bytes(data)
        except Exception:
            pass
        raise


class NiftiReader:
    """``.nii`` / ``.nii.gz`` through nibabel; scale factors applied (``get_fdata``)."""

    name = "nifti"

    def claims(self, path: Path) -> bool:
        lower = path.name.lower()
        return (lower.endswith(".nii") or lower.endswith(".nii.gz")) and _regular(path)

    def read(self, path: Path) -> Volume:
        try:
            image = _nifti_from_bytes(_read_bytes(path))
            raw_dtype = np.dtype(image.get_data_dtype())
            if raw_dtype.kind not in "biuf":
                raise ReaderError(f"NIfTI data type {raw_dtype} is not a real "
                                  "number type")
            data = np.asarray(image.get_fdata(dtype=np.float32))
            zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
        except ReaderError:
            raise
        except Exception as err:  # nibabel raises many types for damaged files
            raise ReaderError(f"not a readable NIfTI file "
                              f"({type(err).__name__}: {err})") from None
        array = to_volume_array(data, path)
        spacing = (zooms + (1.0, 1.0, 1.0))[:3] if zooms else None
        # only format facts: NIfTI descrip/db_name fields may hold identifiers, never copied
        return Volume(array, spacing, path, {"format": "nifti", "dtype": str(raw_dtype)})


class PngReader:
    """8/16-bit grayscale PNG (RGB accepted only when its channels are equal)."""

    name = "png"

    def claims(self, path: Path) -> bool:
        return path.name.lower().endswith(".png") and _regular(path)

    def read(self, path: Path) -> Volume:
        try:
            with open_regular(path) as handle, Image.open(handle) as image:
                image.load()
                mode = image.mode
                data = np.asarray(image)
        except Exception as err:
            raise ReaderError(f"not a readable PNG file "
                              f"({type(err).__name__}: {err})") from None
        if data.ndim == 3:
            if mode == "LA":
                data = data[..., 0]
            elif data.shape[2] in (3, 4) and np.array_equal(data[..., 0], data[..., 1]) \
                    and np.array_equal(data[..., 0], data[..., 2]):
                data = data[..., 0]
            else:
                raise ReaderError(f"colour PNG (mode {mode}); medgen reads "
                                  "grayscale images only; export it as grayscale")
        # PNG rows are the first axis: (H, W) -> (H, W, 1)
        return Volume(to_volume_array(data, path), None, path, {"format": "png", "mode": mode})
