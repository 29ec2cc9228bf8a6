"""Write real voxels out as DICOM series with synthetic headers (a test corpus, a DICOM site).

No offline source ships a real multi-slice series with full-size pixels (DATA.md), so the
corpus is built honestly: real voxels (the MNI ICBM152 T1 template; real CT pixels in HU
from pydicom's CT_small.dcm) written slice by slice with synthetic but valid headers
(Explicit VR Little Endian, deterministic UIDs from a seeded ``generate_uid``), shuffled
file names without extensions, then damaged on purpose: a missing slice, a truncated file,
a duplicate, PHI-like headers, a burned-in flag, MONOCHROME1, RLE and JPEG 2000.
``export_site_as_dicom`` turns a simulated NIfTI site into the same site as DICOM.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless,
                         MRImageStorage, PYDICOM_IMPLEMENTATION_UID, RLELossless,
                         DigitalXRayImageStorageForPresentation, generate_uid)

UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's documented test root
SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage, "DX": DigitalXRayImageStorageForPresentation}
MNI_T1 = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

# Synthetic PHI: realistic-looking values that must never appear in anything medgen outputs.
PHI = {"PatientName": "Doe^Jane^Q", "PatientID": "MRN-99-123456", "PatientBirthDate": "19610704",
       "InstitutionName": "St Example General Hospital", "ReferringPhysicianName": "House^Gregory",
       "AccessionNumber": "ACC7731904", "StudyID": "ST-4471", "OperatorsName": "Tech^Pat"}


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(seed), *map(str, parts)])


def write_series(volume: np.ndarray, spacing: Sequence[float], out_dir: str | Path, *,
                 modality: str = "MR", rescale_slope: float = 1.0, rescale_intercept: float = 0.0,
                 patient_name: str = "Synthetic^Subject", patient_id: str = "SYNTH-0001",
                 shuffle_names: bool = True, seed: int = 0, photometric: str = "MONOCHROME2",
                 transfer_syntax: str = ExplicitVRLittleEndian, extra: dict | None = None,
                 origin: Sequence[float] = (0.0, 0.0, 0.0)) -> list[Path]:
    """Write a (rows, columns, slices) volume in physical units as one DICOM series.

    Stored values are round((v - intercept) / slope): int16 when any is negative, else
    uint16. Slice k sits at origin + k * spacing[2] along +z (axial, orientation
    1/0/0/0/1/0). MONOCHROME1 stores the mirrored value (65535 - q), so a correct reader
    returns the same physical values either way. Returns the written files in slice order.
    """
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim == 2:
        volume = volume[:, :, None]
    if volume.ndim != 3:
        raise ValueError(f"volume must be (rows, columns, slices); got shape {volume.shape}")
    stored = np.round((volume - rescale_intercept) / rescale_slope)
    signed = bool(stored.min() < 0)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(f"values do not fit {dtype.__name__} with slope {rescale_slope} and "
                         f"intercept {rescale_intercept}: choose another rescale")
    if photometric == "MONOCHROME1":
        if signed:
            raise ValueError("MONOCHROME1 export supports unsigned values only")
        stored = info.max - stored
    stored = stored.astype(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = volume.shape[2]
    names = [f"IM{v:06X}" for v in rng.choice(16 ** 6, size=n, replace=False)] if shuffle_names \
        else [f"slice_{k:04d}.dcm" for k in range(n)]
    study, series, frame = _uid(seed, "study"), _uid(seed, "series"), _uid(seed, "frame")
    written = []
    for k in range(n):
        ds = _slice_dataset(stored[:, :, k], k, spacing, origin, modality=modality,
                            photometric=photometric, signed=signed, slope=rescale_slope,
                            intercept=rescale_intercept, sop_uid=_uid(seed, "sop", k),
                            study=study, series=series, frame=frame,
                            patient_name=patient_name, patient_id=patient_id)
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, generate_instance_uid=False)
        path = out_dir / names[k]
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _slice_dataset(pixels, k, spacing, origin, *, modality, photometric, signed, slope, intercept,
                   sop_uid, study, series, frame, patient_name, patient_id) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS.get(modality, MRImageStorage)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.Modality = modality
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2]) + k * float(spacing[2])]
    ds.SliceLocation = ds.ImagePositionPatient[2]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = float(spacing[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    ds.RescaleType = "HU" if modality == "CT" else "US"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


# ---------------------------------------------------------------------------------------
# Real voxel sources
# ---------------------------------------------------------------------------------------

def mni_t1_volume(stride: int = 6) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The real MNI ICBM152 2009a T1 (Fonov et al. 2009/2011), subsampled by ``stride``."""
    import nibabel

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: pip install nilearn==0.13.1")
    path = Path(list(spec.submodule_search_locations)[0]) / MNI_T1
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install nilearn==0.13.1")
    data = np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float64)
    return data[::stride, ::stride, ::stride], (float(stride),) * 3


def real_ct_hu(size: int = 64, slices: int = 12) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A stack built from the ONE real CT slice pydicom ships (CT_small.dcm, in HU).

    Not a real CT volume (none ships offline): slice k is the real slice shifted k pixels
    down, so every slice holds real HU values and differs from its neighbours (order is
    checkable). Labelled as such wherever it is used.
    """
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    step = hu.shape[0] // size
    hu = hu[::step, ::step][:size, :size]
    stack = np.stack([np.roll(hu, k, axis=0) for k in range(slices)], axis=2)
    return stack, (float(ds.PixelSpacing[0]) * step, float(ds.PixelSpacing[1]) * step, 2.5)


# ---------------------------------------------------------------------------------------
# The test corpus
# ---------------------------------------------------------------------------------------

@dataclass
class CorpusSeries:
    folder: str
    expected: np.ndarray | None     # physical values a correct reader returns (None: refused)
    spacing: tuple[float, float, float]
    modality: str
    problem: str = ""               # a word the refusal reason must contain ("" = usable)
    files: list[str] = field(default_factory=list)


def _expected(volume: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return (np.round((volume - intercept) / slope) * slope + intercept).astype(np.float32)


def build_test_corpus(out_dir: str | Path, stride: int = 6) -> dict[str, CorpusSeries]:
    """Write the DICOM test corpus (issue 7 item 4) under ``out_dir``; return what it holds."""
    out = Path(out_dir)
    mni, mni_spacing = mni_t1_volume(stride)
    ct, ct_spacing = real_ct_hu()
    corpus: dict[str, CorpusSeries] = {}

    def add(name, volume, spacing, seed, modality="MR", slope=0.25, intercept=-100.0,
            problem="", **kwargs) -> list[Path]:
        files = write_series(volume, spacing, out / name, modality=modality, rescale_slope=slope,
                             rescale_intercept=intercept, seed=seed, **kwargs)
        expected = None if problem else _expected(volume, slope, intercept)
        corpus[name] = CorpusSeries(name, expected, tuple(spacing), modality, problem,
                                    [p.relative_to(out).as_posix() for p in files])
        return files

    add("mni_t1", mni, mni_spacing, seed=1)
    add("ct_head", ct, ct_spacing, seed=2, modality="CT", slope=1.0, intercept=-1024.0)
    add("mni_rle", mni, mni_spacing, seed=3, transfer_syntax=RLELossless)
    add("mni_j2k", mni[:, :, :8], mni_spacing, seed=4, transfer_syntax=JPEG2000Lossless)
    add("dx_mono1", mni[:, :, mni.shape[2] // 2], mni_spacing, seed=5, modality="DX", slope=1.0,
        intercept=0.0, photometric="MONOCHROME1")
    add("phi", mni[:, :, :6], mni_spacing, seed=6, patient_name=PHI["PatientName"],
        patient_id=PHI["PatientID"], extra={k: v for k, v in PHI.items()
                                             if k not in ("PatientName", "PatientID")})
    add("burned_in", mni[:, :, :1], mni_spacing, seed=7, problem="BurnedInAnnotation",
                 extra={"BurnedInAnnotation": "YES"})
    missing = add("missing_slice", mni[:, :, :10], mni_spacing, seed=8, problem="missing slice")
    missing[4].unlink()  # slice 5 of 10 lost in transfer
    corpus["missing_slice"].files.remove(missing[4].relative_to(out).as_posix())
    corrupt = add("corrupt_file", mni[:, :, :10], mni_spacing, seed=9, problem="truncated")
    data = corrupt[3].read_bytes()
    corrupt[3].write_bytes(data[: len(data) - 200])  # a copy cut short mid pixel data
    duplicate = add("duplicate_slice", mni[:, :, :6], mni_spacing, seed=10, problem="duplicate")
    shutil.copyfile(duplicate[2], duplicate[2].with_name(duplicate[2].name + "_copy"))
    corpus["duplicate_slice"].files.append(duplicate[2].relative_to(out).as_posix() + "_copy")
    (out / "README.txt").write_text("Export from PACS. Not a DICOM file.\n")
    return corpus


# ---------------------------------------------------------------------------------------
# A simulated site as a DICOM folder
# ---------------------------------------------------------------------------------------

def export_site_as_dicom(nifti_site: str | Path, out_site: str | Path, seed: int = 0) -> int:
    """Write a NIfTI site (images/<subject>.nii.gz) as images/<subject>/ DICOM MR series.

    Each subject becomes a one-series folder (one file per slice, stored values as in the
    NIfTI); labels/ is copied unchanged (NIfTI label maps, matched by subject name). The
    site loader then reads it through the DICOM reader exactly like a hospital export.
    Returns the number of subjects written.
    """
    import nibabel

    src, dst = Path(nifti_site), Path(out_site)
    images = sorted(p for p in (src / "images").iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not images:
        raise FileNotFoundError(f"{src / 'images'} holds no NIfTI images to export")
    for index, path in enumerate(images):
        subject = path.name[:-7] if path.name.endswith(".nii.gz") else path.name[:-4]
        image = nibabel.load(str(path))
        volume = np.asarray(image.get_fdata(dtype=np.float64))
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3]) + (1.0, 1.0, 1.0)
        write_series(volume, zooms[:3], dst / "images" / subject, modality="MR",
                     patient_id=f"SIM-{seed}-{index:05d}", seed=seed * 1_000_003 + index)
    if (src / "labels").is_dir():
        shutil.copytree(src / "labels", dst / "labels", dirs_exist_ok=True)
    return len(images)
