"""De-identification of DICOM files to DICOM PS3.15 Annex E: the Basic Application Level Confidentiality Profile
with the options a user names, keyed pseudonyms, UIDs and date shifts, and a report of the actions without PHI.

Built on dicom-anonymizer (KitwareMedical), which ships Table E.1-1 of the current standard (2026c) as each
attribute's action; deid's bundled recipe is a site list (it removes every *UID, SOP Class UID too), dicognito
keeps free-text descriptions and shifts every patient by one offset, and highdicom has no de-identification.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from dicomanonymizer.simpledicomanonymizer import replace_element
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from mmvl.errors import DataError, MMVLError

TABLE_EDITION = "dicomfields_2026c"  # the edition of PS3.15 Table E.1-1 dicom-anonymizer ships

# CID 7050 "De-identification Method": (code value, code meaning), coding scheme DCM.
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
OPTIONS: dict[str, tuple[str, str]] = {
    "retain_longitudinal_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
}
# What the converters and tools/deidentify.py use unless told otherwise: training needs the intervals between
# a patient's studies and descriptions such as "CHEST PA"; the device stays anonymous.
DEFAULT_OPTIONS = ("retain_longitudinal_dates", "clean_descriptors")

# Secondary capture storage classes (PS3.4 B.5): screenshots, scanned documents, often text burnt into pixels.
BURNED_IN_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF Storage
}
BURNED_IN_MODALITIES = {"OT", "SC", "DOC"}  # (0008,0060) Modality of screenshots and documents

# Attributes of Table E.1-1's "Rtn. Dev. Id." column: kept (K) under the Retain Device Identity Option.
DEVICE_KEYWORDS = frozenset({
    "CassetteID", "DetectorID", "DeviceAlternateIdentifier", "DeviceDescription", "DeviceLabel",
    "DeviceSerialNumber", "DeviceUID", "GantryID", "GeneratorID", "ManufacturerDeviceIdentifier",
    "PerformedStationAETitle", "PerformedStationName", "PerformedStationNameCodeSequence", "PlateID",
    "ScheduledStationAETitle", "ScheduledStationName", "ScheduledStationNameCodeSequence", "SourceSerialNumber",
    "StationName", "TreatmentMachineName", "UDISequence", "UniqueDeviceIdentifier", "XRayDetectorID",
    "XRayDetectorLabel",
})
# Free-text attributes of Table E.1-1's "Clean Desc." column: kept under the Clean Descriptors Option only when
# clean, else given the Basic Profile's action.
DESCRIPTOR_KEYWORDS = frozenset({
    "AcquisitionComments", "AcquisitionDeviceProcessingDescription", "AcquisitionProtocolDescription",
    "AdditionalPatientHistory", "AdmittingDiagnosesDescription", "CommentsOnThePerformedProcedureStep",
    "DerivationDescription", "DischargeDiagnosisDescription", "FrameComments", "ImageComments",
    "ImagingServiceRequestComments", "PerformedProcedureStepDescription", "ProtocolName", "ReasonForStudy",
    "ReasonForTheRequestedProcedure", "RequestedContrastAgent", "RequestedProcedureComments",
    "RequestedProcedureDescription", "ScheduledProcedureStepDescription", "SeriesDescription",
    "ServiceEpisodeDescription", "StudyComments", "StudyDescription", "VisitComments", "ContrastBolusAgent",
})
# "Cleaning" a descriptor (PS3.15 E.3.5) keeps it only when every word is a known imaging term: free text that
# names anyone ("pt John Smith MRN 123") is removed, "CT CHEST W/O CONTRAST 1.25MM" is kept.
DESCRIPTOR_WORDS = frozenset("""
A AND ABDOMEN ANGIO AP ARTERIAL AXIAL AX BILATERAL BONE BREATH CHEST COR CORONAL CONTRAST CR CT CTA CXR DELAYED
DOSE DX ENHANCED ERECT EXPIRATION FRONTAL FULL HD HEAD HIGH HOLD HRCT INSPIRATION IV KERNEL LAT LATERAL LDCT
LEFT LL LOCALIZER LOW LUNG LUNGS MEDIASTINUM MIP MPR NECK NON O OBLIQUE OF ORAL PA PE PELVIS PHASE PORTABLE PORTAL
PROTOCOL RECON RESOLUTION RIGHT RL ROUTINE SAG SAGITTAL SCOUT SCREENING SERIES SHARP SINGLE SMOOTH SOFT SPINE
STANDARD SUPINE THIN THORAX TISSUE TOPOGRAM UPRIGHT VENOUS VIEW VIEWS VOLUME W WITH WITHOUT WO XR
""".split())
_DESCRIPTOR_TOKEN = re.compile(r"[A-Za-z]+|\d+(?:\.\d+)?(?:MM|CM|KV|MAS|S)?", re.IGNORECASE)
_SHORT_NUMBER = re.compile(r"\d{1,3}(?:\.\d+)?(?:MM|CM|KV|MAS|S)?", re.IGNORECASE)

# PS3.15 Table E.3.10-1 "Safe Private Attributes" (private creator, group, element within the block): acquisition
# parameters that never identify anyone. Every other private attribute is removed (Basic Profile).
SAFE_PRIVATE: frozenset[tuple[str, int, int]] = frozenset({
    ("SIEMENS MR HEADER", 0x0019, 0x0C),  # B_value
    ("Philips Imaging DD 001", 0x2001, 0x03),  # Diffusion B-Factor
    ("GEMS_PARM_01", 0x0043, 0x39),  # Slop_int_6..9 (diffusion b-value)
})

# File meta information naming the sending site (PS3.10 7.1), which Table E.1-1 does not list.
FILE_META_ROUTING = ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                     "ReceivingApplicationEntityTitle", "SourcePresentationAddress", "SendingPresentationAddress",
                     "ReceivingPresentationAddress", "PrivateInformationCreatorUID", "PrivateInformation")
_BIRTH_KEYWORDS = {"PatientBirthDate", "PatientBirthTime"}  # removed even when other dates are shifted
_REMOVE_CODES = {"X", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}  # X where the standard allows it: nothing left to leak
_CATEGORY_CODES = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """No pydicom warning or log record while inside: both quote element values ("Invalid value for VR DA:
    'Smith'"), and header values must never reach a log."""
    logger = logging.getLogger("pydicom")
    disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


class BurnedInAnnotationError(DataError):
    """An image that may carry identifying text in its pixels, refused unless the user allows it."""


def _basic_profile_table() -> tuple[dict[BaseTag, str], list[tuple[int, int, int, int, str]]]:
    """Table E.1-1 as ``{tag: action code}`` and the masked entries (repeating groups such as 60xx overlays)."""
    table = dicom_anonymization_database_selector(TABLE_EDITION)
    exact: dict[BaseTag, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, code in _CATEGORY_CODES.items():
        for entry in table[category]:
            if len(entry) == 2:
                exact[Tag(*entry)] = code
            else:
                masked.append((*entry, code))
    return exact, masked


_TABLE, _MASKED = _basic_profile_table()


def table_action(tag: BaseTag) -> str | None:
    """The Basic Profile action code of Table E.1-1 for ``tag`` ("X", "Z", "D", "U", "X/Z/D", ...), or None."""
    code = _TABLE.get(tag)
    if code is not None:
        return code
    for group, element, group_mask, element_mask, code in _MASKED:
        if tag.group & group_mask == group & group_mask and tag.element & element_mask == element & element_mask:
            return code
    return None


def load_key(key_file: str | os.PathLike) -> bytes:
    """The secret behind pseudonyms, UIDs and date shifts: 32 random bytes in hex, created (mode 0600) when missing."""
    key_file = Path(key_file)
    if not key_file.is_file():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_hex(32) + "\n")
        key_file.chmod(0o600)
    try:
        return bytes.fromhex(key_file.read_text().strip())
    except (ValueError, UnicodeDecodeError):
        raise DataError(key_file, "not a pseudonym key (64 hex digits); give the key file of earlier runs, or a "
                                  "new path to create one") from None


def check_options(options: Iterable[str]) -> tuple[str, ...]:
    """``options`` as a tuple in the standard's order, or an MMVLError naming the unknown one."""
    options = tuple(dict.fromkeys(options))
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        raise MMVLError(f"de-identification option {unknown[0]!r} is unknown; choose from {', '.join(OPTIONS)}")
    return tuple(name for name in OPTIONS if name in options)


@dataclass
class DeidReport:
    """What de-identification did, per file kind (Modality and SOP class): counts of ``"Keyword: action"``.

    Holds tag keywords, action names, counts and the labels the caller gave refused files; never a value.
    """

    profile: list[str]
    files: Counter = field(default_factory=Counter)
    actions: dict[str, Counter] = field(default_factory=dict)
    refused: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, actions: Counter) -> None:
        self.files[kind] += 1
        self.actions.setdefault(kind, Counter()).update(actions)

    def refuse(self, reason: str, label: str) -> None:
        self.refused.setdefault(reason, []).append(label)

    def to_dict(self) -> dict:
        """The report as JSON-ready data."""
        return {
            "profile": self.profile,
            "files": dict(sorted(self.files.items())),
            "refused": {reason: sorted(labels) for reason, labels in sorted(self.refused.items())},
            "actions": {kind: dict(sorted(counts.items())) for kind, counts in sorted(self.actions.items())},
        }

    def format(self) -> str:
        """A few readable lines: the profile, then per file kind the files written and each action's count."""
        lines = ["profile: " + "; ".join(self.profile)]
        for kind, number in sorted(self.files.items()):
            lines.append(f"{kind}: {number} file(s)")
            for action, count in sorted(self.actions[kind].items()):
                lines.append(f"  {action}: {count}")
        for reason, labels in sorted(self.refused.items()):
            lines.append(f"refused ({reason}): {len(labels)} file(s)")
            lines.extend(f"  {label}" for label in sorted(labels))
        return "\n".join(lines)

    def write(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def file_kind(ds: Dataset) -> str:
    """``"CT CT Image Storage"``: the (0008,0060) Modality and the name of the (0008,0016) SOP Class UID."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    name = UID(sop_class).name if sop_class else "no SOP class"
    return f"{ds.get('Modality', '') or '?'} {name}"


def burned_in_reason(ds: Dataset) -> str | None:
    """Why pixels may carry identifying text: (0028,0301) BurnedInAnnotation YES, a secondary capture or document
    SOP class or modality, or an ImageType of a screen save; None for an ordinary acquisition."""
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        return "BurnedInAnnotation YES"
    if str(ds.get("SOPClassUID", "") or "") in BURNED_IN_SOP_CLASSES:
        return "secondary capture or document SOP class"
    if str(ds.get("Modality", "") or "").strip().upper() in BURNED_IN_MODALITIES:
        return "secondary capture or document modality"
    image_type = ds.get("ImageType")
    values = image_type if isinstance(image_type, pydicom.multival.MultiValue) else [image_type or ""]
    if "SCREEN SAVE" in {str(value).strip().upper() for value in values}:
        return "ImageType SCREEN SAVE"
    return None


def burned_in_file_reason(path: str | os.PathLike) -> str | None:
    """``burned_in_reason`` of a file's header (None where pydicom cannot read it: copying it then says so)."""
    try:
        with quiet_pydicom():
            return burned_in_reason(pydicom.dcmread(path, stop_before_pixels=True))
    except Exception:  # pydicom raises many types
        return None


class Deidentifier:
    """DICOM PS3.15 Annex E de-identification keyed by a secret (``--deidentify``, ``tools/deidentify.py``).

    The Basic Profile of Table E.1-1 runs on every element, in every sequence item at any depth, plus the named
    ``options`` (see ``OPTIONS``). Everything keyed is an HMAC-SHA256 under the key in ``key_file`` (created
    when missing; keep it private, delete it to make a later run unlinkable): pseudonyms, replacement UIDs
    (``2.25.`` UIDs, so the files of a series still share theirs, run after run) and each patient's date shift
    (1 to 10 years back, to the second, the same for all of that patient's files). Private attributes go unless
    on ``SAFE_PRIVATE``. Images that may carry text in their pixels (``burned_in_reason``) are refused unless
    ``allow_burned_in``. ``report`` counts every action per file kind.
    """

    def __init__(self, key_file: str | os.PathLike, options: Iterable[str] = DEFAULT_OPTIONS,
                 allow_burned_in: bool = False, safe_private: Iterable[tuple[str, int, int]] = SAFE_PRIVATE):
        self.key = load_key(key_file)
        self.options = check_options(options)
        self.allow_burned_in = allow_burned_in
        self.safe_private = frozenset(safe_private)
        self.report = DeidReport(profile=[meaning for _code, meaning in self.method_codes()])

    # keyed values --------------------------------------------------------------------------------------------
    def digest(self, value: str) -> bytes:
        return hmac.new(self.key, value.encode("utf-8"), hashlib.sha256).digest()

    def pseudonym(self, value: str, prefix: str = "anon-") -> str:
        return prefix + self.digest(value)[:8].hex()

    def uid(self, value: str) -> str:
        return "2.25." + str(int.from_bytes(self.digest("uid:" + value)[:16], "big"))  # PS3.5 B.2 UUID-derived

    def date_offset(self, patient: str) -> datetime.timedelta:
        """The shift of every date and time of ``patient``: 1 to 10 years back, in whole seconds."""
        seconds = int.from_bytes(self.digest("date-shift:" + patient)[:8], "big") % (9 * 365 * 86400)
        return -datetime.timedelta(days=365, seconds=seconds + 1)

    def method_codes(self) -> list[tuple[str, str]]:
        return [BASIC_PROFILE, *(OPTIONS[name] for name in self.options)]

    # one dataset ---------------------------------------------------------------------------------------------
    def deidentify(self, ds: Dataset, patient_pseudonym: str | None = None) -> Counter:
        """De-identify ``ds`` in place and return the count of each ``"Keyword: action"`` done (no values).

        PatientID and PatientName become ``patient_pseudonym`` (default: a pseudonym of the original PatientID);
        the date shift is keyed by the original PatientID (the StudyInstanceUID where there is none).
        """
        with quiet_pydicom():
            return self._deidentify(ds, patient_pseudonym)

    def _deidentify(self, ds: Dataset, patient_pseudonym: str | None) -> Counter:
        patient = str(ds.get("PatientID", "") or "").strip() or "study:" + str(ds.get("StudyInstanceUID", "") or "")
        if patient_pseudonym is None:
            patient_pseudonym = self.pseudonym(patient)
        offset = self.date_offset(patient)
        actions: Counter = Counter()
        for keyword in ("PatientID", "PatientName"):  # replaced by the pseudonym below, not by the table's action
            if keyword in ds:
                del ds[keyword]
        if getattr(ds, "file_meta", None) is not None:
            self._walk(ds.file_meta, offset, actions)
        self._walk(ds, offset, actions)
        for keyword in FILE_META_ROUTING:
            if getattr(ds, "file_meta", None) is not None and keyword in ds.file_meta:
                del ds.file_meta[keyword]
                actions[f"{keyword}: removed"] += 1
        ds.PatientID = ds.PatientName = patient_pseudonym
        actions["PatientID: pseudonym"] += 1
        actions["PatientName: pseudonym"] += 1
        if "SOPInstanceUID" in ds and getattr(ds, "file_meta", None) is not None:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        self._mark(ds)
        return actions

    def _mark(self, ds: Dataset) -> None:
        """(0012,0062) PatientIdentityRemoved, (0012,0063) DeidentificationMethod and its code sequence (CID 7050),
        (0028,0303) LongitudinalTemporalInformationModified: set here, after the profile ran, and nowhere else."""
        burned_in = burned_in_reason(ds) is not None
        ds.PatientIdentityRemoved = "NO" if burned_in else "YES"  # pixels may still name the patient
        # (0012,0063) is LO, 64 characters a value, any number of values: one per profile and option
        method = [f"mmvl PS3.15 E.1-1 ({TABLE_EDITION})", *(meaning for _code, meaning in self.method_codes())]
        ds.DeidentificationMethod = [*method, "burned-in annotation kept"] if burned_in else method
        items = []
        for value, meaning in self.method_codes():
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = DicomSequence(items)
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if "retain_longitudinal_dates" in self.options else "REMOVED")

    def _walk(self, ds: Dataset, offset: datetime.timedelta, actions: Counter) -> None:
        """The profile on every element of ``ds`` and, below kept sequences, of their items; counts in ``actions``."""
        paired_times: set[BaseTag] = set()
        for element in list(ds):
            tag = element.tag
            if tag.element == 0:
                continue  # group lengths
            if tag in paired_times:  # a time already shifted with its date
                actions[f"{element.keyword}: date shifted"] += 1
                continue
            if tag.is_private:
                self._private(ds, element, actions)
                continue
            keyword = element.keyword or f"({tag.group:04X},{tag.element:04X})"
            action = self._action(element, keyword)
            if action == "descriptor":
                if _clean_descriptor(element.value):
                    action = "cleaned: kept"
                else:  # not known to be clean: what the Basic Profile does to it
                    action = "not clean: " + self._apply(ds, element, self._basic_action(element, keyword), offset,
                                                         paired_times)
            else:
                action = self._apply(ds, element, action, offset, paired_times)
            if action != "keep":
                actions[f"{keyword}: {action}"] += 1
            if tag in ds and element.VR == "SQ":  # kept or device-retained sequences: the profile runs inside
                for item in element.value:
                    self._walk(item, offset, actions)
        blocks = {(tag.group, tag.element & 0xFF00) for tag in ds.keys()
                  if tag.is_private and not tag.is_private_creator}
        for tag in [tag for tag in ds.keys() if tag.is_private_creator]:
            if (tag.group, tag.element << 8) not in blocks:  # a creator left without attributes
                del ds[tag]

    def _apply(self, ds: Dataset, element: DataElement, action: str, offset: datetime.timedelta,
               paired_times: set[BaseTag]) -> str:
        """Do ``action`` to ``element`` of ``ds``; returns what was done (it differs where a value could not take
        the planned action: a UID's dummy is a keyed UID, an unparseable date is removed)."""
        if action == "removed":
            del ds[element.tag]
        elif action == "emptied":
            element.value = _empty_value(element.VR)
        elif action == "uid replaced" or (action == "replaced" and element.VR == "UI"):
            self._replace_uid(element)
            return "uid replaced"
        elif action == "replaced":
            if element.VR == "SQ":
                element.value = DicomSequence([])
            else:
                try:
                    replace_element(element)  # a dummy value of the VR: "ANONYMIZED", 00010101, 000Y, 0
                except NotImplementedError:  # a VR dicom-anonymizer has no dummy for (OW, AT, ...)
                    del ds[element.tag]
                    return "removed"
        elif action == "date shifted" and not self._shift(ds, element, offset, paired_times):
            del ds[element.tag]
            return "removed (not a date)"
        return action

    def _action(self, element: DataElement, keyword: str) -> str:
        """The one action for ``element``: the Basic Profile code of Table E.1-1, overridden by the options."""
        if "retain_device_identity" in self.options and keyword in DEVICE_KEYWORDS:
            return "keep (device identity)"
        if "clean_descriptors" in self.options and keyword in DESCRIPTOR_KEYWORDS and element.value:
            return "descriptor"
        if (element.VR in ("DA", "DT", "TM") and "retain_longitudinal_dates" in self.options
                and keyword not in _BIRTH_KEYWORDS and element.value not in (None, "")):
            return "date shifted"
        return self._basic_action(element, keyword)

    def _basic_action(self, element: DataElement, keyword: str) -> str:
        """The Basic Profile's action: Table E.1-1, X where the table allows X; UIDs the table misses replaced."""
        code = table_action(element.tag)
        if code is None:
            if element.tag.group == 0x0002 or keyword.endswith("ClassUID") or keyword == "TransferSyntaxUID":
                return "keep"  # file meta information and class UIDs name no one
            if element.VR == "UI" and element.value and not _standard_uids(element.value):
                return "uid replaced"  # an instance UID the table does not list: still a link to the source
            return "keep"
        if code in _REMOVE_CODES:
            return "removed"
        if code == "Z":
            return "emptied"
        if code == "U":
            return "uid replaced"
        return "replaced"  # D, Z/D: a dummy value

    def _replace_uid(self, element: DataElement) -> None:
        values = element.value if isinstance(element.value, (list, pydicom.multival.MultiValue)) else [element.value]
        new = [value if not value or _standard_uids(value) else self.uid(str(value)) for value in values]
        element.value = new if len(new) != 1 else new[0]

    def _shift(self, ds: Dataset, element: DataElement, offset: datetime.timedelta, paired: set[BaseTag]) -> bool:
        """Shift a DA (with its paired TM: StudyDate with StudyTime), DT or TM value by ``offset``; False when
        the value is not a date or time."""
        values = list(element.value) if isinstance(element.value, pydicom.multival.MultiValue) else [element.value]
        try:
            if element.VR == "DA":
                time_keyword = element.keyword.replace("Date", "Time") if element.keyword.endswith("Date") else ""
                time_element = ds[time_keyword] if time_keyword and time_keyword in ds else None
                times = []
                if (time_element is not None and time_element.VR == "TM" and time_element.value
                        and time_element.tag not in paired):  # not already shifted on its own
                    tv = time_element.value
                    times = list(tv) if isinstance(tv, pydicom.multival.MultiValue) else [tv]
                shifted = [_shift_date_time(str(d), str(times[i]) if i < len(times) else "", offset)
                           for i, d in enumerate(values)]
                element.value = [d for d, _t in shifted] if len(shifted) > 1 else shifted[0][0]
                if times:
                    new_times = [t for _d, t in shifted][: len(times)]
                    time_element.value = new_times if len(new_times) > 1 else new_times[0]
                    paired.add(time_element.tag)
            elif element.VR == "DT":
                new = [_shift_datetime(str(v), offset) for v in values]
                element.value = new if len(new) > 1 else new[0]
            else:  # TM without a date: the time of day moves by the offset, modulo a day
                new = [_shift_date_time("20000101", str(v), offset)[1] for v in values]
                element.value = new if len(new) > 1 else new[0]
                paired.add(element.tag)
        except (ValueError, OverflowError):  # not a date, or one the shift takes before year 1
            return False
        return True

    def _private(self, ds: Dataset, element: DataElement, actions: Counter) -> None:
        tag = element.tag
        if tag.is_private_creator:
            return  # creators go with their block, below
        creator_tag = Tag(tag.group, tag.element >> 8)
        creator = str(ds[creator_tag].value).strip() if creator_tag in ds else ""
        if (creator, tag.group, tag.element & 0xFF) in self.safe_private:
            actions["private attribute (safe list): keep"] += 1
            return
        del ds[tag]
        actions["private attribute: removed"] += 1

    # files ---------------------------------------------------------------------------------------------------
    def copy_dicom(self, source: str | os.PathLike, target: str | os.PathLike, study: str | None = None,
                   label: str | None = None) -> Path:
        """Write a de-identified copy of ``source`` to ``target`` and count its actions in ``report``.

        ``study`` (a pseudonym) becomes PatientID and PatientName. An image refused for burnt-in text is a
        ``BurnedInAnnotationError`` (listed in ``report.refused`` as ``label``, default the target's name), and
        nothing is written; a file pydicom cannot read or write is a DataError naming it, without pydicom's
        message (it may quote values).
        """
        target = Path(target)
        label = label if label is not None else target.name
        try:
            with quiet_pydicom():
                ds = pydicom.dcmread(source)
                reason = burned_in_reason(ds)
                if reason is not None and not self.allow_burned_in:
                    self.report.refuse(reason, label)
                    raise BurnedInAnnotationError(source, f"refused: {reason}, so its pixels may show identifying "
                                                          "text; check it by eye and pass --allow-burned-in to copy it")
                kind = file_kind(ds)
                actions = self.deidentify(ds, study)
                ds.preamble = b"\0" * 128  # a preamble may hold another format's header (TIFF-DICOM files)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".tmp")
                ds.save_as(partial)
                os.replace(partial, target)
        except DataError:
            raise
        except Exception as err:  # pydicom raises many types
            Path(str(target) + ".tmp").unlink(missing_ok=True)
            raise DataError(source, f"cannot write a de-identified copy ({type(err).__name__})") from None
        self.report.add(kind, actions)
        return target


def _empty_value(vr: str) -> Any:
    """A zero-length value of ``vr`` (action Z)."""
    if vr == "SQ":
        return DicomSequence([])
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN"):
        return b""
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"):
        return None
    return ""


def _standard_uids(value: Any) -> bool:
    """True for a UID of the standard itself (a SOP class, transfer syntax, coding scheme): never identifying."""
    text = str(value)
    return UID(text).name != text


def _clean_descriptor(value: Any) -> bool:
    """True when every word of the descriptor is an imaging term of ``DESCRIPTOR_WORDS`` (or a short number)."""
    text = " ".join(str(v) for v in value) if isinstance(value, pydicom.multival.MultiValue) else str(value or "")
    leftover = _DESCRIPTOR_TOKEN.sub(lambda m: "" if _safe_word(m.group(0)) else "\0", text)
    return "\0" not in leftover and not re.search(r"[A-Za-z0-9]", leftover) and bool(text.strip())


def _safe_word(word: str) -> bool:
    return word.upper() in DESCRIPTOR_WORDS or bool(_SHORT_NUMBER.fullmatch(word))


def _parse_time(text: str) -> tuple[datetime.time, int]:
    """A DICOM TM (also the old HH:MM:SS form) and how many characters of HHMMSS it gave."""
    text = text.strip().replace(":", "")
    main, _, fraction = text.partition(".")
    if not main.isdigit() or len(main) not in (2, 4, 6):
        raise ValueError("not a TM")
    hour, minute, second = int(main[:2]), int(main[2:4] or 0), int(main[4:6] or 0)
    micro = int((fraction + "000000")[:6]) if fraction else 0
    return datetime.time(hour, minute, min(second, 59), micro), len(main) + (len(fraction) + 1 if fraction else 0)


def _format_time(moment: datetime.datetime, original: str) -> str:
    original = original.strip().replace(":", "")
    main, _, fraction = original.partition(".")
    text = moment.strftime("%H%M%S")[: len(main)]
    if fraction:
        text += "." + f"{moment.microsecond:06d}"[: len(fraction)]
    return text


def _shift_date_time(date: str, time: str, offset: datetime.timedelta) -> tuple[str, str]:
    """A DA (YYYYMMDD or the old YYYY.MM.DD) and its TM, shifted together."""
    day = datetime.datetime.strptime(date.strip().replace(".", ""), "%Y%m%d")
    moment = datetime.datetime.combine(day.date(), _parse_time(time)[0] if time.strip() else datetime.time())
    shifted = moment + offset
    return shifted.strftime("%Y%m%d"), (_format_time(shifted, time) if time.strip() else "")


def _shift_datetime(value: str, offset: datetime.timedelta) -> str:
    """A DT (YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]) shifted, keeping its precision and time-zone suffix."""
    text = value.strip()
    zone = ""
    match = re.search(r"[+-]\d{4}$", text)
    if match and len(text) > 5:
        text, zone = text[: match.start()], match.group(0)
    main, _, fraction = text.partition(".")
    if not main.isdigit() or len(main) not in (4, 6, 8, 10, 12, 14):
        raise ValueError("not a DT")
    padded = main + "0101000000"[len(main) - 4:] if len(main) < 14 else main
    moment = datetime.datetime.strptime(padded[:14], "%Y%m%d%H%M%S")
    if fraction:
        moment = moment.replace(microsecond=int((fraction + "000000")[:6]))
    shifted = moment + offset
    out = shifted.strftime("%Y%m%d%H%M%S")[: len(main)]
    if fraction:
        out += "." + f"{shifted.microsecond:06d}"[: len(fraction)]
    return out + zone


def dicom_files(root: Path) -> list[Path]:
    """Every file below ``root`` (or ``root`` itself) that is a DICOM file (DICM at byte 128), in path order."""
    candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    found = []
    for path in candidates:
        try:
            with open(path, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    found.append(path)
        except OSError:
            continue
    return found


def deidentify_tree(source: str | os.PathLike, out: str | os.PathLike, key_file: str | os.PathLike,
                    options: Sequence[str] = DEFAULT_OPTIONS, allow_burned_in: bool = False,
                    progress: bool = True) -> DeidReport:
    """De-identified copies of a DICOM file or of every DICOM file below a folder, at the same relative paths.

    Refused images are listed in the report (by their path relative to ``source``) and not copied; a file that
    cannot be de-identified is a DataError naming it. Files that are not DICOM (no DICM marker) are not copied.
    """
    from tqdm import tqdm

    source, out = Path(source), Path(out)
    if not source.exists():
        raise DataError(source, "input not found: give a DICOM file or a folder of them")
    deidentifier = Deidentifier(key_file, options=options, allow_burned_in=allow_burned_in)
    files = dicom_files(source)
    if not files:
        raise DataError(source, "no DICOM files (none has the DICM marker at byte 128)")
    quiet = not progress or os.environ.get("MMVL_NO_PROGRESS") == "1"
    for path in tqdm(files, desc="de-identify", unit="file", disable=quiet):
        relative = path.relative_to(source) if source.is_dir() else Path(path.name)
        target = out / relative if source.is_dir() else (out if out.suffix.lower() == ".dcm" else out / path.name)
        try:
            deidentifier.copy_dicom(path, target, label=relative.as_posix())
        except BurnedInAnnotationError:
            continue
    return deidentifier.report
