"""The MIMIC-CXR converter (datasets/mimic_cxr.py) on a tiny fake PhysioNet layout built here."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmvl.errors import DataError, MMVLError

SCRIPT = Path(__file__).parents[2] / "datasets" / "mimic_cxr.py"


def load_converter():
    spec = importlib.util.spec_from_file_location("mimic_cxr_converter", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mimic_cxr = load_converter()

METADATA_HEADER = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
]
# (dicom_id, subject, study, view, official split or None, image file written?)
IMAGES = [
    ("0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-00000001", "10000032", "50000001", "PA", "train", True),
    ("0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-00000002", "10000032", "50000001", "LATERAL", "train", True),
    ("0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-00000003", "10000032", "50000001", "PA", None, True),
    ("0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-00000004", "10000032", "50000002", "AP", "train", True),
    ("0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-00000005", "10000764", "50000003", "PA", "validate", False),
    ("0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-00000006", "10000764", "50000007", "AP", "validate", True),
    ("0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-00000007", "10000898", "50000004", "AP", "test", True),
    ("0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-00000008", "11000011", "50000005", "PA", "train", True),
    ("0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-00000009", "12000022", "50000006", "PA", "test", True),
    ("0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-00000010", "12000022", "50000006", "", "test", True),
]
ID = "0a1b2c3d-11111111-aaaaaaaa-bbbbbbbb-000000"  # + two digits

REPORTS = {  # study -> report text; s50000005 has none on disk
    "50000001": """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___M with cough.
 
 FINDINGS:  
 
 Heart size is normal.  There is a small right pleural
 effusion.
 
 IMPRESSION:  
 
 Small right pleural effusion.
""",  # noqa: W291, W293
    "50000002": """                                 FINAL REPORT
 HISTORY:  Shortness of breath.
 
 IMPRESSION:  Mild pulmonary edema, new since ___.
""",  # noqa: W293
    "50000003": " FINDINGS: Clear lungs.\n",
    "50000007": " findings: No acute process.\n",
    "50000004": "                                 FINAL REPORT\n ___\n",  # nothing left after cleaning
    "50000006": " Lungs are clear.  No pneumothorax.\n",  # no headers: the whole report is used
}

CHEXPERT = {  # study -> {column: value}; blank elsewhere; s50000006 is not in the CSV
    "50000001": {"No Finding": "", "Pleural Effusion": "-1.0", "Cardiomegaly": "0.0"},
    "50000002": {"Edema": "1.0", "Pleural Effusion": "-1.0", "Atelectasis": "0.0"},
    "50000003": {"No Finding": "1.0"},
    "50000007": {"No Finding": "1.0"},
    "50000004": {"No Finding": "1.0"},
    "50000005": {"Pneumonia": "-1.0"},
}


def write_csv_gz(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """A miniature MIMIC-CXR-JPG + reports download, with DICOM copies for study s50000001."""
    jpg_root = tmp_path / "physionet" / "mimic-cxr-jpg" / "2.0.0"
    dcm_root = tmp_path / "physionet" / "mimic-cxr" / "2.0.0"
    report_root = tmp_path / "physionet" / "mimic-cxr-reports"
    for dicom_id, subject, study, _view, _split, on_disk in IMAGES:
        study_dir = Path("files", f"p{subject[:2]}", f"p{subject}", f"s{study}")
        if on_disk:
            (jpg_root / study_dir).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), color=128).save(jpg_root / study_dir / f"{dicom_id}.jpg")
            if study == "50000001":
                (dcm_root / study_dir).mkdir(parents=True, exist_ok=True)
                (dcm_root / study_dir / f"{dicom_id}.dcm").write_bytes(b"\0" * 128 + b"DICM")
        if study in REPORTS:
            report = report_root / study_dir.with_name(f"s{study}.txt")
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(REPORTS[study], encoding="utf-8")

    csv_dir = jpg_root
    metadata = write_csv_gz(
        csv_dir / "mimic-cxr-2.0.0-metadata.csv.gz",
        METADATA_HEADER,
        [
            [d, su, st, "CHEST (PA AND LAT)", v, "3056", "2544", "21800506", "213014.531"]
            for d, su, st, v, *_ in IMAGES
        ],
    )
    split = write_csv_gz(
        csv_dir / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        [[d, st, su, sp] for d, su, st, _v, sp, _ in IMAGES if sp is not None],
    )
    studies = dict.fromkeys((su, st) for _d, su, st, *_ in IMAGES)
    chexpert = write_csv_gz(
        csv_dir / "mimic-cxr-2.0.0-chexpert.csv.gz",
        ["subject_id", "study_id", *mimic_cxr.CHEXPERT_LABELS],
        [
            [su, st, *(CHEXPERT[st].get(name, "") for name in mimic_cxr.CHEXPERT_LABELS)]
            for su, st in studies
            if st in CHEXPERT
        ],
    )
    return {
        "images": jpg_root,
        "dicoms": dcm_root,
        "reports": report_root,
        "metadata": metadata,
        "split": split,
        "chexpert": chexpert,
        "out": tmp_path / "data" / "mimic_cxr" / "manifest.jsonl",
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def jpg(number: str, subject: str, study: str) -> str:
    return f"../../physionet/mimic-cxr-jpg/2.0.0/files/p{subject[:2]}/p{subject}/s{study}/{ID}{number}.jpg"


STUDY1_TEXT = "Heart size is normal. There is a small right pleural effusion. Small right pleural effusion."
STUDY2_TEXT = "Mild pulmonary edema, new since."


def frontal_rows(uncertain: str) -> list[dict]:
    effusion = {"ones": {"pleural effusion": 1}, "zeros": {"pleural effusion": 0}, "drop": {}}[uncertain]
    return [
        {
            "image": [jpg("01", "10000032", "50000001")],  # its LATERAL is filtered, the other PA has no split
            "report": STUDY1_TEXT,
            "labels": {"cardiomegaly": 0, **effusion},
            "split": "train",
            "study_id": "s50000001",
            "views": ["PA"],
        },
        {
            "image": [jpg("04", "10000032", "50000002")],
            "report": STUDY2_TEXT,
            "labels": {"atelectasis": 0, "edema": 1, **effusion},
            "split": "train",
            "study_id": "s50000002",
            "views": ["AP"],
        },
        {
            "image": [jpg("06", "10000764", "50000007")],
            "report": "No acute process.",
            "labels": {"no finding": 1},
            "split": "val",
            "study_id": "s50000007",
            "views": ["AP"],
        },
        {
            "image": [jpg("09", "12000022", "50000006")],
            "report": "Lungs are clear. No pneumothorax.",
            "labels": {},  # study not in the CheXpert CSV
            "split": "test",
            "study_id": "s50000006",
            "views": ["PA"],
        },
    ]


def run(layout: dict[str, Path], **kwargs) -> dict:
    args = {key: layout[key] for key in ("images", "reports", "metadata", "split", "chexpert", "out")}
    args.update(progress=False, **kwargs)
    return mimic_cxr.convert(**args)


@pytest.mark.parametrize("uncertain", ["ones", "zeros", "drop"])
def test_frontal_rows_and_uncertain_label_policy(layout: dict[str, Path], uncertain: str, tmp_path: Path) -> None:
    counts = run(layout, views=["PA", "AP"], ext="jpg", uncertain=uncertain)
    rows = read_jsonl(layout["out"])
    assert rows == frontal_rows(uncertain)
    assert counts == {
        "rows": 4,
        "studies": 4,
        "images": 4,
        "splits": {"train": 2, "val": 1, "test": 1},
        # LATERAL and the image without a ViewPosition; one PA image absent from the split CSV; s50000005
        # has no report file; s50000004's report is empty once cleaned; s50000003's image is not on disk.
        "skipped": {
            "other_view": 2,
            "no_split": 1,
            "missing_report": 1,
            "empty_report": 1,
            "missing_image": 1,
        },
        "manifest": str(layout["out"]),
        # images outside the manifest's folder: the root training needs is their common folder, no wider
        "data_root": str(layout["images"] / "files"),
    }
    for row in rows:
        assert all((layout["out"].parent / image).is_file() for image in row["image"])
        assert "subject_id" not in row


def test_split_files_beside_the_manifest(layout: dict[str, Path]) -> None:
    run(layout, views=["pa", "ap"], ext="jpg")  # view names are matched case-insensitively
    rows = frontal_rows("drop")
    folder = layout["out"].parent
    names = ["manifest.jsonl", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert sorted(path.name for path in folder.iterdir()) == names
    assert read_jsonl(folder / "train.jsonl") == rows[:2]
    assert read_jsonl(folder / "val.jsonl") == rows[2:3]
    assert read_jsonl(folder / "test.jsonl") == rows[3:]


def test_all_views_without_chexpert_have_no_labels_and_no_phi(layout: dict[str, Path]) -> None:
    counts = run(layout, chexpert=None, ext="jpg")
    rows = read_jsonl(layout["out"])
    # one row per study, never two: its images as a list, with their ViewPositions in the same order
    assert [(row["study_id"], row["views"]) for row in rows] == [
        ("s50000001", ["PA", "LATERAL"]),  # its other PA is not in the split CSV
        ("s50000002", ["AP"]),
        ("s50000007", ["AP"]),
        ("s50000006", ["PA", None]),  # empty ViewPosition
    ]
    assert rows[0]["image"] == [jpg("01", "10000032", "50000001"), jpg("02", "10000032", "50000001")]
    assert rows[3]["image"] == [jpg("09", "12000022", "50000006"), jpg("10", "12000022", "50000006")]
    assert all(set(row) == {"image", "report", "split", "study_id", "views"} for row in rows)
    assert counts["rows"] == counts["studies"] == 4 and counts["images"] == 6
    assert counts["skipped"] == {
        "other_view": 0,
        "no_split": 1,
        "missing_report": 1,
        "empty_report": 1,
        "missing_image": 1,
    }
    text = layout["out"].read_text(encoding="utf-8")
    for header_value in ("21800506", "213014", "3056", "CHEST (PA AND LAT)", "subject_id"):
        assert header_value not in text


def test_dicom_extension_and_sections(layout: dict[str, Path]) -> None:
    out = layout["out"].with_name("impression.jsonl")
    counts = mimic_cxr.convert(
        images=layout["dicoms"] / "files",  # the files/ folder itself is accepted too
        reports=layout["reports"],
        metadata=layout["metadata"],
        split=layout["split"],
        out=out,
        views=("PA", "LATERAL"),
        ext="dcm",
        sections=("impression",),
        progress=False,
    )
    rows = read_jsonl(out)
    assert [row["image"] for row in rows] == [[
        f"../../physionet/mimic-cxr/2.0.0/files/p10/p10000032/s50000001/{ID}01.dcm",
        f"../../physionet/mimic-cxr/2.0.0/files/p10/p10000032/s50000001/{ID}02.dcm",
    ]]
    assert rows[0]["views"] == ["PA", "LATERAL"]
    assert {row["report"] for row in rows} == {"Small right pleural effusion."}
    assert counts["skipped"]["missing_image"] == 2  # only s50000001 has DICOMs here


def test_limit_and_main_prints_summary(layout: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        *("--images", str(layout["images"]), "--reports", str(layout["reports"])),
        *("--metadata", str(layout["metadata"]), "--split", str(layout["split"])),
        *("--chexpert", str(layout["chexpert"]), "--views", "PA,AP", "--ext", "jpg", "--uncertain", "ones"),
        *("--limit", "2", "--no-progress", "--out", str(layout["out"])),
    ]
    counts = mimic_cxr.main(argv)
    assert read_jsonl(layout["out"]) == frontal_rows("ones")[:2]
    assert counts["splits"] == {"train": 2, "val": 0, "test": 0}
    assert read_jsonl(layout["out"].with_name("val.jsonl")) == []
    printed = capsys.readouterr().out
    assert f"wrote 2 studies (2 images) to {layout['out']}" in printed
    assert "studies per split: train 2, val 0, test 0" in printed


def test_rerun_replaces_previous_manifest(layout: dict[str, Path]) -> None:
    run(layout, ext="jpg")
    run(layout, ext="jpg", views=["AP"])
    assert [row["views"] for row in read_jsonl(layout["out"])] == [["AP"], ["AP"]]
    assert not list(layout["out"].parent.glob("*.tmp"))


def test_a_study_split_across_splits_is_a_data_error(layout: dict[str, Path]) -> None:
    rows = [[d, st, su, "test" if d.endswith("02") else sp] for d, su, st, _v, sp, _ in IMAGES if sp is not None]
    write_csv_gz(layout["split"], ["dicom_id", "study_id", "subject_id", "split"], rows)
    with pytest.raises(DataError, match=r"study s50000001 has images in splits \['test', 'train'\]"):
        run(layout, ext="jpg")
    assert not layout["out"].exists()


def test_missing_csv_is_a_data_error_naming_the_file(layout: dict[str, Path]) -> None:
    layout["metadata"].unlink()
    with pytest.raises(DataError, match="mimic-cxr-2.0.0-metadata.csv.gz") as info:
        run(layout, ext="jpg")
    assert info.value.path == str(layout["metadata"])
    assert not layout["out"].exists()


def test_missing_column_is_a_data_error(layout: dict[str, Path]) -> None:
    header = ["dicom_id", "study_id", "subject_id"]
    write_csv_gz(layout["split"], header, [[f"{ID}01", "50000001", "10000032"]])
    with pytest.raises(DataError, match=r"missing column\(s\) \['split'\]") as info:
        run(layout, ext="jpg")
    assert info.value.path == str(layout["split"])


def test_bad_values_are_data_errors(layout: dict[str, Path]) -> None:
    write_csv_gz(layout["split"], ["dicom_id", "split"], [[f"{ID}01", "holdout"]])
    with pytest.raises(DataError, match="line 2: split 'holdout'"):
        run(layout, ext="jpg")
    header = ["subject_id", "study_id", "Edema"]
    write_csv_gz(layout["chexpert"], header, [["10000032", "50000001", "maybe"]])
    write_csv_gz(layout["split"], ["dicom_id", "split"], [[f"{ID}01", "train"]])
    with pytest.raises(DataError, match="line 2, 'Edema': 'maybe'"):
        run(layout, ext="jpg")


def test_bad_arguments(layout: dict[str, Path]) -> None:
    with pytest.raises(MMVLError, match="ext='png'"):
        run(layout, ext="png")
    with pytest.raises(MMVLError, match="uncertain='half'"):
        run(layout, uncertain="half")
    with pytest.raises(MMVLError, match="the per-split files take that name"):
        run(layout, out=layout["out"].with_name("train.jsonl"))
    with pytest.raises(DataError, match="images folder not found"):
        run(layout, images=layout["images"] / "nowhere")
    gone = layout["split"].with_name("gone.csv")
    argv = [
        *("--images", str(layout["images"]), "--reports", str(layout["reports"])),
        *("--metadata", str(layout["metadata"]), "--split", str(gone), "--out", str(layout["out"])),
    ]
    with pytest.raises(SystemExit, match="error: .*gone.csv: CSV file not found"):
        mimic_cxr.main(argv)


def _manifests_and_names(folder: Path) -> bytes:
    """Every byte of the manifests in ``folder``, and the relative path of every file below it."""
    data = b"".join(path.read_bytes() for path in sorted(folder.glob("*.jsonl")))
    return data + "\n".join(p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))).encode()


@pytest.mark.parametrize("ext", ["jpg", "dcm"])
def test_deidentify_pseudonyms_copies_and_unchanged_splits(
    layout: dict[str, Path], tmp_path: Path, make_dicom, capsys: pytest.CaptureFixture[str], ext: str
) -> None:
    """--deidentify: no subject, study or dicom id in the manifests, file names or console; the same key gives
    the same pseudonyms; one pseudonym per study; the official split per row is unchanged."""
    import pydicom

    images = layout["images"] if ext == "jpg" else layout["dicoms"]
    if ext == "dcm":  # real DICOMs, with the subject id where PhysioNet's headers have theirs
        for number in ("01", "02"):
            make_dicom(f"physionet/mimic-cxr/2.0.0/files/p10/p10000032/s50000001/{ID}{number}.dcm",
                       np.full((4, 4), 7, np.uint16), PatientID="10000032", PatientName="SUBJECT^10000032",
                       StudyID="50000001", AccessionNumber="50000001")
    plain = run(layout, images=images, ext=ext)
    expected = read_jsonl(layout["out"])
    argv = [
        *("--images", str(images), "--reports", str(layout["reports"]), "--ext", ext),
        *("--metadata", str(layout["metadata"]), "--split", str(layout["split"])),
        *("--chexpert", str(layout["chexpert"]), "--no-progress", "--deidentify"),
    ]
    first, second = tmp_path / "anon1" / "manifest.jsonl", tmp_path / "anon2" / "manifest.jsonl"
    capsys.readouterr()
    counts = mimic_cxr.main([*argv, "--out", str(first)])
    mimic_cxr.main([*argv, "--out", str(second), "--pseudonym-key", str(first.with_name("pseudonym.key"))])
    printed = capsys.readouterr()
    rows, again = read_jsonl(first), read_jsonl(second)
    assert [(row["study_id"], row["image"]) for row in rows] == [(row["study_id"], row["image"]) for row in again]
    assert len(rows) == len(expected) == plain["rows"] == (4 if ext == "jpg" else 1)
    assert counts["data_root"] is None and counts["splits"] == plain["splits"]
    for row, original in zip(rows, expected):
        assert {**row, "image": None, "study_id": None} == {**original, "image": None, "study_id": None}
        assert len(row["image"]) == len(original["image"]) == len(set(row["image"]))
        for image in row["image"]:
            assert re.fullmatch(rf"deidentified/{row['study_id']}/[0-9a-f]{{16}}\.{ext}", image)
            assert (first.parent / image).is_file()
        assert re.fullmatch(r"anon-[0-9a-f]{16}", row["study_id"])
    pairs = {(original["study_id"], row["study_id"]) for row, original in zip(rows, expected)}
    assert len(pairs) == len(dict(pairs)) == len({pseudonym for _, pseudonym in pairs})  # one per study
    for name in ("train", "val", "test"):
        assert len(read_jsonl(first.with_name(f"{name}.jsonl"))) == plain["splits"][name]
    ids = {value for image in IMAGES for value in image[:3]}
    output = _manifests_and_names(first.parent) + _manifests_and_names(second.parent)
    for value in ids:
        assert value.encode() not in output and value not in printed.out + printed.err, value
    if ext == "dcm":
        for study_id, image in ((row["study_id"], image) for row in rows for image in row["image"]):
            copy = first.parent / image
            ds = pydicom.dcmread(copy)
            assert ds.PatientID == ds.PatientName == study_id and ds.PatientIdentityRemoved == "YES"
            assert not ds.StudyID and not ds.AccessionNumber  # PS3.15 Table E.1-1: Z, kept empty
            assert b"10000032" not in copy.read_bytes() and b"50000001" not in copy.read_bytes()
    else:
        copy, source = first.parent / rows[0]["image"][0], layout["out"].parent / expected[0]["image"][0]
        assert copy.read_bytes() == source.read_bytes()


def test_data_root_is_the_images_common_folder_never_a_system_folder(tmp_path: Path) -> None:
    out = tmp_path / "manifests"
    assert mimic_cxr.data_root(str(out / "images"), out) == {"data_root": None}  # inside: no root needed
    images = tmp_path / "mimic" / "files"
    assert mimic_cxr.data_root(str(images), out) == {"data_root": str(images)}  # not tmp_path: no wider
    for wide in ("/", "/tmp", "/etc", str(Path.home())):
        answer = mimic_cxr.data_root(wide, out)
        assert answer["data_root"] is None and f"common folder, {wide}, is too wide" in answer["data_root_problem"]
