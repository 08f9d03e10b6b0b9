"""The DICOM-folder importer (datasets/dicom_folder.py) on a small hospital-like export written here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from mmvl.errors import DataError, MMVLError
from tests.conftest import load_script
from tests.datasets.conftest import read_jsonl, write_csv

dicom_folder = load_script("dicom_folder")

# Header values that identify someone: none may reach the manifest or the console.
PRIVATE = {
    "PatientName": "TEST^SECRET",  # written by the make_dicom fixture itself, with PatientID
    "PatientBirthDate": "19451231",
    "AccessionNumber": "ACC-SECRET-77",
    "InstitutionName": "SECRET HOSPITAL",
    "ReferringPhysicianName": "DR^SECRET",
}
STUDY = {
    "S001": "1.2.826.0.1.1",
    "S005": "1.2.826.0.1.5",
    "S003": "1.2.826.0.1.3",
    "S006": "1.2.826.0.1.6",
    "S007": "1.2.826.0.1.7",
    "foreign": "1.2.826.0.1.99",
    "loose": "1.2.826.0.1.98",
}
CT_SERIES = "1.2.826.0.2.1"
DX_SERIES = "1.2.826.0.2.5"
MF_SERIES = "1.2.826.0.2.55"
# (path below the export, study, series, frames)
IMAGES = [
    *((f"S001/CT/IM000{n}", "S001", CT_SERIES, 1) for n in range(1, 5)),  # no .dcm suffix
    ("S001/CT/scout.dcm", "foreign", "1.2.826.0.2.99", 1),  # another study's series in the same folder
    ("S005/DX/chest.dcm", "S005", DX_SERIES, 1),
    ("S005/DX/1.2.826.0.9.99", "S005", DX_SERIES, 1),  # named by its SOP Instance UID
    ("S005/MF/enhanced.dcm", "S005", MF_SERIES, 3),  # one multi-frame file holding 3 slices
    *((f"S003/CT/{n}.dcm", "S003", "1.2.826.0.2.3", 1) for n in range(1, 4)),  # no report row
    *((f"S006/CT/{n}.dcm", "S006", "1.2.826.0.2.6", 1) for n in range(1, 4)),  # blank report
    ("S007/a/1.dcm", "S007", "1.2.826.0.2.7", 1),  # one series spread over two folders
    ("S007/a/2.dcm", "S007", "1.2.826.0.2.7", 1),
    ("S007/b/3.dcm", "S007", "1.2.826.0.2.7", 1),
    ("S003/CT/no_series.dcm", "S003", None, 1),  # no SeriesInstanceUID
    ("loose.dcm", "loose", "1.2.826.0.2.98", 1),  # directly in the export folder
]
REPORTS_HEADER = ["study_id", "report", "split", "effusion", "nodule"]
REPORTS = [
    ["S001", "FINDINGS: Small left effusion.\nIMPRESSION: Effusion.", "train", "1", "0"],
    ["S004", "Report whose images were not exported.", "train", "", ""],
    ["S005", "Normal chest.", "val", "0", ""],
    ["S006", "   ", "train", "", ""],
    ["S007", "FINDINGS: Nodule in the right upper lobe.", "test", "0", "1.0"],
]


def write_structured_report(path: Path, study_uid: str) -> None:
    """A Basic Text SR: a DICOM object with no Image Pixel module, as exports often hold."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.3.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "SR", study_uid, "1.2.826.0.2.11"
    ds.PatientName = PRIVATE["PatientName"]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture
def export(tmp_path: Path, make_dicom) -> Path:
    """``export/<study folder>/...`` DICOMs with identifying headers, a note, an SR and a broken file."""
    for number, (name, study, series, frames) in enumerate(IMAGES, start=1):
        pixels = np.full((frames, 4, 4) if frames > 1 else (4, 4), number, dtype=np.uint16)
        uids = {"StudyInstanceUID": STUDY[study], **({"SeriesInstanceUID": series} if series else {})}
        identifying = {key: value for key, value in PRIVATE.items() if key != "PatientName"}
        make_dicom(f"export/{name}", pixels, Modality="CT", InstanceNumber=number, **uids, **identifying)
    root = tmp_path / "export"
    (root / "S001" / "CT" / "notes.txt").write_text("exported by PACS", encoding="utf-8")
    write_structured_report(root / "S001" / "SR" / "sr.dcm", STUDY["S001"])
    # The DICM preamble, then a file meta element with a VR that does not exist.
    broken = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00QQ\x10\x001.2.840.10008.1.2.1"
    (root / "S009").mkdir()
    (root / "S009" / "broken.dcm").write_bytes(broken)
    return root


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "reports.csv", REPORTS_HEADER, REPORTS)


def image(name: str) -> str:
    return f"../export/{name}"


def assert_private_values_absent(*texts: str) -> None:
    for text in texts:
        for value in (*PRIVATE.values(), "PID-SECRET-0001"):
            assert value not in text


def test_2d_one_row_per_study_joined_by_folder(
    export: Path, reports: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "manifests"
    argv = [
        str(export),
        "--reports",
        str(reports),
        "--out",
        str(out),
        "--label-columns",
        "effusion,nodule",
        "--no-progress",
    ]
    counts = dicom_folder.main(argv)
    rows = read_jsonl(out / "manifest.jsonl")
    s001 = {
        "report": "Small left effusion. Effusion.",
        "labels": {"effusion": 1, "nodule": 0},
        "split": "train",
        "study_id": "S001",
    }
    s005 = {"report": "Normal chest.", "labels": {"effusion": 0}, "split": "test", "study_id": "S005"}  # hash 0.039
    s007 = {
        "report": "Nodule in the right upper lobe.",
        "labels": {"effusion": 0, "nodule": 1},
        "split": "val",
        "study_id": "S007",
    }
    assert rows == [  # one row per study (CSV key), its files in path order; no ViewPosition, so no views
        # the scout lies under S001's folder, so it is S001's
        {"image": [*(image(f"S001/CT/IM000{n}") for n in range(1, 5)), image("S001/CT/scout.dcm")], **s001},
        {"image": [image(f"S005/{name}") for name in ("DX/1.2.826.0.9.99", "DX/chest.dcm", "MF/enhanced.dcm")],
         **s005},
        {"image": [image(f"S007/{name}") for name in ("a/1.dcm", "a/2.dcm", "b/3.dcm")], **s007},
    ]
    assert counts == {
        "rows": 3,
        "studies": 3,
        "images": 11,
        "splits": {"train": 1, "val": 1, "test": 1},
        "skipped": {"unmatched": 5, "empty_report": 3},  # S003's 4 images and loose.dcm; S006's 3 images
        "skipped_files": {"not_dicom": 1, "unreadable": 1, "no_pixel_data": 1},
        "unreadable_examples": ["S009/broken.dcm (NotImplementedError)"],
        "unused_reports": 1,  # S004
        "manifest": str(out / "manifest.jsonl"),
        "data_root": str(tmp_path / "export"),  # the images' common folder, no wider
    }
    for name in ("train", "val", "test"):
        assert read_jsonl(out / f"{name}.jsonl") == [row for row in rows if row["split"] == name]
    captured = capsys.readouterr()
    assert f"wrote 3 studies (11 images) to {out / 'manifest.jsonl'}" in captured.out
    assert "skipped files: not_dicom 1, unreadable 1, no_pixel_data 1" in captured.out
    assert "unreadable, e.g.: S009/broken.dcm (NotImplementedError)" in captured.out
    assert "reports matching no images: 1" in captured.out
    assert f"train with --cfg-options data.root={tmp_path}" in captured.out
    assert_private_values_absent((out / "manifest.jsonl").read_text(encoding="utf-8"), captured.out, captured.err)
    assert STUDY["S001"] not in (out / "manifest.jsonl").read_text(encoding="utf-8")


def test_3d_one_row_per_series_with_series_uid_where_the_folder_is_shared(
    export: Path, reports: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ct" / "manifest.jsonl"
    counts = dicom_folder.convert(export, reports, out, kind="3d", min_slices=3, split_column="split", progress=False)
    assert read_jsonl(out) == [
        {
            "image": "../export/S001/CT",
            "report": "Small left effusion. Effusion.",
            "split": "train",
            "study_id": "S001",
            "series_uid": CT_SERIES,  # the folder also holds the scout of another study
        },
        {"image": "../export/S005/MF", "report": "Normal chest.", "split": "val", "study_id": "S005"},
    ]
    assert counts["skipped"] == {
        "series_across_folders": 1,  # S007
        "too_few_slices": 3,  # the scout, S005's two DX images, loose.dcm
        "unmatched": 1,  # S003
        "empty_report": 1,  # S006
    }
    assert counts["skipped_files"] == {"not_dicom": 1, "unreadable": 1, "no_pixel_data": 1, "no_series_uid": 1}
    assert counts["unused_reports"] == 2  # S004, and S007 whose only series was skipped before the join
    assert_private_values_absent(out.read_text(encoding="utf-8"))


def test_3d_joined_by_study_uid_leaves_the_foreign_series_out(export: Path, tmp_path: Path) -> None:
    reports = write_csv(
        tmp_path / "by_uid.csv", ["StudyUID", "Text"], [[STUDY["S001"], "Effusion."], [STUDY["S005"], "Normal."]]
    )
    out = tmp_path / "uid"
    counts = dicom_folder.convert(
        export,
        reports,
        out,
        key_column="StudyUID",
        report_column="Text",
        match="study_uid",
        kind="3d",
        min_slices=1,
        progress=False,
    )
    rows = read_jsonl(out / "manifest.jsonl")
    assert [(row["image"], row["study_id"], row.get("series_uid")) for row in rows] == [
        ("../export/S001/CT", STUDY["S001"], CT_SERIES),
        ("../export/S005/DX", STUDY["S005"], None),
        ("../export/S005/MF", STUDY["S005"], None),
    ]
    assert [row["split"] for row in rows] == ["train", "train", "train"]  # hashes 0.81 and 0.57: train
    # the scout (foreign study), S003, S006 and loose.dcm have no report row; S007 spans two folders
    assert counts["skipped"] == {"series_across_folders": 1, "too_few_slices": 0, "unmatched": 4, "empty_report": 0}


def test_2d_views_from_view_position(tmp_path: Path, make_dicom) -> None:
    """(0018,5101) ViewPosition becomes ``views``, one per image (None where a file has none)."""
    pixels = np.zeros((4, 4), np.uint16)
    for name, view in (("P1/1.dcm", "PA"), ("P1/2.dcm", "LATERAL"), ("P1/3.dcm", None), ("P2/1.dcm", "AP")):
        make_dicom(f"cxr/{name}", pixels, Modality="DX", **({"ViewPosition": view} if view else {}))
    make_dicom("cxr/P3/1.dcm", pixels, Modality="DX")
    reports = write_csv(tmp_path / "r.csv", ["study_id", "report"], [["P1", "One."], ["P2", "Two."], ["P3", "Three."]])
    counts = dicom_folder.convert(tmp_path / "cxr", reports, tmp_path / "out", progress=False)
    rows = read_jsonl(tmp_path / "out" / "manifest.jsonl")
    assert [(row["study_id"], len(row["image"]), row.get("views")) for row in rows] == [
        ("P1", 3, ["PA", "LATERAL", None]),
        ("P2", 1, ["AP"]),
        ("P3", 1, None),  # no file of the study has a ViewPosition: no views key
    ]
    assert counts["rows"] == counts["studies"] == 3 and counts["images"] == 5


def test_2d_joined_by_file_name(export: Path, tmp_path: Path) -> None:
    reports = write_csv(
        tmp_path / "by_file.csv",
        ["file", "report"],
        [["IM0001", "First."], ["1.2.826.0.9.99", "UID-named."], ["chest", "Chest."]],
    )
    out = tmp_path / "files"
    counts = dicom_folder.convert(
        export, reports, out, key_column="file", match="filename", val_fraction=0, test_fraction=0, progress=False
    )
    rows = read_jsonl(out / "manifest.jsonl")
    assert [(row["image"], row["study_id"], row["report"]) for row in rows] == [
        (["../export/S001/CT/IM0001"], "IM0001", "First."),
        (["../export/S005/DX/1.2.826.0.9.99"], "1.2.826.0.9.99", "UID-named."),  # its dots are not a suffix
        (["../export/S005/DX/chest.dcm"], "chest", "Chest."),
    ]
    assert all("labels" not in row for row in rows)
    assert counts["splits"] == {"train": 3, "val": 0, "test": 0}
    assert counts["skipped"] == {"unmatched": 16, "empty_report": 0}


def test_csv_errors_name_the_line_and_column(export: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write_csv(tmp_path / "dup.csv", REPORTS_HEADER, [REPORTS[0], REPORTS[2], REPORTS[0]])
    with pytest.raises(DataError, match="line 4: study_id 'S001' is already on line 2; keys are unique") as info:
        dicom_folder.convert(export, path, out, progress=False)
    assert info.value.path == str(path)
    path = write_csv(tmp_path / "split.csv", REPORTS_HEADER, [["S001", "Text.", "holdout", "", ""]])
    with pytest.raises(DataError, match="line 2, 'split': 'holdout' is not train, val or test"):
        dicom_folder.convert(export, path, out, split_column="split", progress=False)
    path = write_csv(tmp_path / "label.csv", REPORTS_HEADER, [["S001", "Text.", "", "yes", ""]])
    with pytest.raises(DataError, match="line 2, 'effusion': 'yes' is not one of 1, 0 or empty"):
        dicom_folder.convert(export, path, out, label_columns=["effusion"], progress=False)
    path = write_csv(tmp_path / "blank.csv", REPORTS_HEADER, [["", "Text.", "", "", ""]])
    with pytest.raises(DataError, match="line 2: empty 'study_id'"):
        dicom_folder.convert(export, path, out, progress=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['accession'\]"):
        dicom_folder.convert(export, path, out, key_column="accession", progress=False)
    assert not list(out.glob("*"))


def test_bad_arguments_and_nothing_to_write(export: Path, reports: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(MMVLError, match="match='filename' names single files"):
        dicom_folder.convert(export, reports, out, match="filename", kind="3d")
    with pytest.raises(MMVLError, match="match='accession'"):
        dicom_folder.convert(export, reports, out, match="accession")
    with pytest.raises(MMVLError, match="kind='4d'"):
        dicom_folder.convert(export, reports, out, kind="4d")
    with pytest.raises(MMVLError, match="leave some for train"):
        dicom_folder.convert(export, reports, out, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="DICOM folder not found"):
        dicom_folder.convert(tmp_path / "nowhere", reports, out)
    argv = [str(export), "--reports", str(reports), "--out", str(out), "--kind", "3d", "--no-progress"]
    with pytest.raises(
        SystemExit,
        match=r"no rows to write \(skipped: not_dicom 1, unreadable 1, no_pixel_data 1, no_series_uid 1, "
        r"series_across_folders 1, too_few_slices 7\)",
    ):
        dicom_folder.main(argv)  # every series is below the default 16 slices
    assert not list(out.glob("*"))


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_deidentify_copies_without_phi_and_stable_pseudonyms(
    export: Path, reports: Path, tmp_path: Path, kind: str
) -> None:
    """--deidentify: rows point at copies inside the manifest folder; no PHI value, original key or UID is in
    the copies or the manifest; the copies still read, and a second run gives the same pseudonyms."""
    import pydicom

    from mmvl.data.manifest import load_manifest

    argv = [str(export), "--reports", str(reports), "--kind", kind, "--min-slices", "1", "--deidentify",
            "--no-progress"]
    dicom_folder.main([*argv, "--out", str(tmp_path / "a")])
    dicom_folder.main([*argv, "--out", str(tmp_path / "b"), "--pseudonym-key", str(tmp_path / "a" / "pseudonym.key")])
    rows = read_jsonl(tmp_path / "a" / "manifest.jsonl")
    again = read_jsonl(tmp_path / "b" / "manifest.jsonl")
    assert rows and [r["study_id"] for r in rows] == [r["study_id"] for r in again]
    paths = [path for r in rows for path in (r["image"] if kind == "2d" else [r["image"]])]
    assert all(r["study_id"].startswith("anon-") for r in rows) and all(p.startswith("deidentified/") for p in paths)
    # 2d: every file of S001, S005, S007; 3d: S001 CT and scout, S005 DX and MF
    assert len(paths) == len(set(paths)) == (11 if kind == "2d" else 4)
    assert all("series_uid" not in r for r in rows)
    output = _all_bytes(tmp_path / "a" / "deidentified") + (tmp_path / "a" / "manifest.jsonl").read_bytes()
    for value in (*PRIVATE.values(), "PID-SECRET-0001", "SECRET"):
        assert value.encode() not in output, value
    for uid in (*STUDY.values(), CT_SERIES, DX_SERIES):  # whole UIDs: pydicom's own 1.2.826.0.1.3680043... stays
        assert not re.search(re.escape(uid.encode()) + rb"(?![0-9.])", output), uid
    for key in ("S001", "S005", "S007"):
        assert f'"{key}"'.encode() not in output
    loaded = load_manifest(tmp_path / "a" / "manifest.jsonl")  # inside the manifest's folder: no root error
    copy = Path(loaded[0]["image"][0])
    if kind == "2d":
        ds = pydicom.dcmread(copy)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID == rows[0]["study_id"]
        # PS3.15 Table E.1-1: Z (kept, empty) for the birth date and accession number, X for the institution
        assert not ds.PatientBirthDate and not ds.AccessionNumber and "InstitutionName" not in ds
        assert {item.CodeValue for item in ds.DeidentificationMethodCodeSequence} == {"113100", "113107", "113105"}
    else:  # the fixture's slices carry no geometry, so check the series stays one series
        uids = {str(pydicom.dcmread(p).SeriesInstanceUID) for p in copy.iterdir()}
        assert len(uids) == 1 and uids.pop().startswith("2.25.")
    # without the flag nothing is copied
    dicom_folder.main([*argv[:-2], "--no-progress", "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c" / "deidentified").exists() and not (tmp_path / "c" / "pseudonym.key").exists()


def test_deidentified_copy_of_an_unwritable_file_is_a_data_error_without_its_content(tmp_path: Path) -> None:
    """pydicom's own messages may quote header values: copy_dicom names the file and the error type only."""
    from mmvl.errors import DataError

    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"no preamble, no DICM: Doe^SECRETNAME")  # pydicom raises InvalidDicomError
    deidentifier = dicom_folder.Deidentifier(tmp_path / "key")
    with pytest.raises(DataError, match="cannot write a de-identified copy") as info:
        deidentifier.copy_dicom(bad, tmp_path / "out" / "x.dcm", "anon-1")
    assert info.value.path == str(bad) and "SECRETNAME" not in str(info.value)
    assert not (tmp_path / "out" / "x.dcm").exists()


def test_deidentify_refuses_burned_in_images_and_reports_without_phi(
    tmp_path: Path, make_dicom, capsys: pytest.CaptureFixture[str]
) -> None:
    """--deidentify goes through mmvl.data.deid: dates, times, comments and descriptions planted where the old
    copy kept them are gone; an image with BurnedInAnnotation YES and a secondary capture are left out of the
    rows (listed in the report by pseudonymous path) unless --allow-burned-in; the report names no one."""
    import json

    import pydicom

    pixels = np.zeros((4, 4), np.uint16)
    planted = dict(StudyDate="20190314", StudyTime="101530", AcquisitionDateTime="20190314101745",
                   ImageComments="pt John Smith MRN 123456", StudyDescription="CXR for Johnathan Smithplanted",
                   ContentCreatorName="Creatorplanted^Alice", PatientAge="069Y", BurnedInAnnotation="NO")
    make_dicom("cxr/P1/1.dcm", pixels, **planted)
    make_dicom("cxr/P1/2.dcm", pixels, **{**planted, "BurnedInAnnotation": "YES"})
    make_dicom("cxr/P2/1.dcm", pixels, **{**planted, "SOPClassUID": pydicom.uid.SecondaryCaptureImageStorage})
    reports = write_csv(tmp_path / "r.csv", ["study_id", "report"], [["P1", "One."], ["P2", "Two."]])
    argv = [str(tmp_path / "cxr"), "--reports", str(reports), "--deidentify", "--no-progress"]
    counts = dicom_folder.main([*argv, "--out", str(tmp_path / "a")])
    rows = read_jsonl(tmp_path / "a" / "manifest.jsonl")
    assert [len(row["image"]) for row in rows] == [1] and counts["images"] == 1  # P2 had only the capture
    report = json.loads((tmp_path / "a" / "deidentification_report.json").read_text())
    assert report == counts["deidentification"]
    refused = report["refused"]
    assert sorted(refused) == ["BurnedInAnnotation YES", "secondary capture or document SOP class"]
    assert all(re.fullmatch(r"deidentified/anon-[0-9a-f]{16}/[0-9a-f]{16}\.dcm", label)
               for labels in refused.values() for label in labels)
    output = _all_bytes(tmp_path / "a")
    for value in ("20190314", "101530", "John Smith", "123456", "Johnathan", "Smithplanted", "Creatorplanted",
                  "069Y", "PID-SECRET-0001", "SECRET", "P1/", "P2/"):
        assert value.encode() not in output, value
    assert not list((tmp_path / "a" / "deidentified").rglob("*.tmp"))
    allowed = dicom_folder.main([*argv, "--out", str(tmp_path / "b"), "--allow-burned-in", "--deid-options", "none"])
    assert allowed["images"] == 3 and not allowed["deidentification"]["refused"]
    copies = [pydicom.dcmread(p) for p in sorted((tmp_path / "b" / "deidentified").rglob("*.dcm"))]
    assert sorted(ds.PatientIdentityRemoved for ds in copies) == ["NO", "NO", "YES"]  # pixels may show names
    assert all(not ds.StudyDate and ds.LongitudinalTemporalInformationModified == "REMOVED" for ds in copies)
    with pytest.raises(SystemExit) as info:
        dicom_folder.main([*argv, "--out", str(tmp_path / "c"), "--deid-options", "keep_names"])
    assert info.value.code == 2 and "'keep_names' is unknown" in capsys.readouterr().err
    with pytest.raises(MMVLError, match="'keep_names' is unknown"):  # the API checks before reading anything
        dicom_folder.convert(tmp_path / "cxr", reports, tmp_path / "d", deid_options=["keep_names"])


def test_deidentify_3d_refuses_a_series_with_any_burned_in_slice(tmp_path: Path, make_dicom) -> None:
    import json

    pixels = np.zeros((4, 4), np.uint16)
    for study, burned in (("S1", True), ("S2", False)):
        for n in range(2):
            make_dicom(f"ct/{study}/{n}.dcm", pixels, Modality="CT", InstanceNumber=n + 1,
                       SeriesInstanceUID=f"1.2.826.0.1.3680043.10.998.{study[1]}", BurnedInAnnotation=(
                           "YES" if burned and n == 1 else "NO"))
    reports = write_csv(tmp_path / "r.csv", ["study_id", "report"], [["S1", "One."], ["S2", "Two."]])
    counts = dicom_folder.main([str(tmp_path / "ct"), "--reports", str(reports), "--kind", "3d", "--min-slices", "1",
                                "--deidentify", "--no-progress", "--out", str(tmp_path / "out")])
    assert counts["rows"] == 1 and read_jsonl(tmp_path / "out" / "manifest.jsonl")[0]["report"] == "Two."
    assert len(list((tmp_path / "out" / "deidentified").rglob("*.dcm"))) == 2  # S2's slices; none of S1's
    report = json.loads((tmp_path / "out" / "deidentification_report.json").read_text())
    [label] = report["refused"]["BurnedInAnnotation YES"]
    assert re.fullmatch(r"deidentified/anon-[0-9a-f]{16}/series-[0-9a-f]{16}/", label)
    assert report["files"] == {"CT Digital X-Ray Image Storage - For Presentation": 2}


def test_mask_columns_add_each_keys_masks_and_refuse_what_cannot_be_placed(export: Path, tmp_path: Path) -> None:
    """``--mask-columns LABEL=COLUMN``: a key's mask files go into its row as ``masks`` (relative to the manifest),
    where the segmentation data path finds and reads them on the image's pixels; a blank cell is no mask; a named
    file that does not exist, or a mask for a 2d key with several images, is refused naming the line or key."""
    from PIL import Image

    from mmvl.data.masks import read_mask, row_mask_paths

    (tmp_path / "masks").mkdir()
    Image.fromarray(np.eye(4, dtype=np.uint8) * 255).save(tmp_path / "masks" / "chest_effusion.png")
    header = ["file", "report", "effusion_mask", "nodule_mask"]
    reports = write_csv(tmp_path / "by_file.csv", header, [["chest", "Left effusion.", "masks/chest_effusion.png", ""],
                                                           ["IM0001", "Clear.", "", ""]])
    out = tmp_path / "out"
    counts = dicom_folder.main([str(export), "--reports", str(reports), "--out", str(out), "--key-column", "file",
                                "--match", "filename", "--mask-columns", "pleural effusion=effusion_mask,"
                                "nodule=nodule_mask", "--val-fraction", "0", "--test-fraction", "0",
                                "--no-progress"])
    rows = {row["study_id"]: row for row in read_jsonl(out / "manifest.jsonl")}
    assert counts["rows"] == 2 and rows["chest"]["masks"] == {"pleural effusion": "../masks/chest_effusion.png"}
    assert "masks" not in rows["IM0001"]  # no mask named: the label is absent from the image
    effusion, nodule = row_mask_paths(rows["chest"], ["pleural effusion", "nodule"], out)
    assert nodule is None and (read_mask(effusion, (4, 4)) == np.eye(4, dtype=bool)).all()

    missing = write_csv(tmp_path / "missing.csv", header, [["chest", "Text.", "masks/none.png", ""]])
    with pytest.raises(DataError, match="line 2, 'effusion_mask': mask file 'masks/none.png' not found"):
        dicom_folder.convert(export, missing, tmp_path / "o2", key_column="file", match="filename",
                             mask_columns={"pleural effusion": "effusion_mask"}, progress=False)
    by_study = write_csv(tmp_path / "study.csv", ["study_id", "report", "mask"],
                         [["S005", "Effusion.", "masks/chest_effusion.png"]])
    with pytest.raises(DataError, match="study_id 'S005' has masks but 3 images"):
        dicom_folder.convert(export, by_study, tmp_path / "o3", mask_columns={"effusion": "mask"}, progress=False)
    with pytest.raises(SystemExit):  # argparse: not LABEL=COLUMN
        dicom_folder.build_parser().parse_args([str(export), "--reports", str(reports), "--out", str(out),
                                                "--mask-columns", "effusion"])
