"""Read the header of one DICOM file into a small, non-identifying record.

Only what grouping, sorting, decoding and telling acquisitions from other objects need is
kept: geometry, pixel format, modality, ImageType and the SOP class.
Identifiers are reduced at once: the SeriesInstanceUID and PatientID are kept only as
hashes salted with a per-scan random salt (``scan_folder`` draws it), so they group files in
memory but mean nothing outside this process and are never printed (``repr=False``).
Enhanced multi-frame objects carry their geometry and rescale per frame in functional
groups (PS3.3 C.7.6.16); both the shared and the per-frame groups are read here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from medgen.data.site_folder import open_regular
from medgen.privacy.deid import burned_in_annotation_status

Vec3 = tuple[float, float, float]
Vec6 = tuple[float, float, float, float, float, float]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class FrameInfo:
    """Geometry and value transform of one frame (a classic file has exactly one)."""

    position: Vec3 | None
    orientation: Vec6 | None
    pixel_spacing: tuple[float, float] | None
    slope: float | None = None
    intercept: float | None = None
    segment: int | None = None  # DICOM SEG: the segment number this frame belongs to
    thickness: float | None = None


@dataclass(frozen=True)
class DicomHeader:
    relpath: str
    series_key: str = field(repr=False)   # salted hash of SeriesInstanceUID (in memory only)
    patient_key: str = field(repr=False)  # salted hash of PatientID (in memory only)
    instance_key: str = field(repr=False)  # salted hash of SOPInstanceUID (duplicate files)
    modality: str
    sop_class_uid: str
    transfer_syntax: str
    rows: int
    columns: int
    frames: tuple[FrameInfo, ...]
    photometric: str
    samples_per_pixel: int
    bits_allocated: int
    burned_in_annotation: str  # "yes", "no" or "unknown" (medgen.privacy.deid's rule)
    instance_number: int | None
    has_pixels: bool
    image_type: tuple[str, ...] = ()   # ImageType values, upper case (LOCALIZER: a scout)
    referenced_series_key: str | None = field(default=None, repr=False)  # SEG -> image series

    @property
    def is_seg(self) -> bool:
        return self.sop_class_uid == SEG_SOP_CLASS or self.modality == "SEG"

    @property
    def number_of_frames(self) -> int:
        return len(self.frames)


def salted_key(salt: bytes, value: Any) -> str:
    """A short, salted, one-way key for an identifier; empty values map to ''."""
    text = "" if value is None else str(value).strip()
    if not text:
        return ""
    return hashlib.sha256(salt + text.encode("utf-8", "replace")).hexdigest()[:16]


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return items if len(items) == n else None


def _first(ds: Dataset | None, sequence: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(sequence)
    return seq[0] if seq else None


def _frame_info(item: Dataset | None, shared: Dataset | None, top: Dataset) -> FrameInfo:
    """Per-frame groups override shared ones, which override the top-level attributes."""
    def lookup(sequence: str, keyword: str) -> Any:
        for group in (item, shared):
            entry = _first(group, sequence)
            if entry is not None and keyword in entry:
                return entry.get(keyword)
        return top.get(keyword)

    slope = lookup("PixelValueTransformationSequence", "RescaleSlope")
    intercept = lookup("PixelValueTransformationSequence", "RescaleIntercept")
    segment_item = _first(item, "SegmentIdentificationSequence")
    return FrameInfo(
        position=_floats(lookup("PlanePositionSequence", "ImagePositionPatient"), 3),
        orientation=_floats(lookup("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
        pixel_spacing=_floats(lookup("PixelMeasuresSequence", "PixelSpacing"), 2)
        or _floats(top.get("ImagerPixelSpacing"), 2),
        slope=None if slope is None else float(slope),
        intercept=None if intercept is None else float(intercept),
        segment=None if segment_item is None else int(segment_item.ReferencedSegmentNumber),
        thickness=_float_or_none(lookup("PixelMeasuresSequence", "SliceThickness")),
    )


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _image_type(value: Any) -> tuple[str, ...]:
    """ImageType as upper-case strings: multi-valued (ORIGINAL\\PRIMARY\\LOCALIZER), single, or absent."""
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip().upper() for v in items if str(v).strip())


def frame_infos(ds: Dataset) -> tuple[FrameInfo, ...]:
    """Geometry per frame, reading Enhanced functional groups when present."""
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 1
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != n_frames:
        raise ValueError(f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items "
                         f"but NumberOfFrames is {n_frames}")
    if per_frame or shared is not None:
        items = list(per_frame) or [None] * n_frames
        return tuple(_frame_info(item, shared, ds) for item in items)
    # Classic (or multi-frame without functional groups): one geometry for all frames.
    return tuple(_frame_info(None, None, ds) for _ in range(n_frames))


def read_header(path, relpath: str, salt: bytes) -> DicomHeader:
    """Read one file's header (no pixel data). Raises pydicom/OS/Value errors on bad files."""
    with open_regular(path) as handle:  # never a link or a pipe (data/site_folder.py)
        ds = pydicom.dcmread(handle, stop_before_pixels=True)
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "")
                                                   if meta is not None else ""))
    ref_series = None
    ref_item = _first(ds, "ReferencedSeriesSequence")
    if ref_item is not None and "SeriesInstanceUID" in ref_item:
        ref_series = salted_key(salt, ref_item.SeriesInstanceUID)
    number = ds.get("InstanceNumber")
    try:
        instance_number = None if number in (None, "") else int(number)
    except (TypeError, ValueError):
        instance_number = None
    rows, columns = ds.get("Rows"), ds.get("Columns")
    return DicomHeader(
        relpath=relpath,
        series_key=salted_key(salt, ds.get("SeriesInstanceUID")),
        patient_key=salted_key(salt, ds.get("PatientID")),
        instance_key=salted_key(salt, ds.get("SOPInstanceUID")),
        modality=str(ds.get("Modality", "") or "").upper() or "OT",
        sop_class_uid=sop_class,
        transfer_syntax=ts,
        rows=int(rows or 0),
        columns=int(columns or 0),
        frames=frame_infos(ds) if rows and columns else (),
        photometric=str(ds.get("PhotometricInterpretation", "") or ""),
        samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
        bits_allocated=int(ds.get("BitsAllocated") or 0),
        burned_in_annotation=burned_in_annotation_status(ds),
        instance_number=instance_number,
        has_pixels=bool(rows and columns),
        image_type=_image_type(ds.get("ImageType")),
        referenced_series_key=ref_series,
    )
