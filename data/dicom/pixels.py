"""Decode a series' pixels into a float32 volume in physical units.

Per frame: stored values -> Modality LUT or rescale (PS3.3 C.11.1; Enhanced objects carry
the rescale per frame in PixelValueTransformationSequence, which pydicom's
``apply_modality_lut`` does not read, so slope/intercept come from the header records)
-> optional window -> MONOCHROME1 inversion. CT comes out in Hounsfield units. The
decoders for JPEG, JPEG-LS, JPEG 2000 and RLE are pydicom's, backed by pylibjpeg.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from medgen.data.dicom.headers import FrameInfo
from medgen.data.dicom.scan import Problem
from medgen.data.dicom.series import Series
from medgen.data.site_folder import open_regular


@dataclass(frozen=True)
class PixelOptions:
    """How stored values become the volume medgen trains on.

    window: (center, width) in physical units (HU for CT): values are clipped to
        [center - width/2, center + width/2] and stay in physical units. None: no window.
    file_voi: apply the file's own VOI LUT or first window (display values, PS3.3 C.11.2).
    """

    window: tuple[float, float] | None = None
    file_voi: bool = False


class PixelDecodeError(ValueError):
    """A file's pixel data cannot be decoded; the message names the file and why."""


def stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def modality_transform(arr: np.ndarray, ds: Dataset, frame: FrameInfo) -> np.ndarray:
    """Stored values -> physical values for one frame (float64)."""
    if frame.slope is not None and frame.intercept is not None:
        return arr.astype(np.float64) * frame.slope + frame.intercept
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(arr, ds).astype(np.float64)
    return arr.astype(np.float64)


def frame_values(arr: np.ndarray, ds: Dataset, frame: FrameInfo, options: PixelOptions) -> np.ndarray:
    """One decoded frame (stored values) -> float32 in physical (or display) units."""
    values = modality_transform(arr, ds, frame)
    low, high = stored_range(ds)
    bounds = modality_transform(np.array([low, high]), ds, frame)
    lo, hi = float(np.min(bounds)), float(np.max(bounds))
    if options.file_voi and (ds.get("VOILUTSequence") or "WindowCenter" in ds):
        # pydicom's VOI LUT indexes by value: give it integers when the values are integral
        integral = np.array_equal(values, np.round(values))
        values = apply_voi_lut(values.astype(np.int64) if integral else values, ds).astype(np.float64)
        lo, hi = float(np.min(values)), float(np.max(values))
    if options.window is not None:
        center, width = options.window
        lo, hi = center - width / 2.0, center + width / 2.0
        values = np.clip(values, lo, hi)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        # MONOCHROME1 shows high values dark: mirror within the value range so that
        # bright means high signal, as in every MONOCHROME2 image medgen trains on.
        values = (lo + hi) - values
    return values.astype(np.float32)


def _decode_error(relpath: str, err: Exception) -> PixelDecodeError:
    text = str(err)
    if "less than expected" in text or "truncat" in text.lower() or isinstance(err, EOFError):
        why = "pixel data truncated (the file is shorter than its header says: corrupt copy?)"
    elif "missing" in text.lower() and "plugin" in text.lower() or "No suitable" in text:
        why = ("no decoder installed for its transfer syntax (install pylibjpeg, "
               "pylibjpeg-libjpeg, pylibjpeg-openjpeg)")
    else:
        why = f"pixel data cannot be decoded ({type(err).__name__}: {text[:160]})"
    return PixelDecodeError(f"{relpath}: {why}")


def read_frames(path: Path, relpath: str) -> tuple[Dataset, np.ndarray]:
    """Read a file and return its dataset and pixels as (frames, rows, cols)."""
    try:
        with open_regular(path) as handle:  # never a link or a pipe, even if swapped since the scan
            ds = pydicom.dcmread(handle)
            arr = ds.pixel_array
    except Exception as err:  # decoders raise many types on damaged data
        raise _decode_error(relpath, err) from None
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames == 1 and arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise PixelDecodeError(f"{relpath}: unexpected pixel array shape {arr.shape}")
    return ds, arr


def decode_series(root: Path, series: Series, options: PixelOptions) -> tuple[np.ndarray, list[Problem]]:
    """The series as float32 (rows, columns, slices) in slice order, or problems.

    Each file is read once even when it holds many frames. Any undecodable file makes
    the volume incomplete: the array is returned empty and every bad file is reported.
    """
    headers = {h.relpath: h for h in series.headers}
    by_file: dict[str, list[tuple[int, int]]] = {}
    for index, ref in enumerate(series.slices):
        by_file.setdefault(ref.relpath, []).append((index, ref.frame))
    volume = np.empty((series.rows, series.columns, len(series.slices)), dtype=np.float32)
    problems: list[Problem] = []
    for relpath, wanted in by_file.items():
        try:
            ds, arr = read_frames(root / relpath, relpath)
        except PixelDecodeError as err:
            problems.append(Problem(relpath, str(err).split(": ", 1)[1]))
            continue
        if arr.shape[1:] != (series.rows, series.columns):
            problems.append(Problem(relpath, f"pixel array {arr.shape[1:]} does not match Rows/"
                                             f"Columns {series.rows}x{series.columns}"))
            continue
        frames = headers[relpath].frames
        for index, frame in wanted:
            volume[:, :, index] = frame_values(arr[frame], ds, frames[frame], options)
    if problems:
        return np.empty((0, 0, 0), dtype=np.float32), problems
    return volume, problems
