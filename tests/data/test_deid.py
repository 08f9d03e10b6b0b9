"""PS3.15 Annex E de-identification (mmvl/data/deid.py, tools/deidentify.py): PHI planted in every place the
standard names is gone from the written bytes; dates shift per patient; UIDs are keyed and consistent; images
with burnt-in text are refused; the report holds no planted value."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from mmvl.data.deid import (
    DEFAULT_OPTIONS,
    OPTIONS,
    BurnedInAnnotationError,
    Deidentifier,
    quiet_pydicom,
    table_action,
)
from mmvl.errors import DataError, MMVLError
from tests.conftest import REPO, load_script, load_tool

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
UID_ROOT = "1.2.826.0.1.3680043.10.999"  # the planted UIDs' prefix; no other UID in the files starts so

# Table E.1-1's kinds of PHI, each planted as a value nothing else in the file holds.
PLANTED = {
    "PatientName": "Smithplanted^Johnathan",
    "PatientID": "PID-PLANT-4242",
    "PatientBirthDate": "19500207",
    "PatientAge": "069Y",
    "OtherPatientNames": "Smythe^Jonplanted",
    "PatientAddress": "7 Plantedwood Lane",
    "AccessionNumber": "ACC77310",
    "StudyID": "STU55102",
    "StudyDate": "20190314",
    "StudyTime": "101530",
    "SeriesTime": "101702",
    "AcquisitionTime": "101745",
    "ContentTime": "101750",
    "InstanceCreationTime": "101755",
    "AcquisitionDateTime": "20190314101745.250000",
    "ImageComments": "pt John Smith MRN 123456",
    "StudyDescription": "CT CHEST for Johnathan Smithplanted",
    "ContentCreatorName": "Creatorplanted^Alice",
    "InstitutionName": "Planted General Hospital",
    "InstitutionAddress": "12 Plantation Road Springfield",
    "InstitutionalDepartmentName": "Plantology Department",
    "StationName": "PLANTSTN01",
    "DeviceSerialNumber": "SN-PLANT-778899",
    "ReferringPhysicianName": "Referrer^Plantedbob",
    "OperatorsName": "Opsplanted^Carolplanted",
    "PerformingPhysicianName": "Performer^Plantedgina",
    "StudyInstanceUID": f"{UID_ROOT}.1",
    "SeriesInstanceUID": f"{UID_ROOT}.2",
    "FrameOfReferenceUID": f"{UID_ROOT}.4",
}
NESTED = {"PatientName": "Nestedsmith^Plantedeve", "ReferringPhysicianName": "Deepnested^Plantedfrank",
          "StudyDate": "20190315", "ReferencedSOPInstanceUID": f"{UID_ROOT}.9"}
PRIVATE_VALUE = "PrivatePlanted Johnathan"
DEVICE = ("StationName", "DeviceSerialNumber")


def planted_file(path: Path, patient: str = PLANTED["PatientID"], study_date: str = PLANTED["StudyDate"],
                 instance: int = 1, **attributes) -> Path:
    """CT_small.dcm with every planted value, a nested sequence two deep, private tags and a safe private tag."""
    ds = pydicom.dcmread(CT_SMALL)
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.PatientID = patient
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"):
        setattr(ds, keyword, study_date)
    ds.AcquisitionDateTime = study_date + PLANTED["AcquisitionDateTime"][8:]
    ds.SeriesDescription = "CHEST 5MM"  # a clean descriptor, kept under the Clean Descriptors Option
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.3.{instance}"
    ds.InstanceNumber = instance
    ds.BurnedInAnnotation = "NO"
    inner = Dataset()
    inner.ReferringPhysicianName, inner.StudyDate = NESTED["ReferringPhysicianName"], NESTED["StudyDate"]
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D3000", "SRT", "Chest"
    item.PatientName = NESTED["PatientName"]  # a name where no table row expects one
    item.AnatomicRegionModifierSequence = Sequence([inner])
    ds.AnatomicRegionSequence = Sequence([item])
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    reference.ReferencedSOPInstanceUID = NESTED["ReferencedSOPInstanceUID"]
    ds.ReferencedImageSequence = Sequence([reference])
    ds.private_block(0x0009, "PLANTED CREATOR", create=True).add_new(0x01, "LO", PRIVATE_VALUE)
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", "1000")  # b-value: safe
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def planted_strings(skip: tuple[str, ...] = ()) -> list[str]:
    """Every planted value, the parts of names and the date in the other forms a file may spell it."""
    values = {value for keyword, value in {**PLANTED, **NESTED}.items() if keyword not in skip}
    values |= {part for value in list(values) for part in value.split("^") if len(part) >= 5}
    values |= {"2019.03.14", "2019-03-14", "1950.02.07", "10:15:30", PRIVATE_VALUE, "Johnathan", "MRN 123456",
               UID_ROOT, "JFK IMAGING CENTER", "CompressedSamples", "CLUNIE1"}  # and CT_small's own PHI
    return sorted(values)


def leaks(data: bytes, values: list[str]) -> list[str]:
    lowered = data.lower()
    return [value for value in values if value.lower().encode() in lowered]


def as_moment(date: str, time: str) -> datetime.datetime:
    return datetime.datetime.strptime(date + time[:6], "%Y%m%d%H%M%S")


def codes(ds: Dataset) -> set[str]:
    return {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}


@pytest.mark.parametrize("options", [DEFAULT_OPTIONS, (), tuple(OPTIONS)], ids=["default", "basic", "all"])
def test_planted_phi_is_gone_from_the_written_bytes(tmp_path: Path, options: tuple[str, ...]) -> None:
    source = planted_file(tmp_path / "in" / "a.dcm")
    assert not leaks(b"", planted_strings()) and leaks(source.read_bytes(), planted_strings())  # the search works
    deidentifier = Deidentifier(tmp_path / "key", options=options)
    target = deidentifier.copy_dicom(source, tmp_path / "out" / "a.dcm")
    keep_device = "retain_device_identity" in options
    assert leaks(target.read_bytes(), planted_strings(DEVICE if keep_device else ())) == []

    ds = pydicom.dcmread(target)
    assert ds.PatientIdentityRemoved == "YES" and ds.PatientID == ds.PatientName == deidentifier.pseudonym(
        PLANTED["PatientID"])
    assert codes(ds) == {"113100", *(OPTIONS[name][0] for name in options)}
    assert ds.DeidentificationMethod[1] == "Basic Application Confidentiality Profile"
    assert "PatientAge" not in ds and "ImageComments" not in ds and "InstitutionName" not in ds
    assert not ds.PatientBirthDate and not ds.AccessionNumber  # Z: present and empty
    nested = ds.AnatomicRegionSequence[0]
    assert nested.CodeMeaning == "Chest" and not nested.PatientName
    assert not nested.AnatomicRegionModifierSequence[0].ReferringPhysicianName
    if "ReferencedImageSequence" in ds:  # X/Z/U*: removed, or its instance UIDs replaced
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID.startswith("2.25.")
    assert ds.get((0x0009, 0x1001)) is None and "PLANTED CREATOR" not in str(ds)  # private: removed, creator too
    assert ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value == 1000  # on the safe list
    assert ds.pixel_array.tolist() == pydicom.dcmread(CT_SMALL).pixel_array.tolist()
    if "clean_descriptors" in options:
        assert ds.SeriesDescription == "CHEST 5MM" and "StudyDescription" not in ds  # "for Johnathan ..." is not
    else:
        assert "SeriesDescription" not in ds and "StudyDescription" not in ds
    if "retain_longitudinal_dates" in options:
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert ds.StudyDate != PLANTED["StudyDate"] and len(ds.StudyDate) == 8
    else:
        assert ds.LongitudinalTemporalInformationModified == "REMOVED" and not ds.StudyDate
    if keep_device:
        assert (ds.StationName, ds.DeviceSerialNumber) == (PLANTED["StationName"], PLANTED["DeviceSerialNumber"])


def test_dates_shift_by_one_keyed_offset_per_patient(tmp_path: Path) -> None:
    """One patient's two studies keep their interval, to the second; another patient gets another offset."""
    deidentifier = Deidentifier(tmp_path / "key")
    first = planted_file(tmp_path / "in" / "a1.dcm", patient="PATIENT-A", study_date="20190314")
    second = planted_file(tmp_path / "in" / "a2.dcm", patient="PATIENT-A", study_date="20200102", StudyTime="083000")
    other = planted_file(tmp_path / "in" / "b.dcm", patient="PATIENT-B", study_date="20190314")
    out = [pydicom.dcmread(deidentifier.copy_dicom(p, tmp_path / "out" / p.name)) for p in (first, second, other)]
    original = [as_moment("20190314", "101530"), as_moment("20200102", "083000"), as_moment("20190314", "101530")]
    shifted = [as_moment(ds.StudyDate, ds.StudyTime) for ds in out]
    offsets = [new - old for new, old in zip(shifted, original)]
    assert offsets[0] == offsets[1] != offsets[2]
    assert shifted[1] - shifted[0] == original[1] - original[0]
    assert datetime.timedelta(days=-3651) < offsets[0] <= datetime.timedelta(days=-365)
    assert offsets[0] == deidentifier.date_offset("PATIENT-A")
    for ds, offset, date in zip(out, offsets, ("20190314", "20200102", "20190314")):  # every date moves as one
        assert as_moment(ds.SeriesDate, ds.SeriesTime) - as_moment(date, PLANTED["SeriesTime"]) == offset
        acquired = datetime.datetime.strptime(ds.AcquisitionDateTime, "%Y%m%d%H%M%S.%f")
        assert acquired - datetime.datetime.strptime(date + "101745.25", "%Y%m%d%H%M%S.%f") == offset
        inner = ds.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0]  # a date alone, two items deep
        assert inner.StudyDate == (as_moment(NESTED["StudyDate"], "000000") + offset).strftime("%Y%m%d")
    assert Deidentifier(tmp_path / "other.key").date_offset("PATIENT-A") != offsets[0]


def test_uids_are_consistent_in_a_series_and_keyed(tmp_path: Path) -> None:
    sources = [planted_file(tmp_path / "in" / f"{n}.dcm", instance=n) for n in range(3)]

    def run(key: Path, out: Path) -> list[Dataset]:
        deidentifier = Deidentifier(key)
        return [pydicom.dcmread(deidentifier.copy_dicom(p, out / p.name)) for p in sources]

    first, again, other = run(tmp_path / "k1", tmp_path / "o1"), run(tmp_path / "k1", tmp_path / "o2"), run(
        tmp_path / "k2", tmp_path / "o3")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds[keyword].value) for ds in first}
        assert len(values) == 1 and values.pop().startswith("2.25.")
    sop = [ds.SOPInstanceUID for ds in first]
    assert len(set(sop)) == 3 and [ds.file_meta.MediaStorageSOPInstanceUID for ds in first] == sop
    assert [ds.SOPClassUID for ds in first] == [pydicom.uid.CTImageStorage] * 3  # class UIDs are kept
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
        assert [ds[keyword].value for ds in first] == [ds[keyword].value for ds in again]
        assert not {str(ds[keyword].value) for ds in first} & {str(ds[keyword].value) for ds in other}


def test_burned_in_images_are_refused_unless_allowed(tmp_path: Path) -> None:
    burned = planted_file(tmp_path / "in" / "burned.dcm", BurnedInAnnotation="YES")
    capture = planted_file(tmp_path / "in" / "capture.dcm", SOPClassUID=pydicom.uid.SecondaryCaptureImageStorage,
                           Modality="OT", BurnedInAnnotation="NO")
    deidentifier = Deidentifier(tmp_path / "key")
    for source in (burned, capture):
        with pytest.raises(BurnedInAnnotationError, match="--allow-burned-in") as info:
            deidentifier.copy_dicom(source, tmp_path / "out" / source.name, label=source.name)
        assert info.value.path == str(source) and not (tmp_path / "out" / source.name).exists()
    assert deidentifier.report.refused == {"BurnedInAnnotation YES": ["burned.dcm"],
                                           "secondary capture or document SOP class": ["capture.dcm"]}
    assert not deidentifier.report.files  # nothing written, nothing counted
    allowed = Deidentifier(tmp_path / "key", allow_burned_in=True)
    ds = pydicom.dcmread(allowed.copy_dicom(burned, tmp_path / "out" / "burned.dcm"))
    assert ds.PatientIdentityRemoved == "NO" and "burned-in annotation kept" in ds.DeidentificationMethod
    assert leaks((tmp_path / "out" / "burned.dcm").read_bytes(), planted_strings()) == []


def test_report_counts_actions_per_file_kind_without_phi(tmp_path: Path) -> None:
    deidentifier = Deidentifier(tmp_path / "key")
    for n in range(2):
        deidentifier.copy_dicom(planted_file(tmp_path / "in" / f"{n}.dcm", instance=n), tmp_path / "out" / f"{n}.dcm")
    with pytest.raises(BurnedInAnnotationError):
        deidentifier.copy_dicom(planted_file(tmp_path / "in" / "b.dcm", BurnedInAnnotation="YES"), tmp_path / "b.dcm",
                                label="refused-1")
    report = deidentifier.report.to_dict()
    counts = report["actions"]["CT CT Image Storage"]
    assert report["files"] == {"CT CT Image Storage": 2}
    assert report["refused"] == {"BurnedInAnnotation YES": ["refused-1"]}
    assert counts["ImageComments: not clean: removed"] == counts["PatientAge: removed"] == 2
    assert counts["SeriesDescription: cleaned: kept"] == counts["StudyInstanceUID: uid replaced"] == 2
    assert counts["StudyDate: date shifted"] == 4  # with the nested one
    assert counts["StudyTime: date shifted"] == counts["PatientID: pseudonym"] == 2
    assert counts["PatientName: emptied"] == 2 and counts["private attribute: removed"] > 2  # the nested names
    assert counts["private attribute (safe list): keep"] == 2
    text = json.dumps(report) + deidentifier.report.format()
    assert leaks(text.encode(), planted_strings()) == []
    # a shifted date is no planted value, but it would reveal the offset: none is in the report either
    assert "2.25." not in text and not any(char.isdigit() for char in "".join(counts))


def test_unknown_option_and_unreadable_file_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(MMVLError, match="'retain_everything' is unknown"):
        Deidentifier(tmp_path / "key", options=["retain_everything"])
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"no preamble, no DICM: Doe^SECRETNAME")
    with pytest.raises(DataError, match="cannot write a de-identified copy") as info:
        Deidentifier(tmp_path / "key").copy_dicom(bad, tmp_path / "out" / "x.dcm")
    assert info.value.path == str(bad) and "SECRETNAME" not in str(info.value)
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True
    (tmp_path / "not_hex.key").write_text("Doe^John\n")
    with pytest.raises(DataError, match="not a pseudonym key"):
        Deidentifier(tmp_path / "not_hex.key")


def test_table_is_the_standards() -> None:
    """Actions come from PS3.15 Table E.1-1 as dicom-anonymizer ships it."""
    tag = pydicom.tag.Tag
    assert table_action(tag("PatientName")) == "Z" and table_action(tag("PatientAge")) == "X"
    assert table_action(tag("StudyInstanceUID")) == "U" and table_action(tag("ImageComments")) == "X"
    assert table_action(tag(0x6002, 0x3000)) == "X"  # Overlay Data, a repeating group
    assert table_action(tag("Rows")) is None


def test_tool_on_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deidentify = load_tool("deidentify")
    source, out, key = tmp_path / "in", tmp_path / "out", tmp_path / "secret" / "key"
    for n in range(2):
        planted_file(source / "series" / f"{n}.dcm", instance=n)
    planted_file(source / "deeper" / "more" / "2.dcm", instance=2)
    planted_file(source / "capture.dcm", BurnedInAnnotation="YES")
    (source / "notes.txt").write_text("not a DICOM file")
    assert deidentify.main([str(source), str(out), "--key", str(key)]) == 1  # one refused
    printed = capsys.readouterr().out
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["deeper/more/2.dcm", "deidentification_report.json", "series/0.dcm", "series/1.dcm"]
    report = json.loads((out / "deidentification_report.json").read_text())
    assert report["files"] == {"CT CT Image Storage": 3} and report["refused"] == {"BurnedInAnnotation YES":
                                                                                   ["capture.dcm"]}
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file()) + printed.encode()
    assert leaks(everything, planted_strings()) == []
    series = {pydicom.dcmread(out / "series" / f"{n}.dcm").SeriesInstanceUID for n in range(2)}
    assert len(series) == 1
    # a second run with the same key gives byte-identical copies
    assert deidentify.main([str(source), str(tmp_path / "again"), "--key", str(key), "--options", "none",
                            "--allow-burned-in"]) == 0
    assert pydicom.dcmread(tmp_path / "again" / "series" / "0.dcm").SeriesInstanceUID in series
    # bad usage: exit code 2, with the reason
    for argv, message in (
        ([str(source), str(source / "sub"), "--key", str(key)], "overlap"),
        ([str(tmp_path / "nowhere"), str(out), "--key", str(key)], "not found"),
        ([str(source), str(tmp_path / "o4"), "--key", str(tmp_path / "o4" / "key")], "inside OUT"),
        ([str(source), str(tmp_path / "o5"), "--key", str(key), "--options", "keep_names"], "not an option"),
        ([str(source)], "required"),
    ):
        with pytest.raises(SystemExit) as info:
            deidentify.main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_tool_runs_as_a_script(tmp_path: Path) -> None:
    planted_file(tmp_path / "in" / "a.dcm")
    command = [sys.executable, str(REPO / "tools" / "deidentify.py"), str(tmp_path / "in" / "a.dcm"),
               str(tmp_path / "out" / "a.dcm"), "--key", str(tmp_path / "key"), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "a.dcm").is_file() and (tmp_path / "out" / "deidentification_report.json").is_file()
    assert leaks((result.stdout + result.stderr).encode(), planted_strings()) == []
    bad = subprocess.run(command[:3], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "OUT" in bad.stderr


SYNTHETIC_PHI = ("PatientName", "PatientID", "PatientBirthDate", "PatientAge", "AccessionNumber", "StudyID",
                 "InstitutionName", "ReferringPhysicianName", "StudyDate", "StudyTime", "StudyInstanceUID",
                 "SeriesInstanceUID", "SOPInstanceUID", "StudyDescription")


def test_a_synthetic_study(tmp_path: Path) -> None:
    """A study of datasets/synthetic.py (fake names, ids, dates, UIDs in its headers): no header value is left
    in the copy or in the report, which tools/deidentify.py writes beside it."""
    manifest = Path(load_script("synthetic").generate(tmp_path / "synthetic", n=1, size=32, seed=0))
    row = json.loads(manifest.read_text().splitlines()[0])
    images = row["image"] if isinstance(row["image"], list) else [row["image"]]
    study = tmp_path / "study"
    study.mkdir()
    values: set[str] = set()
    for image in images:
        source = manifest.parent / image
        (study / source.name).write_bytes(source.read_bytes())
        ds = pydicom.dcmread(source)
        for keyword in SYNTHETIC_PHI:
            text = str(ds[keyword].value)
            # name parts of 6 and more ("SYNTH" matches the Manufacturer, "mmvl synthetic phantom"), and the age
            values |= {part for part in (text, *text.split("^")) if len(part) >= 6 or keyword == "PatientAge"}
    assert leaks(b"".join(p.read_bytes() for p in study.iterdir()), sorted(values))  # the search works
    deidentify = load_tool("deidentify")
    assert deidentify.main([str(study), str(tmp_path / "out"), "--key", str(tmp_path / "key"), "--no-progress"]) == 0
    written = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert leaks(written, sorted(values)) == []
    report = json.loads((tmp_path / "out" / "deidentification_report.json").read_text())
    kind = "DX Digital X-Ray Image Storage - For Presentation" if "DX" in json.dumps(report) else "CR"
    assert sum(report["files"].values()) == len(images) and not report["refused"], kind


def test_no_header_value_reaches_a_log_or_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  recwarn: pytest.WarningsRecorder) -> None:
    """pydicom logs and warns with element values ("Invalid value for VR DA: '...'"): a date holding a name is
    removed, and the name appears in no log record and no warning."""
    import logging
    import warnings

    source = planted_file(tmp_path / "in" / "a.dcm")
    ds = pydicom.dcmread(source)
    ds.add_new(0x00181200, "DA", "Smithplanted")  # DateOfLastCalibration, not a date
    ds.save_as(tmp_path / "in" / "b.dcm")
    caplog.set_level(logging.DEBUG)
    warnings.simplefilter("always")
    deidentifier = Deidentifier(tmp_path / "key")
    copy = pydicom.dcmread(deidentifier.copy_dicom(tmp_path / "in" / "b.dcm", tmp_path / "out" / "b.dcm"))
    assert "DateOfLastCalibration" not in copy
    assert deidentifier.report.actions["CT CT Image Storage"]["DateOfLastCalibration: removed (not a date)"] == 1
    messages = caplog.text + "".join(str(w.message) for w in recwarn)
    assert leaks(messages.encode(), planted_strings()) == []
    caplog.clear()
    with quiet_pydicom():  # what pydicom says of a bad value, silenced ...
        Dataset().add_new(0x00181200, "DA", "Smithplanted")
    assert "Smithplanted" not in caplog.text
    with pytest.warns(UserWarning, match="Smithplanted"):  # ... and outside, where it quotes the value
        Dataset().add_new(0x00181200, "DA", "Smithplanted")
    assert "Smithplanted" in caplog.text


@pytest.mark.parametrize("text, kept", [
    ("CT CHEST W/O CONTRAST 1.25MM", True), ("CHEST PA", True), ("AX 5MM", True),
    ("pt John Smith MRN 123", False), ("CHEST 123456", False), ("CXR for Jo", False), ("CHEST PA (SYNTHETIC)", False),
])
def test_clean_descriptors_keep_only_imaging_terms(tmp_path: Path, text: str, kept: bool) -> None:
    ds = Dataset()
    ds.PatientID, ds.StudyDescription = "P1", text
    counts = Deidentifier(tmp_path / "key", options=["clean_descriptors"]).deidentify(ds)
    assert (ds.get("StudyDescription") == text) is kept
    assert counts == {"StudyDescription: " + ("cleaned: kept" if kept else "not clean: removed"): 1,
                      "PatientID: pseudonym": 1, "PatientName: pseudonym": 1}
