"""The DICOM reader for medgen's reader registry (medgen.data.readers).

A folder (any nesting, any file names) or a single file is scanned, grouped into series,
ordered by geometry and decoded. Every image series becomes one Volume; every series or
file that cannot be used becomes a SkippedFile with its reason. One DICOM series is one
patient record unless two series share a PatientID: then ``meta["patient_key"]`` (a hash
salted with a per-reader random salt, meaningless outside this process) joins them into
one privacy unit. No header value that could identify anyone goes into a Volume, a
reason or a log line.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy import ndimage

from medgen.data.dicom.labels import seg_label_map
from medgen.data.dicom.pixels import PixelDecodeError, PixelOptions, decode_series
from medgen.data.dicom.scan import Problem, ScanResult, is_dicom_file, iter_files, scan_folder
from medgen.data.dicom.series import Series, group_series, series_problems
from medgen.data.readers import ReaderError, SkippedFile, Volume

log = logging.getLogger(__name__)

CLAIM_PROBE_FILES = 32  # claims() must stay cheap: look at this many files at most


@dataclass(frozen=True)
class DicomReadOptions:
    """Reader options (a site's node config can set them).

    allow_burned_in: read images flagged BurnedInAnnotation=YES (default: refuse them).
    window: (center, width) in physical units, e.g. (40, 80) for a CT brain window.
    file_voi: apply the file's own VOI LUT/window instead.
    in_plane_spacing_mm: resample every slice to square pixels of this size (None: keep).
    axial_only: leave out series whose slices are sagittal or coronal (acquisition.py).
    """

    allow_burned_in: bool = False
    window: tuple[float, float] | None = None
    file_voi: bool = False
    in_plane_spacing_mm: float | None = None
    axial_only: bool = True


@dataclass
class SeriesVolume:
    series: Series
    array: np.ndarray                 # float32 (rows, columns, slices)
    labels: np.ndarray | None = None  # int64, same shape, from a DICOM SEG in the same folder


def resample_in_plane(array: np.ndarray, spacing: tuple[float, float, float], target: float,
                      order: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample (H, W, S) in plane to square ``target`` mm pixels (linear or nearest)."""
    zoom = (spacing[0] / target, spacing[1] / target, 1.0)
    out = ndimage.zoom(array, zoom, order=order, mode="nearest", grid_mode=True)
    return out.astype(array.dtype), (target, target, spacing[2])


def read_folder(root: Path, options: DicomReadOptions, salt: bytes,
                only: list[Path] | None = None) -> tuple[list[SeriesVolume], list[Problem]]:
    """Every usable image series under ``root`` (or in its files ``only``), plus every problem."""
    scan: ScanResult = scan_folder(root, salt=salt, only=only)
    problems = list(scan.problems)
    problems.extend(Problem(rel, "not a DICOM file (no DICM preamble); ignored")
                    for rel in scan.other_files)
    volumes: list[SeriesVolume] = []
    all_series = group_series(scan, allow_burned_in=options.allow_burned_in,
                              axial_only=options.axial_only)
    segs = [h for s in all_series if s.is_seg for h in s.headers]
    pixel_options = PixelOptions(window=options.window, file_voi=options.file_voi)
    image_keys = {s.key for s in all_series if not s.is_seg}
    problems.extend(Problem(h.relpath, "segmentation (SEG) whose image series is not in this "
                            "folder: put it next to the images it segments")
                    for h in segs if h.referenced_series_key not in image_keys)
    for series in all_series:
        if series.is_seg:
            continue
        if not series.usable:
            problems.extend(series_problems(series))
            continue
        array, decode_problems = decode_series(root, series, pixel_options)
        if decode_problems:
            problems.extend(decode_problems)
            problems.append(Problem(series.folder, f"series {series.short_id} ({series.modality}): "
                                    f"{len(decode_problems)} image(s) could not be decoded"))
            continue
        labels = None
        for seg in segs:
            if seg.referenced_series_key == series.key:
                try:
                    labels = seg_label_map(root, seg, series)
                except PixelDecodeError as err:
                    problems.append(Problem(seg.relpath, str(err).split(": ", 1)[-1]))
        volumes.append(SeriesVolume(series, array, labels))
    return volumes, problems


class DicomSeriesReader:
    """Registry reader: ``claims`` DICOM files and folders, ``read`` yields one Volume per series."""

    name = "dicom"

    def __init__(self, options: DicomReadOptions | None = None) -> None:
        self.options = options or DicomReadOptions()
        self._salt = secrets.token_bytes(16)  # per reader: joins one patient's series in memory only

    @property
    def cache_token(self) -> str:
        """Name plus options: a site cache keyed on it misses when the options change."""
        o = self.options
        return (f"dicom:burned={o.allow_burned_in}:window={o.window}:voi={o.file_voi}:"
                f"spacing={o.in_plane_spacing_mm}:axial={o.axial_only}")

    def claims(self, path: Path) -> bool:
        path = Path(path)
        if path.is_symlink():
            return False
        if path.is_file():
            return is_dicom_file(path)
        if not path.is_dir():
            return False
        for k, candidate in enumerate(iter_files(path)):  # no link followed, no pipe opened
            if k >= CLAIM_PROBE_FILES:
                break
            if is_dicom_file(candidate):
                return True
        return False

    def read(self, path: Path) -> Iterator[Volume | SkippedFile]:
        """One Volume per usable series; one SkippedFile per problem, its reason saying why
        (the caller names the file, relative to its site)."""
        path = Path(path)
        if path.is_file():  # a lone DICOM file: this file only, not its neighbours
            yield from self._read_single_file(path)
            return
        volumes, problems = read_folder(path, self.options, self._salt)
        for problem in problems:
            log.debug("DICOM skipped: %s: %s", problem.relpath, problem.reason)  # the loader logs it
            yield SkippedFile(path / problem.relpath, problem.reason)
        if not volumes and not problems:
            raise ReaderError("no DICOM image found")
        single = len(volumes) == 1
        for item in volumes:
            yield self._volume(path if single else path / item.series.folder, item)

    def _read_single_file(self, path: Path) -> Iterator[Volume | SkippedFile]:
        volumes, problems = read_folder(path.parent, self.options, self._salt, only=[path])
        for problem in problems:
            yield SkippedFile(path, problem.reason)
        for item in volumes:
            yield self._volume(path, item)

    def _volume(self, source: Path, item: SeriesVolume) -> Volume:
        series, array, labels = item.series, item.array, item.labels
        spacing = series.spacing
        target = self.options.in_plane_spacing_mm
        if target is not None and spacing is not None:
            array, new_spacing = resample_in_plane(array, spacing, target, order=1)
            if labels is not None:
                labels, _ = resample_in_plane(labels, spacing, target, order=0)
            spacing = new_spacing
        meta = {
            "format": "dicom",
            "modality": series.modality,
            "series": series.short_id,
            "slices": len(series.slices),
            "file_count": len(series.files),
            "notes": list(series.notes),
            "patient_key": series.patient_key,
            "units": _units(series.modality, self.options),
        }
        if labels is not None:
            meta["labels"] = labels
        if series.orientation is not None and all(r.position is not None for r in series.slices):
            # patient geometry, per slice in array order: a written-back series keeps it
            meta["orientation"] = series.orientation
            meta["positions"] = [r.position for r in series.slices]
        return Volume(np.ascontiguousarray(array, dtype=np.float32), spacing, source, meta)


def _units(modality: str, options: DicomReadOptions) -> str:
    if options.file_voi:
        return "display (file VOI LUT)"
    return "HU" if modality == "CT" else "rescaled stored values"
