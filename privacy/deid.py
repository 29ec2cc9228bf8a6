"""DICOM de-identification: PS3.15 Annex E Basic Application Level Confidentiality Profile.

pydicom 3.0 has no de-identification profile (only ``Dataset.remove_private_tags``), and
the ``deid`` package is not a dependency, so the profile is written here, table-driven:
``PROFILE`` maps an attribute keyword to the Annex E action (Table E.1-1, the attributes
a hospital's images actually carry), and VR rules catch what the table does not name:

* private tags, curve (50xx) and overlay (60xx) groups: removed (overlays can hold
  burned-in text; removing the whole group keeps the rest of the object valid);
* every person name (PN), AE title (AE) and free text (LT, ST, UT): removed or emptied;
* every date/time (DA, DT, TM): removed/emptied, or with ``shift_dates=True`` (the
  "Retain Longitudinal Temporal Information with Modified Dates" option) DA and DT dates
  move back by a keyed per-patient offset of 365-3652 days (intervals within a patient
  are kept) and times are kept; the birth date is always emptied;
* instance UIDs (study, series, SOP instance, frame of reference, and every reference to
  them): replaced by ``2.25.<uuid>`` UIDs derived with HMAC-SHA256 under the site secret,
  so the same input UID maps to the same output at that site (series structure kept) and
  to unrelated values at another site; class UIDs (SOP Class, Transfer Syntax) are kept;
* PatientID: replaced by a keyed pseudonym (not emptied) so that the privacy unit, the
  patient, can still be grouped after de-identification (DP.md).

Pixel data and geometry are never touched. ``burned_in_annotation_status`` reports text
burned into pixels, which this profile does not clean: files flagged YES, or of kinds
that often carry it unflagged (US, secondary capture), are refused by the file functions
unless the caller allows them.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import io
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence

from medgen.atomic import atomic_write_bytes

# Annex E actions: X remove, Z empty (Type 2: must stay present), U keyed UID,
# P keyed pseudonym, T date/time (shift when shifting dates, else remove),
# TZ like T but emptied instead of removed (Type 2), C patient characteristic (kept
# with retain_patient_characteristics, else removed; PatientSex is Type 2: CZ).
_X, _Z, _U, _P, _T, _TZ, _C, _CZ = "X", "Z", "U", "P", "T", "TZ", "C", "CZ"
PROFILE = MappingProxyType({
    # patient identity
    "PatientName": _Z, "PatientID": _P, "PatientBirthDate": _Z, "PatientBirthTime": _X,
    "IssuerOfPatientID": _X, "IssuerOfPatientIDQualifiersSequence": _X,
    "OtherPatientIDs": _X, "OtherPatientIDsSequence": _X, "OtherPatientNames": _X,
    "PatientBirthName": _X, "PatientMotherBirthName": _X, "PatientAddress": _X,
    "PatientTelephoneNumbers": _X, "PatientTelecomInformation": _X,
    "MedicalRecordLocator": _X, "PatientInsurancePlanCodeSequence": _X,
    "PatientReligiousPreference": _X, "MilitaryRank": _X, "BranchOfService": _X,
    "CountryOfResidence": _X, "RegionOfResidence": _X, "Occupation": _X,
    "ReferencedPatientSequence": _X, "ReferencedPatientPhotoSequence": _X,
    "ResponsiblePerson": _X, "ResponsibleOrganization": _X, "PatientState": _X,
    "CurrentPatientLocation": _X, "PatientInstitutionResidence": _X, "PatientComments": _X,
    "AdditionalPatientHistory": _X, "MedicalAlerts": _X, "Allergies": _X, "SpecialNeeds": _X,
    "EthnicGroup": _X, "SmokingStatus": _X, "PregnancyStatus": _X, "PatientSexNeutered": _X,
    "ConfidentialityConstraintOnPatientDataDescription": _X,
    # patient characteristics (Retain Patient Characteristics option)
    "PatientSex": _CZ, "PatientAge": _C, "PatientSize": _C, "PatientWeight": _C,
    # institution, people, devices
    "InstitutionName": _X, "InstitutionAddress": _X, "InstitutionalDepartmentName": _X,
    "InstitutionCodeSequence": _X, "ReferringPhysicianName": _Z,
    "ReferringPhysicianTelephoneNumbers": _X, "ReferringPhysicianIdentificationSequence": _X,
    "PhysiciansOfRecordIdentificationSequence": _X, "PerformingPhysicianIdentificationSequence": _X,
    "PhysiciansReadingStudyIdentificationSequence": _X, "OperatorIdentificationSequence": _X,
    "PersonAddress": _X, "PersonTelephoneNumbers": _X, "RequestingService": _X,
    "VerifyingObserverIdentificationCodeSequence": _X, "OrderEnteredBy": _X,
    "OrderEntererLocation": _X, "OrderCallbackPhoneNumber": _X, "StationName": _X,
    "DeviceSerialNumber": _X, "DetectorID": _X, "GantryID": _X, "UniqueDeviceIdentifier": _X,
    "DeviceDescription": _X, "PerformedLocation": _X, "ScheduledStudyLocation": _X,
    # study / request identifiers and free text
    "AccessionNumber": _Z, "StudyID": _Z, "RequestedProcedureID": _X,
    "ScheduledProcedureStepID": _X, "PerformedProcedureStepID": _X, "AdmissionID": _X,
    "ServiceEpisodeID": _X, "ServiceEpisodeDescription": _X,
    "FillerOrderNumberImagingServiceRequest": _X, "PlacerOrderNumberImagingServiceRequest": _X,
    "RequestAttributesSequence": _X, "ReasonForStudy": _X, "ReasonForTheRequestedProcedure": _X,
    "RequestedProcedureDescription": _X, "PerformedProcedureStepDescription": _X,
    "AdmittingDiagnosesDescription": _X, "StudyDescription": _X, "SeriesDescription": _X,
    "ProtocolName": _X, "DerivationDescription": _X, "TextComments": _X, "FrameComments": _X,
    "ReferencedStudySequence": _X, "ReferencedPerformedProcedureStepSequence": _X,
    "ContentSequence": _X, "GraphicAnnotationSequence": _X, "OriginalAttributesSequence": _X,
    "EncryptedAttributesSequence": _X, "DigitalSignaturesSequence": _X,
    "MACParametersSequence": _X, "PrivateInformationCreatorUID": _X, "PrivateInformation": _X,
    "ContentCreatorName": _Z,
    # dates that must stay present (Type 2)
    "StudyDate": _TZ, "StudyTime": _TZ,
    # instance UIDs and references to them
    **{k: _U for k in (
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "MediaStorageSOPInstanceUID",
        "FrameOfReferenceUID", "ReferencedSOPInstanceUID", "ReferencedFrameOfReferenceUID",
        "RelatedFrameOfReferenceUID", "SynchronizationFrameOfReferenceUID",
        "ReferencedSOPInstanceUIDInFile", "IrradiationEventUID", "DimensionOrganizationUID",
        "ConcatenationUID", "InstanceCreatorUID", "FiducialUID", "DoseReferenceUID",
        "StorageMediaFileSetUID", "TrackingUID", "SpecimenUID", "TargetUID", "DeviceUID",
        "FailedSOPInstanceUIDList", "ContextGroupExtensionCreatorUID",
        "TemplateExtensionOrganizationUID", "TemplateExtensionCreatorUID", "CreatorVersionUID",
        "UID")},
})
_VR_DEFAULT = MappingProxyType({"PN": _X, "AE": _X, "LT": _X, "ST": _X, "UT": _X,
                                "DA": _T, "DT": _T, "TM": _T})
# File meta elements that name the sending/receiving systems.
_META_REMOVE = ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID",
                "PrivateInformation")
# Kinds of object that often carry burned-in text without saying so (Annex E, E.3.1).
_UNFLAGGED_RISK_MODALITIES = frozenset({"US", "OT", "XC", "ES", "GM", "SM", "DOC", "IVUS"})
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_MIN_SECRET_BYTES = 16
_SHIFT_MIN_DAYS, _SHIFT_SPAN_DAYS = 365, 3288  # offsets in [-3652, -365] days


class BurnedInAnnotationError(ValueError):
    """The pixels may contain burned-in identifying text that this profile cannot clean."""


@dataclass(frozen=True)
class DeidOptions:
    shift_dates: bool = False
    retain_patient_characteristics: bool = False
    allow_burned_in: bool = False  # files flagged BurnedInAnnotation=YES
    allow_unknown_burned_in: bool = False  # unflagged US / secondary capture / photos


class UIDMap:
    """Site-keyed pseudonymisation: UIDs, patient IDs and date offsets via HMAC-SHA256.

    The secret never leaves the site; without it the mapping cannot be inverted or
    reproduced, and two sites with different secrets produce unrelated values.
    """

    def __init__(self, secret: bytes):
        if not isinstance(secret, bytes) or len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(f"UIDMap: secret must be at least {_MIN_SECRET_BYTES} random "
                             "bytes (e.g. os.urandom(32)), kept at the site")
        self._secret = secret

    @classmethod
    def from_secret_file(cls, path: str | os.PathLike, create: bool = False) -> "UIDMap":
        """Load the site secret; with ``create``, make a 32-byte one (mode 0600) if absent."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise FileNotFoundError(f"site secret {path} not found; create it once per "
                                        "site (UIDMap.from_secret_file(path, create=True))")
            atomic_write_bytes(path, os.urandom(32), mode=0o600)
        return cls(path.read_bytes())

    def _digest(self, domain: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{domain}\0{value}".encode(), hashlib.sha256).digest()

    def remap(self, uid: str) -> str:
        """A UUID-derived UID (PS3.5 B.2) keyed on ``uid``; same input, same output."""
        return f"2.25.{uuid.UUID(bytes=self._digest('uid', uid)[:16], version=4).int}"

    def pseudonym(self, patient_id: str) -> str:
        return "MG" + self._digest("patient", patient_id).hex()[:20].upper()

    def date_offset_days(self, patient_id: str) -> int:
        value = int.from_bytes(self._digest("date-shift", patient_id)[:8], "big")
        return -(_SHIFT_MIN_DAYS + value % _SHIFT_SPAN_DAYS)


def burned_in_annotation_status(ds: Dataset) -> str:
    """"yes", "no" or "unknown" (no flag on a kind of image that often has burned-in text)."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag in ("YES", "NO"):
        return flag.lower()
    modality = str(ds.get("Modality", "") or "").upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality in _UNFLAGGED_RISK_MODALITIES or sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        return "unknown"
    return "no"


def has_burned_in_annotation(ds: Dataset) -> bool:
    return burned_in_annotation_status(ds) == "yes"


def deidentify(ds: Dataset, uid_map: UIDMap, options: DeidOptions = DeidOptions()) -> Dataset:
    """Return a de-identified copy of ``ds``; ``ds`` itself is never modified."""
    out = copy.deepcopy(ds)
    patient_id = str(ds.get("PatientID", "") or "")
    offset = uid_map.date_offset_days(patient_id) if options.shift_dates else None
    _clean(out, uid_map, options, offset)
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for keyword in _META_REMOVE:
            if keyword in meta:
                delattr(meta, keyword)
        if "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = uid_map.remap(meta.MediaStorageSOPInstanceUID)
    _mark_deidentified(out, options)
    return out


def deidentify_file(src: str | os.PathLike, dst: str | os.PathLike, uid_map: UIDMap,
                    options: DeidOptions = DeidOptions()) -> Path:
    """Write a de-identified copy of DICOM ``src`` to ``dst`` (atomically; never in place)."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"deidentify_file: {dst} is the input file; write the copy elsewhere")
    ds = read_dicom(src)
    check_burned_in(ds, src, options)
    buffer = io.BytesIO()
    deidentify(ds, uid_map, options).save_as(buffer, enforce_file_format=True)
    return atomic_write_bytes(dst, buffer.getvalue())


@dataclass
class DeidReport:
    written: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def deidentify_tree(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, uid_map: UIDMap,
                    options: DeidOptions = DeidOptions()) -> DeidReport:
    """De-identify every DICOM file under ``src_dir`` into ``dst_dir``.

    Output paths are built from the new UIDs (``study/series/instance.dcm``), because
    source folder and file names often hold patient names or IDs. Files that are not
    DICOM, or refused for burned-in text, are listed in the report and not written.
    """
    src_root, dst_root = Path(src_dir).resolve(), Path(dst_dir).resolve()
    if not src_root.is_dir():
        raise NotADirectoryError(f"deidentify_tree: {src_root} is not a folder")
    if dst_root == src_root or dst_root.is_relative_to(src_root) or src_root.is_relative_to(dst_root):
        raise ValueError(f"deidentify_tree: output {dst_root} overlaps input {src_root}; "
                         "write de-identified copies to a separate folder")
    report = DeidReport()
    for path in sorted(p for p in src_root.rglob("*") if p.is_file()):
        try:
            ds = read_dicom(path)
            check_burned_in(ds, path, options)
        except (ValueError, InvalidDicomError) as err:
            report.skipped.append((path, str(err)))
            continue
        clean = deidentify(ds, uid_map, options)
        target = dst_root / clean.StudyInstanceUID / clean.SeriesInstanceUID / \
            f"{clean.SOPInstanceUID}.dcm"
        if target.exists():
            report.skipped.append((path, f"duplicate SOP instance, already written as {target}"))
            continue
        buffer = io.BytesIO()
        clean.save_as(buffer, enforce_file_format=True)
        report.written.append((path, atomic_write_bytes(target, buffer.getvalue())))
    return report


def read_dicom(path: Path) -> Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DICOM file")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise ValueError(f"{path}: not a DICOM file ({err})") from err
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(keyword):
            raise ValueError(f"{path}: missing {keyword}; not an image instance medgen can use")
    return ds


def check_burned_in(ds: Dataset, path: Path, options: DeidOptions) -> None:
    status = burned_in_annotation_status(ds)
    if status == "yes" and not options.allow_burned_in:
        raise BurnedInAnnotationError(f"{path}: BurnedInAnnotation=YES; the pixels carry text "
                                      "this profile cannot remove (set allow_burned_in after "
                                      "cleaning pixels)")
    if status == "unknown" and not options.allow_unknown_burned_in:
        raise BurnedInAnnotationError(f"{path}: no BurnedInAnnotation flag on a "
                                      f"{ds.get('Modality', '?')} image that often carries "
                                      "burned-in text; review it, then allow_unknown_burned_in")


def _clean(ds: Dataset, uid_map: UIDMap, options: DeidOptions, offset: int | None) -> None:
    for elem in list(ds):
        tag = elem.tag
        if tag.is_private or (tag.group % 2 == 0 and (0x5000 <= tag.group <= 0x50FF
                                                       or 0x6000 <= tag.group <= 0x60FF)):
            del ds[tag]
            continue
        action = PROFILE.get(elem.keyword) or _VR_DEFAULT.get(elem.VR)
        if action in (_C, _CZ) and options.retain_patient_characteristics:
            action = None
            if elem.keyword == "PatientAge":
                elem.value = _cap_age(str(elem.value or ""))
        if action in (_T, _TZ) and offset is not None:
            elem.value = _shift(elem.value, elem.VR, offset)
            continue
        if action in (_X, _T, _C):
            del ds[tag]
        elif action in (_Z, _TZ, _CZ):
            elem.value = [] if elem.VR == "SQ" else ""
        elif action == _U:
            elem.value = _map_uids(elem.value, uid_map)
        elif action == _P:
            elem.value = uid_map.pseudonym(str(elem.value or ""))
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, uid_map, options, offset)


def _map_uids(value, uid_map: UIDMap):
    if value is None or value == "":
        return value
    if isinstance(value, str):
        return uid_map.remap(value)
    return [uid_map.remap(v) for v in value]


def _shift(value, vr: str, offset: int):
    """Shift DA/DT dates by ``offset`` days; keep TM. Unparseable dates are emptied."""
    if vr == "TM" or value is None or value == "":
        return value
    values = [value] if isinstance(value, str) else list(value)
    shifted = []
    for text in (str(v) for v in values):
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d").date() + dt.timedelta(days=offset)
        except ValueError:
            return ""
        shifted.append(day.strftime("%Y%m%d") + (text[8:] if vr == "DT" else ""))
    return shifted[0] if isinstance(value, str) else shifted


def _cap_age(age: str) -> str:
    # Ages over 89 are identifying on their own (HIPAA Safe Harbor): report them as 90.
    if age.endswith("Y") and age[:-1].isdigit() and int(age[:-1]) > 89:
        return "090Y"
    return age


def _mark_deidentified(ds: Dataset, options: DeidOptions) -> None:
    codes = [("113100", "Basic Application Confidentiality Profile")]
    methods = ["DICOM PS3.15 E.1 Basic Profile (medgen)"]
    if options.shift_dates:
        codes.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
        methods.append("Retain Longitudinal Modified Dates")
    if options.retain_patient_characteristics:
        codes.append(("113108", "Retain Patient Characteristics Option"))
        methods.append("Retain Patient Characteristics")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = methods
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if options.shift_dates else "REMOVED"
