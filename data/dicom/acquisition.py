"""Is a DICOM series a real axial acquisition? Hospital exports mix in other objects.

A PACS export of one CT study holds, beside the axial images, the scout (localizer) the
technologist planned on, screenshots of the console or of a 3D rendering saved as
secondary captures, and often reformats in other planes. Each has pixels and a plausible
Modality, so a reader that only checks "has pixels" trains on them. Left out here, each
with the reason:

- localizer / scout: any image whose ImageType holds LOCALIZER (PS3.3 C.8.2.1.1.1; CT and
  MR scouts and the topogram all say so);
- secondary capture: SOP Class 1.2.840.10008.5.1.4.1.1.7 and its multi-frame variants
  .7.1 to .7.4 (PS3.4 B.5): a picture of something, not an acquisition, whatever its
  Modality says (often OT, sometimes the study's CT);
- not axial: the slice normal (ImageOrientationPatient's row x column) points mostly along
  patient x (sagittal) or y (coronal). Every recipe trains on axial slices; a coronal
  reformat next to the axial series would teach another anatomy. Gantry tilt is fine: the
  normal only has to point mostly along z. ``axial_only=False`` keeps other planes.

Modality (CT vs MR, NM, CR...) is the manifest's business and is checked per record
(data/site_records.py); these rules hold whatever the manifest says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # series.py imports this module; the type is only needed for annotations
    from medgen.data.dicom.series import Series

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
LOCALIZER = "LOCALIZER"
PLANES = ("sagittal", "coronal", "axial")   # the patient axis (x, y, z) the normal follows


def is_secondary_capture(sop_class_uid: str) -> bool:
    return sop_class_uid == SECONDARY_CAPTURE or sop_class_uid.startswith(SECONDARY_CAPTURE + ".")


def plane(orientation: tuple[float, ...]) -> str:
    """The anatomical plane of slices with this ImageOrientationPatient (largest normal axis)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    return PLANES[int(np.argmax(np.abs(np.cross(row, col))))]


def acquisition_problems(series: "Series", axial_only: bool = True) -> list[str]:
    """Why ``series`` is not a real axial image series ([] if it is one)."""
    problems = []
    scouts = [h for h in series.headers if LOCALIZER in h.image_type]
    if scouts:
        image_type = "\\".join(scouts[0].image_type)
        problems.append(f"localizer/scout (ImageType {image_type} in "
                        f"{len(scouts)} of {len(series.headers)} image(s)): a planning image, "
                        "not a diagnostic series; left out")
    captures = [h for h in series.headers if is_secondary_capture(h.sop_class_uid)]
    if captures:
        problems.append(f"secondary capture (SOP Class {captures[0].sop_class_uid}): a screenshot "
                        "or scanned picture, not an acquisition; left out")
    if axial_only and series.orientation is not None and not problems:
        found = plane(series.orientation)
        if found != "axial":
            problems.append(f"{found} slices (ImageOrientationPatient {_cosines(series.orientation)}): "
                            "medgen trains on axial slices; left out (export the axial series, or "
                            "read other planes with the DICOM reader option axial_only = false)")
    return problems


def _cosines(orientation: tuple[float, ...]) -> str:
    return "\\".join(f"{v:g}" for v in np.round(np.asarray(orientation, float), 3))
