"""NIfTI in physical units: files that say honestly what they hold, written deterministically.

A generated or translated image leaves the network in [-1, 1]; its ``IntensityMap``
inverse (medgen.data.intensity) gives physical values; ``write_physical_nifti`` stores
them: HU as int16 with scl_slope = 1 and scl_inter = 0 written explicitly (a reader that
applies the scaling gets HU; so does one that does not), other units as float32.
``write_nifti`` is the deterministic writer underneath (gzip without a timestamp), also
used by the simulated federations and the public bank. DICOM: medgen.data.dicom_writer.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Sequence

import numpy as np

from medgen.atomic import atomic_write_bytes

SCL_OFFSET = 112  # byte offset of scl_slope (then scl_inter) in a NIfTI-1 header
INT16 = np.iinfo(np.int16)


def nifti_bytes(array: np.ndarray, spacing: Sequence[float], description: str = "") -> bytes:
    """A gzipped NIfTI of ``array`` (2D or 3D) with affine diag(spacing), deterministic.

    Integer arrays get an explicit identity scaling (scl_slope 1, scl_inter 0): their
    stored values are their physical values.
    """
    import nibabel as nib

    array = np.ascontiguousarray(array)
    zooms = [float(s) for s in spacing] + [1.0] * (3 - len(spacing))
    affine = np.diag(zooms[:3] + [1.0])
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    if description:
        image.header["descrip"] = description.encode("ascii")[:79]
    raw = bytearray(image.to_bytes())
    if array.dtype.kind in "iu":
        # nibabel writes NaN ("no scaling") for unscaled data; some readers mishandle NaN,
        # so the header says 1 and 0 outright (scl_slope/scl_inter: header bytes 112..120)
        raw[SCL_OFFSET:SCL_OFFSET + 8] = np.array([1.0, 0.0], image.header.endianness + "f4").tobytes()
    return gzip.compress(bytes(raw), compresslevel=6, mtime=0)


def write_nifti(path: str | Path, array: np.ndarray, spacing: Sequence[float],
                description: str = "", atomic: bool = True) -> Path:
    """Write ``nifti_bytes`` to ``path``; ``atomic=False`` inside a staging folder that is
    renamed into place as a whole (a federation build), where per-file fsyncs only cost."""
    data = nifti_bytes(array, spacing, description)
    if atomic:
        return atomic_write_bytes(path, data)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def hu_to_int16(hu: np.ndarray) -> np.ndarray:
    """Round HU to int16, refusing values int16 cannot hold (no silent wrap-around)."""
    rounded = np.rint(np.asarray(hu, np.float64))
    if rounded.size and (rounded.min() < INT16.min or rounded.max() > INT16.max):
        raise ValueError(f"HU values {rounded.min():g}..{rounded.max():g} do not fit int16")
    return rounded.astype(np.int16)


def write_physical_nifti(path: str | Path, physical: np.ndarray, spacing: Sequence[float],
                         units: str) -> Path:
    """HU -> int16 NIfTI (identity scaling); any other units -> float32 NIfTI."""
    if units == "HU":
        return write_nifti(path, hu_to_int16(physical), spacing, description="medgen HU")
    return write_nifti(path, np.asarray(physical, np.float32), spacing,
                       description=f"medgen {units}")


def read_physical_nifti(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Physical values (scaling applied, float64) and voxel spacing of a NIfTI file."""
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.get_fdata(dtype=np.float64)), tuple(float(z) for z in image.header.get_zooms())
