"""Group DICOM headers into series and put their slices in anatomical order.

Order comes from geometry, never from file names or InstanceNumber: each slice's
ImagePositionPatient is projected on the slice normal (the cross product of the row and
column directions in ImageOrientationPatient, PS3.3 C.7.6.2.1.1), and the slices are
sorted along it. The slice spacing is the median step; a step over 1.5x the median is a
missing slice, a zero step a duplicate. A series whose slices disagree on orientation,
size or pixel spacing is not a volume and is refused with the reason.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from medgen.data.dicom.acquisition import acquisition_problems
from medgen.data.dicom.headers import DicomHeader
from medgen.data.dicom.scan import Problem, ScanResult

GAP_FACTOR = 1.5          # a step > 1.5x the median spacing means slices are missing
ORIENTATION_TOL = 1e-3    # direction cosines that differ by more are another orientation
SPACING_REL_TOL = 1e-3    # pixel spacings that differ by more (relative) are inconsistent
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class SliceRef:
    """One 2D image of a series: a file and, for multi-frame files, the frame index."""

    relpath: str
    frame: int
    offset_mm: float | None  # position along the slice normal (None without geometry)
    position: tuple[float, float, float] | None = None  # ImagePositionPatient (mm)


@dataclass
class Series:
    key: str = field(repr=False)          # salted SeriesInstanceUID hash (in memory only)
    patient_key: str = field(repr=False)  # salted PatientID hash (in memory only)
    modality: str
    headers: list[DicomHeader] = field(repr=False)
    slices: list[SliceRef] = field(default_factory=list)
    rows: int = 0
    columns: int = 0
    spacing: tuple[float, float, float] | None = None  # (row, column, slice) in mm
    orientation: tuple[float, ...] | None = None
    problems: list[str] = field(default_factory=list)  # any problem makes the series unusable
    notes: list[str] = field(default_factory=list)     # worth knowing, not blocking

    @property
    def short_id(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:8]

    @property
    def files(self) -> list[str]:
        """Every file of the series (the cache key must cover them all)."""
        return sorted(h.relpath for h in self.headers)

    @property
    def folder(self) -> str:
        parents = {h.relpath.rsplit("/", 1)[0] if "/" in h.relpath else "." for h in self.headers}
        return parents.pop() if len(parents) == 1 else f"{len(parents)} folders"

    @property
    def is_seg(self) -> bool:
        return all(h.is_seg for h in self.headers)

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.rows, self.columns, len(self.slices))


def group_series(scan: ScanResult, allow_burned_in: bool = False,
                 axial_only: bool = True) -> list[Series]:
    """Group the scanned headers by series and order/check each one; localizers, secondary
    captures and (``axial_only``) non-axial series get their reason (acquisition.py)."""
    groups: dict[str, list[DicomHeader]] = defaultdict(list)
    for header in scan.headers:
        groups[header.series_key].append(header)
    out = []
    for key, headers in groups.items():
        headers.sort(key=lambda h: h.relpath)
        series = Series(key=key, patient_key=headers[0].patient_key,
                        modality=Counter(h.modality for h in headers).most_common(1)[0][0],
                        headers=headers)
        if not key:
            series.problems.append("SeriesInstanceUID missing: files cannot be grouped safely")
        _check_pixels(series, allow_burned_in)
        if not series.is_seg:
            _order_slices(series)
            series.problems[:0] = acquisition_problems(series, axial_only)  # the first reason
        out.append(series)
    out.sort(key=lambda s: (s.folder, s.files[0]))
    return out


def _example(headers: list[DicomHeader], n: int = 2) -> str:
    names = [h.relpath for h in headers[:n]]
    more = f" and {len(headers) - n} more" if len(headers) > n else ""
    return ", ".join(names) + more


def _check_pixels(series: Series, allow_burned_in: bool) -> None:
    headers = series.headers
    sizes = Counter((h.rows, h.columns) for h in headers)
    if len(sizes) > 1:
        desc = "; ".join(f"{r}x{c} in {n} file(s)" for (r, c), n in sizes.most_common())
        series.problems.append(f"inconsistent image size across the series ({desc})")
    series.rows, series.columns = sizes.most_common(1)[0][0]
    colour = [h for h in headers if h.photometric not in GREYSCALE or h.samples_per_pixel != 1]
    if colour:
        series.problems.append(
            f"not greyscale (PhotometricInterpretation {colour[0].photometric}): medgen trains on "
            f"MONOCHROME1/2 images only ({_example(colour)})")
    unknown = [h for h in headers if h.burned_in_annotation == "unknown"]
    if unknown:
        series.notes.append(f"{series.modality} images without a BurnedInAnnotation flag: check "
                            "them for burned-in text")
    burned = [h for h in headers if h.burned_in_annotation == "yes"]
    if burned and not allow_burned_in:
        series.problems.append(
            f"BurnedInAnnotation=YES: the pixels may show patient identifiers ({_example(burned)}); "
            "de-identify the pixels or allow burned-in images explicitly")


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    return normal / (np.linalg.norm(normal) or 1.0)


def _order_slices(series: Series) -> None:
    frames = [(h, i, f) for h in series.headers for i, f in enumerate(h.frames)]
    spacings = [f.pixel_spacing for _, _, f in frames]
    if any(s is None or min(s) <= 0 for s in spacings):
        series.notes.append("PixelSpacing missing or zero: in-plane spacing unknown")
        pixel = None
    else:
        ref = np.asarray(spacings[0])
        bad = [h for (h, _, _), s in zip(frames, spacings)
               if np.any(np.abs(np.asarray(s) - ref) > SPACING_REL_TOL * ref)]
        if bad:
            series.problems.append(f"inconsistent PixelSpacing across the series ({_example(bad)})")
        pixel = (float(ref[0]), float(ref[1]))

    has_geometry = [f.position is not None and f.orientation is not None for _, _, f in frames]
    if not any(has_geometry):
        _order_without_geometry(series, frames, pixel)
        return
    if not all(has_geometry):
        missing = [h for (h, _, _), ok in zip(frames, has_geometry) if not ok]
        series.problems.append(
            f"ImagePositionPatient/ImageOrientationPatient missing in {len(missing)} image(s) "
            f"({_example(missing)}): slices cannot be ordered")
        return
    ref_orientation = np.asarray(frames[0][2].orientation)
    tilted = [h for h, _, f in frames
              if np.max(np.abs(np.asarray(f.orientation) - ref_orientation)) > ORIENTATION_TOL]
    if tilted:
        series.problems.append(
            f"inconsistent ImageOrientationPatient across the series ({_example(tilted)}): "
            "not one stack of parallel slices")
        return
    series.orientation = tuple(float(v) for v in ref_orientation)
    normal = _normal(series.orientation)
    offsets = np.array([float(np.dot(normal, f.position)) for _, _, f in frames])
    order = np.argsort(offsets, kind="stable")
    series.slices = [SliceRef(frames[k][0].relpath, frames[k][1], float(offsets[k]),
                              tuple(float(v) for v in frames[k][2].position)) for k in order]
    steps = np.diff(offsets[order])
    slice_spacing = _check_steps(series, steps)
    if pixel is not None and slice_spacing is not None:
        series.spacing = (pixel[0], pixel[1], slice_spacing)
    elif pixel is not None:
        series.spacing = (pixel[0], pixel[1], _thickness(series))


def _check_steps(series: Series, steps: np.ndarray) -> float | None:
    if steps.size == 0:
        return None
    positive = steps[steps > 1e-3]
    spacing = float(np.median(positive)) if positive.size else 0.0
    tol = max(1e-3, 1e-2 * spacing)
    slices = series.slices
    for k, step in enumerate(steps):
        a, b = slices[k], slices[k + 1]
        if step <= tol:
            same = _header(series, a.relpath).instance_key == _header(series, b.relpath).instance_key
            what = "the same image (SOPInstanceUID) stored twice" if same and a.relpath != b.relpath \
                else "two images at the same position"
            series.problems.append(f"duplicate slice: {what} at {a.offset_mm:.2f} mm "
                                   f"({_frame_name(a)}, {_frame_name(b)})")
        elif spacing > 0 and step > GAP_FACTOR * spacing:
            missing = int(round(step / spacing)) - 1
            series.problems.append(
                f"missing slice(s): a gap of {step:.2f} mm between {_frame_name(a)} and "
                f"{_frame_name(b)} where the spacing is {spacing:.2f} mm (about {max(missing, 1)} "
                "slice(s) missing)")
    if positive.size and np.max(np.abs(positive - spacing)) > 0.1 * spacing and not series.problems:
        series.notes.append("slice spacing varies by more than 10 %; median used")
    return spacing if spacing > 0 else None


def _order_without_geometry(series: Series, frames, pixel) -> None:
    if len(series.headers) > 1:
        series.problems.append(
            f"{len(series.headers)} images without slice geometry (ImagePositionPatient/"
            "ImageOrientationPatient): they cannot be assembled into one volume")
        return
    series.slices = [SliceRef(h.relpath, i, None) for h, i, _ in frames]
    if len(frames) > 1:
        series.notes.append("multi-frame image without per-frame geometry: stored frame order kept")
    if pixel is not None:
        series.spacing = (pixel[0], pixel[1], _thickness(series))


def _thickness(series: Series) -> float:
    # A single slice has no step: use its SliceThickness, and say so when even that is absent.
    thickness = series.headers[0].frames[0].thickness if series.headers[0].frames else None
    if thickness is None or not thickness > 0:
        series.notes.append("slice thickness unknown: 1 mm assumed")
        return 1.0
    return float(thickness)


def _header(series: Series, relpath: str) -> DicomHeader:
    return next(h for h in series.headers if h.relpath == relpath)


def _frame_name(ref: SliceRef) -> str:
    return ref.relpath if ref.frame == 0 else f"{ref.relpath} frame {ref.frame + 1}"


def series_problems(series: Series) -> list[Problem]:
    """The series' blocking problems as Problem records (named by its folder)."""
    return [Problem(series.folder, f"series {series.short_id} ({series.modality}): {reason}")
            for reason in series.problems]
