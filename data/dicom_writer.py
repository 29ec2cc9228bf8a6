"""Write images as one DICOM series with honest Rescale Slope/Intercept.

A reader applies the modality LUT (physical = stored * RescaleSlope + RescaleIntercept)
and gets the physical values back. ``write_physical_dicom`` chooses the stored values:
unsigned 16 bit, HU with slope 1 and intercept -1024 (the usual CT convention, lower when
the image goes below -1024; RescaleType "HU"), arbitrary units spread over 0..65535
(error at most half a slope step). Headers are synthetic but valid (Explicit VR Little
Endian, one axial slice per file, geometry from the spacing, ImageType DERIVED), UIDs
derive from ``seed`` so the same call writes the same bytes, and no identifier of a real
patient is ever written: the caller names the series.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, MRImageStorage,
                         PYDICOM_IMPLEMENTATION_UID, SecondaryCaptureImageStorage, generate_uid)

HU_INTERCEPT = -1024.0
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's documented root for generated UIDs
SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


def write_series(stored: np.ndarray, spacing: Sequence[float], out_dir: str | Path, *,
                 modality: str, slope: float, intercept: float, seed: int,
                 patient_id: str = "MEDGEN-GENERATED", description: str = "medgen",
                 window: tuple[float, float] | None = None) -> list[Path]:
    """Write ``stored`` (rows, columns[, slices]) uint16/int16 as slice_NNNN.dcm files.

    ``spacing`` is (row mm, column mm[, slice mm]); ``window`` (physical lo, hi) becomes
    the default display window. Returns the files in slice order.
    """
    stored = np.asarray(stored)
    if stored.ndim == 2:
        stored = stored[:, :, None]
    if stored.ndim != 3 or stored.dtype not in (np.uint16, np.int16):
        raise ValueError(f"stored values must be a 2D/3D uint16 or int16 array, got "
                         f"{stored.dtype} {stored.shape}")
    spacing = tuple(float(s) for s in spacing) + (1.0,) * (3 - len(spacing))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study, series, frame = (_uid(seed, part) for part in ("study", "series", "frame"))
    files = []
    for k in range(stored.shape[2]):
        ds = _slice(stored[:, :, k], k, spacing, modality=modality, slope=slope,
                    intercept=intercept, sop=_uid(seed, "sop", k), study=study, series=series,
                    frame=frame, patient_id=patient_id, description=description)
        if window is not None:
            ds.WindowCenter = f"{(window[0] + window[1]) / 2:.6g}"
            ds.WindowWidth = f"{window[1] - window[0]:.6g}"
        path = out / f"slice_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def dicom_rescale(physical: np.ndarray, units: str) -> tuple[np.ndarray, float, float]:
    """(stored uint16, slope, intercept) such that stored * slope + intercept ~ physical."""
    values = np.asarray(physical, np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("cannot write an empty image or one holding NaN/inf as DICOM")
    if units == "HU":
        intercept = min(HU_INTERCEPT, float(np.floor(values.min())))
        stored = np.rint(values) - intercept
        if stored.max() > 65535:
            raise ValueError(f"HU range {values.min():g}..{values.max():g} exceeds 16 bits")
        return stored.astype(np.uint16), 1.0, intercept
    low, high = float(values.min()), float(values.max())
    slope = (high - low) / 65535.0 if high > low else 1.0
    return np.rint((values - low) / slope).astype(np.uint16), slope, low


def write_physical_dicom(out_dir: str | Path, physical: np.ndarray, spacing: Sequence[float], *,
                         modality: str, units: str, seed: int = 0,
                         window: tuple[float, float] | None = None,
                         description: str = "medgen generated") -> list[Path]:
    """One DICOM series (one file per axial slice) of ``physical`` (rows, cols[, slices])."""
    stored, slope, intercept = dicom_rescale(physical, units)
    return write_series(stored, spacing, out_dir, modality=modality, slope=slope,
                        intercept=intercept, seed=seed, window=window, description=description)


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(seed), *map(str, parts)])


def _slice(pixels: np.ndarray, k: int, spacing: tuple[float, float, float], *, modality: str,
           slope: float, intercept: float, sop: str, study: str, series: str, frame: str,
           patient_id: str, description: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS.get(modality, SecondaryCaptureImageStorage)
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientName, ds.PatientID = "Generated^Image", patient_id
    ds.Modality, ds.SeriesDescription = modality, description
    ds.ImageType = ["DERIVED", "SECONDARY"]  # generated by medgen, not acquired
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, k * spacing[2]]
    ds.SliceLocation = k * spacing[2]
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.SliceThickness = spacing[2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    ds.RescaleType = "HU" if modality == "CT" else "US"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds
