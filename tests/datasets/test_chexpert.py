"""The CheXpert converter (datasets/chexpert.py) on a tiny fake CheXpert-v1.0-small + CheXpert Plus layout."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mmvl.errors import DataError, MMVLError
from tests.conftest import load_script
from tests.datasets.conftest import read_jsonl, write_csv

chexpert = load_script("chexpert")

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert.LABEL_COLUMNS]
# (Path in the CSV, view, AP/PA, {label: value}, image on disk?)
TRAIN = [
    (
        "train/patient00001/study1/view1_frontal.jpg",
        "Frontal",
        "AP",
        {"Cardiomegaly": "-1.0", "Edema": "0.0", "Pleural Effusion": "1.0"},
        True,
    ),
    ("train/patient00001/study1/view2_lateral.jpg", "Lateral", "", {"Pleural Effusion": "1.0"}, True),
    ("train/patient00001/study2/view1_frontal.jpg", "Frontal", "PA", {"No Finding": "1.0"}, True),
    ("train/patient00002/study1/view1_frontal.jpg", "Frontal", "AP", {"Support Devices": "1.0"}, True),  # no report
    ("train/patient00002/study2/view1_frontal.jpg", "Frontal", "AP", {}, False),  # image not downloaded
    ("train/patient00003/study1/view1_frontal.jpg", "Frontal", "AP", {"Lung Opacity": "-1.0"}, True),
    ("train/patient00003/study2/view1_frontal.jpg", "Frontal", "PA", {}, True),  # empty report
]
VALID = [
    ("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP", {"Cardiomegaly": "1.0", "Edema": "0.0"}, True),
    ("valid/patient64541/study1/view2_lateral.jpg", "Lateral", "", {"Cardiomegaly": "1.0"}, True),
]
PLUS_HEADER = [
    "path_to_image",
    "path_to_dcm",
    "frontal_lateral",
    "deid_patient_id",
    "report",
    "section_findings",
    "age",
    "sex",
]
STUDY1 = """NARRATIVE:
CHEST, 1 VIEW.

CLINICAL HISTORY: Shortness of breath.

FINDINGS:
Small right pleural effusion.  Heart size is at the upper limit of normal.

IMPRESSION:
1. Small right pleural effusion.
"""
REPORTS = {  # CheXpert Plus path_to_image -> report; the PNG release's extension must not matter
    "train/patient00001/study1/view1_frontal.jpg": STUDY1,
    "train/patient00001/study1/view2_lateral.jpg": STUDY1,
    "train/patient00001/study2/view1_frontal.png": "IMPRESSION: No acute cardiopulmonary process.",
    "train/patient00002/study2/view1_frontal.jpg": "IMPRESSION: Line in place.",
    "train/patient00003/study1/view1_frontal.jpg": "FINDINGS: Patchy right basilar opacity.",
    "train/patient00003/study2/view1_frontal.jpg": "",
    "valid/patient64541/study1/view1_frontal.jpg": "FINDINGS: Enlarged heart. IMPRESSION: Cardiomegaly.",
}
STUDY1_TEXT = (
    "Small right pleural effusion. Heart size is at the upper limit of normal. 1. Small right pleural effusion."
)


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """CheXpert-v1.0-small with train.csv, valid.csv and (most of) its JPEGs; the CheXpert Plus CSV elsewhere."""
    release = tmp_path / "stanford" / "CheXpert-v1.0-small"
    for csv_name, rows in (("train.csv", TRAIN), ("valid.csv", VALID)):
        table = []
        for path, view, ap_pa, labels, on_disk in rows:
            table.append(
                [
                    f"CheXpert-v1.0-small/{path}",
                    "Female",
                    "87",
                    view,
                    ap_pa,
                    *(labels.get(name, "") for name in chexpert.LABEL_COLUMNS),
                ]
            )
            if on_disk:
                (release / path).parent.mkdir(parents=True, exist_ok=True)
                (release / path).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
        write_csv(release / csv_name, HEADER, table)
    plus = write_csv(
        tmp_path / "chexpert_plus" / "df_chexpert_plus_240401.csv",
        PLUS_HEADER,
        [
            [path, path.replace(".jpg", ".dcm"), "Frontal", "PID99", text, "", "87", "Female"]
            for path, text in REPORTS.items()
        ],
    )
    return {"root": release.parent, "release": release, "reports": plus, "out": tmp_path / "data" / "chexpert"}


def image(path: str) -> str:
    return f"../../stanford/CheXpert-v1.0-small/{path}"


def rows_with_reports(uncertain: str, val: bool = False) -> list[dict]:
    cardiomegaly = {"ones": {"cardiomegaly": 1}, "zeros": {"cardiomegaly": 0}, "drop": {}}[uncertain]
    opacity = {"ones": {"lung opacity": 1}, "zeros": {"lung opacity": 0}, "drop": {}}[uncertain]
    return [
        {
            "image": [image("train/patient00001/study1/view1_frontal.jpg")],
            "report": STUDY1_TEXT,
            "labels": {"edema": 0, "pleural effusion": 1, **cardiomegaly},
            "split": "train",
            "study_id": "patient00001_study1",
            "views": ["AP"],
        },
        {
            "image": [image("train/patient00001/study2/view1_frontal.jpg")],
            "report": "No acute cardiopulmonary process.",
            "labels": {"no finding": 1},
            "split": "train",
            "study_id": "patient00001_study2",
            "views": ["PA"],
        },
        {
            "image": [image("train/patient00003/study1/view1_frontal.jpg")],
            "report": "Patchy right basilar opacity.",
            "labels": opacity,
            "split": "val" if val else "train",  # hashed_fraction("patient00003") = 0.061
            "study_id": "patient00003_study1",
            "views": ["AP"],
        },
        {
            "image": [image("valid/patient64541/study1/view1_frontal.jpg")],
            "report": "Enlarged heart. Cardiomegaly.",
            "labels": {"cardiomegaly": 1, "edema": 0},
            "split": "test",  # valid.csv is the test split
            "study_id": "patient64541_study1",
            "views": ["AP"],
        },
    ]


@pytest.mark.parametrize("uncertain", ["ones", "zeros", "drop"])
def test_frontal_rows_labels_and_skips(layout: dict[str, Path], uncertain: str, tmp_path: Path) -> None:
    counts = chexpert.convert(
        layout["root"], layout["out"], reports=layout["reports"], uncertain=uncertain, progress=False
    )
    manifest = layout["out"] / "manifest.jsonl"
    assert read_jsonl(manifest) == rows_with_reports(uncertain)
    assert counts == {
        "rows": 4,
        "studies": 4,
        "images": 4,
        "splits": {"train": 3, "val": 0, "test": 1},  # no patient hashes below the default 0.05
        # two laterals; patient00002/study1 has no CheXpert Plus row, patient00003/study2 an empty report;
        # patient00002/study2's image is not on disk.
        "skipped": {"other_view": 2, "missing_report": 1, "empty_report": 1, "missing_image": 1},
        "without_report": 0,
        "label_conflicts": 0,
        "manifest": str(manifest),
        "data_root": str(layout["release"]),  # the images' common folder (outside the manifest's), no wider
    }
    for row in read_jsonl(manifest):
        assert all((manifest.parent / path).is_file() for path in row["image"])


def test_patient_level_val_split_and_split_files(layout: dict[str, Path]) -> None:
    assert chexpert.hashed_split("patient00003", 0.1) == "val"  # pins the hash: 0.061 < 0.1 < 0.22 (patient00002)
    counts = chexpert.convert(
        layout["release"], layout["out"], reports=layout["reports"], val_fraction=0.1, progress=False
    )
    rows = rows_with_reports("drop", val=True)
    folder = layout["out"]
    assert sorted(path.name for path in folder.iterdir()) == [
        "manifest.jsonl",
        "test.jsonl",
        "train.jsonl",
        "val.jsonl",
    ]
    assert read_jsonl(folder / "train.jsonl") == rows[:2]
    assert read_jsonl(folder / "val.jsonl") == rows[2:3]
    assert read_jsonl(folder / "test.jsonl") == rows[3:]
    assert counts["splits"] == {"train": 2, "val": 1, "test": 1}


def test_main_all_views_and_missing_reports_kept(layout: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = layout["out"] / "all.jsonl"  # a .jsonl path names the manifest itself
    argv = [
        str(layout["root"]),
        "--out",
        str(out),
        "--reports",
        str(layout["reports"]),
        "--views",
        "all",
        "--allow-missing-report",
        "--uncertain",
        "zeros",
        "--no-progress",
    ]
    counts = chexpert.main(argv)
    rows = read_jsonl(out)
    # one row per study, never two: its images in CSV order, their views, the report of any of them
    assert [(row["study_id"], row["views"], row["report"][:12]) for row in rows] == [
        ("patient00001_study1", ["AP", "LATERAL"], "Small right "),
        ("patient00001_study2", ["PA"], "No acute car"),
        ("patient00002_study1", ["AP"], ""),  # no report: kept for zero-shot evaluation
        ("patient00003_study1", ["AP"], "Patchy right"),
        ("patient00003_study2", ["PA"], ""),
        ("patient64541_study1", ["AP", "LATERAL"], "Enlarged hea"),  # the lateral has no report of its own
    ]
    assert rows[0]["image"] == [image("train/patient00001/study1/view1_frontal.jpg"),
                                image("train/patient00001/study1/view2_lateral.jpg")]
    assert rows[2]["labels"] == {"support devices": 1}
    # a blank label of one view yields to the other view's value
    assert rows[5]["labels"] == {"cardiomegaly": 1, "edema": 0} and rows[0]["labels"]["cardiomegaly"] == 0
    assert counts["skipped"] == {"other_view": 0, "missing_report": 0, "empty_report": 0, "missing_image": 1}
    assert counts["without_report"] == 2 and counts["images"] == 8 and counts["label_conflicts"] == 0
    printed = capsys.readouterr().out
    assert f"wrote 6 studies (8 images) to {out}" in printed
    assert "studies kept without a report: 2" in printed
    text = out.read_text(encoding="utf-8")
    for private in ("Female", "87", "PID99", "Sex", "Age"):  # patient attributes of both CSVs stay out
        assert private not in text


def test_images_of_one_study_that_disagree_on_a_label_leave_it_unknown(layout: dict[str, Path]) -> None:
    rows = [[f"CheXpert-v1.0-small/{path}", "F", "1", view, ap_pa,
             *({"Edema": edema, "Pleural Effusion": "1.0"}.get(name, "") for name in chexpert.LABEL_COLUMNS)]
            for (path, view, ap_pa, *_), edema in zip(TRAIN[:2], ("1.0", "0.0"))]
    write_csv(layout["release"] / "train.csv", HEADER, rows)
    counts = chexpert.convert(layout["root"], layout["out"], reports=layout["reports"], views="all", progress=False)
    first = read_jsonl(layout["out"] / "manifest.jsonl")[0]
    assert first["study_id"] == "patient00001_study1" and first["labels"] == {"pleural effusion": 1}
    assert counts["label_conflicts"] == 1


def test_images_and_labels_only_without_reports(layout: dict[str, Path]) -> None:
    counts = chexpert.convert(layout["root"], layout["out"], allow_missing_report=True, progress=False)
    rows = read_jsonl(layout["out"] / "manifest.jsonl")
    assert {row["report"] for row in rows} == {""}
    assert counts["rows"] == counts["without_report"] == 6  # the frontal images on disk


def test_sections(layout: dict[str, Path]) -> None:
    chexpert.convert(layout["root"], layout["out"], reports=layout["reports"], sections=["impression"], progress=False)
    assert read_jsonl(layout["out"] / "manifest.jsonl")[0]["report"] == "1. Small right pleural effusion."


def test_no_reports_is_an_error_unless_allowed(layout: dict[str, Path]) -> None:
    with pytest.raises(MMVLError, match="CheXpert has no reports of its own"):
        chexpert.convert(layout["root"], layout["out"], progress=False)
    with pytest.raises(SystemExit, match="error: CheXpert has no reports"):
        chexpert.main([str(layout["root"]), "--out", str(layout["out"])])
    assert not list(layout["out"].glob("*"))  # nothing written, not even .tmp files


def test_bad_values_are_data_errors_naming_file_line_and_column(layout: dict[str, Path]) -> None:
    train_csv = layout["release"] / "train.csv"
    write_csv(
        train_csv, HEADER, [[f"CheXpert-v1.0-small/{TRAIN[0][0]}", "F", "1", "Frontal", "AP", "maybe", *[""] * 13]]
    )
    with pytest.raises(DataError, match=r"line 2, 'Atelectasis': 'maybe' is not one of 1, 0, -1 or empty") as info:
        chexpert.convert(layout["root"], layout["out"], reports=layout["reports"], progress=False)
    assert info.value.path == str(train_csv)
    write_csv(train_csv, HEADER, [["patient00001/view1_frontal.jpg", "F", "1", "Frontal", "AP", *[""] * 14]])
    with pytest.raises(DataError, match=r"line 2, 'Path': .* is not <release>/<split>/<patient>/<study>/<view file>"):
        chexpert.convert(layout["root"], layout["out"], reports=layout["reports"], progress=False)
    write_csv(train_csv, HEADER[:5], [])
    with pytest.raises(DataError, match=r"missing column\(s\) \['Atelectasis'"):
        chexpert.convert(layout["root"], layout["out"], reports=layout["reports"], progress=False)
    assert not list(layout["out"].glob("*"))  # nothing written, not even .tmp files


def test_missing_files_and_bad_arguments(layout: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="no train.csv here") as info:
        chexpert.convert(layout["root"] / "elsewhere", layout["out"], allow_missing_report=True)
    assert info.value.path == str(layout["root"] / "elsewhere")
    with pytest.raises(DataError, match="gone.csv: CSV file not found; download CheXpert Plus"):
        chexpert.convert(layout["root"], layout["out"], reports=layout["reports"].with_name("gone.csv"))
    (layout["release"] / "valid.csv").unlink()
    with pytest.raises(DataError, match="valid.csv: CSV file not found"):
        chexpert.convert(layout["root"], layout["out"], reports=layout["reports"], progress=False)
    with pytest.raises(MMVLError, match="views='lateral'"):
        chexpert.convert(layout["root"], layout["out"], views="lateral", allow_missing_report=True)
    with pytest.raises(MMVLError, match="uncertain='half'"):
        chexpert.convert(layout["root"], layout["out"], uncertain="half", allow_missing_report=True)
    with pytest.raises(MMVLError, match="val_fraction=1.0"):
        chexpert.convert(layout["root"], layout["out"], val_fraction=1.0, allow_missing_report=True)
    assert not list(layout["out"].glob("*"))  # nothing written, not even .tmp files


def test_nothing_to_write_is_an_error_and_keeps_the_previous_manifest(layout: dict[str, Path]) -> None:
    chexpert.convert(layout["root"], layout["out"], reports=layout["reports"], progress=False)
    before = (layout["out"] / "manifest.jsonl").read_text(encoding="utf-8")
    for path in layout["release"].rglob("*.jpg"):
        path.unlink()
    with pytest.raises(
        SystemExit,
        match=r"error: .*no rows to write \(skipped: other_view 2, missing_report 1, "
        r"empty_report 1, missing_image 5\)",
    ):
        chexpert.main([str(layout["root"]), "--out", str(layout["out"]), "--reports", str(layout["reports"])])
    assert (layout["out"] / "manifest.jsonl").read_text(encoding="utf-8") == before
    assert not list(layout["out"].glob("*.tmp"))


def test_deidentify_pseudonyms_links_and_unchanged_splits(
    layout: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--deidentify: no patient id in the manifests, file names or console; the same key gives the same
    pseudonyms; one pseudonym per study; the patient-level split is the one without the flag."""
    options = ["--reports", str(layout["reports"]), "--views", "all", "--allow-missing-report", "--val-fraction", "0.1"]
    plain = chexpert.main([str(layout["root"]), "--out", str(layout["out"]), *options, "--no-progress"])
    expected = read_jsonl(layout["out"] / "manifest.jsonl")
    capsys.readouterr()
    argv = [str(layout["root"]), *options, "--no-progress", "--deidentify"]
    chexpert.main([*argv, "--out", str(tmp_path / "anon1")])
    key = tmp_path / "anon1" / "pseudonym.key"
    chexpert.main([*argv, "--out", str(tmp_path / "anon2"), "--pseudonym-key", str(key)])
    printed = capsys.readouterr()
    rows, again = read_jsonl(tmp_path / "anon1" / "manifest.jsonl"), read_jsonl(tmp_path / "anon2" / "manifest.jsonl")
    assert [(row["study_id"], row["image"]) for row in rows] == [(row["study_id"], row["image"]) for row in again]
    assert len(rows) == len(expected) == plain["rows"] == 6
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    for row, original in zip(rows, expected):
        assert {**row, "image": None, "study_id": None} == {**original, "image": None, "study_id": None}
        assert len(row["image"]) == len(original["image"])
        for path, original_path in zip(row["image"], original["image"]):
            assert re.fullmatch(rf"deidentified/{row['study_id']}/[0-9a-f]{{16}}\.jpg", path)
            copy = tmp_path / "anon1" / path
            assert os.path.samefile(copy, layout["out"] / original_path) or copy.read_bytes() == (
                layout["out"] / original_path
            ).read_bytes()
    pairs = {(original["study_id"], row["study_id"]) for row, original in zip(rows, expected)}
    assert len(pairs) == len(dict(pairs)) == len({pseudonym for _, pseudonym in pairs}) == 6  # one per study
    for name in ("train", "val", "test"):
        assert len(read_jsonl(tmp_path / "anon1" / f"{name}.jsonl")) == plain["splits"][name]
    for folder in (tmp_path / "anon1", tmp_path / "anon2"):
        output = b"".join(path.read_bytes() for path in folder.glob("*.jsonl"))
        output += "\n".join(path.relative_to(folder).as_posix() for path in folder.rglob("*")).encode()
        for value in ("patient", "study1", "study2", "view1", "view2"):
            assert value.encode() not in output.lower() and value not in (printed.out + printed.err).lower(), value
