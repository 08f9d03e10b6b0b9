"""The CT-RATE converter (datasets/ct_rate.py) on a tiny fake copy of the HuggingFace dataset layout."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mmvl.errors import DataError, MMVLError
from tests.conftest import load_script
from tests.datasets.conftest import read_jsonl, write_csv

ct_rate = load_script("ct_rate")

REPORT_HEADER = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
EFFUSION = ("Cough.", "Non-contrast chest CT.", "Trachea is open.\n Minimal  pleural effusion.", "Right effusion.")
NORMAL = ("Screening.", "Non-contrast chest CT.", "No nodule.", "Normal chest CT.")
# VolumeName -> (report columns, on disk?, in the metadata CSV?)
VOLUMES = {
    "train_1_a_1.nii.gz": (EFFUSION, True, True),
    "train_1_a_2.nii.gz": (EFFUSION, True, True),
    "train_1_b_1.nii.gz": (("Follow-up.", "Non-contrast chest CT.", "", ""), True, True),  # no findings/impression
    "train_2_a_1.nii.gz": (NORMAL, False, True),  # not downloaded: reconstruction 2 stands in for it
    "train_2_a_2.nii.gz": (NORMAL, True, True),
    "train_3_a_1.nii.gz": (NORMAL, True, False),  # no metadata row
    "train_5_a_1.nii.gz": (NORMAL, True, True),  # not in the labels CSV
    "valid_1_a_1.nii.gz": (EFFUSION, True, True),
    "valid_1_a_2.nii.gz": (EFFUSION, True, True),
}
LABELLED = {"train_1_a_1": {"Pleural effusion": 1}, "valid_1_a_1": {"Pleural effusion": 1, "Cardiomegaly": 1}}
METADATA_HEADER = [
    "VolumeName",
    "Manufacturer",
    "PatientSex",
    "PatientAge",
    "RescaleSlope",
    "RescaleIntercept",
    "XYSpacing",
    "ZSpacing",
]
SPACING = {"train": ("[0.75, 0.7]", "1.5"), "valid": ("[0.6, 0.6]", "1.0")}
EFFUSION_TEXT = "Trachea is open. Minimal pleural effusion. Right effusion."
NORMAL_TEXT = "No nodule. Normal chest CT."


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """CT-RATE/dataset with volumes, reports, predicted labels and metadata for a train and a valid part."""
    root = tmp_path / "CT-RATE" / "dataset"
    for part, reports_name, labels_name, metadata_name in (
        ("train", "train_reports", "train_predicted_labels", "train_metadata"),
        ("valid", "validation_reports", "valid_predicted_labels", "validation_metadata"),
    ):
        names = [name for name in VOLUMES if name.startswith(part)]
        for name in names:
            if VOLUMES[name][1]:  # dataset/train/train_1/train_1_a/train_1_a_1.nii.gz
                patient, scan = name.split("_")[:2], name.rsplit("_", 1)[0]
                path = root / part / "_".join(patient) / scan / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"\x1f\x8b not really a NIfTI")
        write_csv(
            root / "radiology_text_reports" / f"{reports_name}.csv",
            REPORT_HEADER,
            [[name, *VOLUMES[name][0]] for name in names],
        )
        labels = [name for name in names if not name.startswith("train_5")]
        write_csv(
            root / "multi_abnormality_labels" / f"{labels_name}.csv",
            ["VolumeName", *ct_rate.ABNORMALITIES],
            [
                [
                    name,
                    *(
                        LABELLED.get(name.removesuffix(".nii.gz"), {}).get(column, 0)
                        for column in ct_rate.ABNORMALITIES
                    ),
                ]
                for name in labels
            ],
        )
        xy, z = SPACING[part]
        write_csv(
            root / "metadata" / f"{metadata_name}.csv",
            METADATA_HEADER,
            [
                [name, "PHILIPS", "M", "063Y", "1.0", "-1024.0" if part == "train" else "-8192", xy, z]
                for name in names
                if VOLUMES[name][2]
            ],
        )
    return root


def volume(part: str, name: str) -> str:
    patient, scan = "_".join(name.split("_")[:2]), name.rsplit("_", 1)[0]
    return f"../../CT-RATE/dataset/{part}/{patient}/{scan}/{name}.nii.gz"


def labels(**positive: int) -> dict[str, int]:
    values = {name.lower(): 0 for name in ct_rate.ABNORMALITIES}
    values.update({name.replace("_", " "): value for name, value in positive.items()})
    return values


TRAIN_RESCALE = {"spacing": [0.75, 0.7, 1.5], "rescale": {"slope": 1.0, "intercept": -1024.0}}
VALID_RESCALE = {"spacing": [0.6, 0.6, 1.0], "rescale": {"slope": 1.0, "intercept": -8192.0}}
ROW_1A1 = {
    "image": volume("train", "train_1_a_1"),
    "report": EFFUSION_TEXT,
    "labels": labels(pleural_effusion=1),
    "split": "val",  # hashed_fraction("train_1") = 0.025, below the default 0.05
    "study_id": "train_1_a",
    **TRAIN_RESCALE,
}
ROW_2A2 = {
    "image": volume("train", "train_2_a_2"),
    "report": NORMAL_TEXT,
    "labels": labels(),
    "split": "train",
    "study_id": "train_2_a",
    **TRAIN_RESCALE,
}
ROW_5A1 = {
    "image": volume("train", "train_5_a_1"),
    "report": NORMAL_TEXT,
    "labels": {},  # absent from the labels CSV: unknown, not negative
    "split": "train",
    "study_id": "train_5_a",
    **TRAIN_RESCALE,
}
ROW_VALID_1A1 = {
    "image": volume("valid", "valid_1_a_1"),
    "report": EFFUSION_TEXT,
    "labels": labels(pleural_effusion=1, cardiomegaly=1),
    "split": "test",  # CT-RATE's validation set is the test split
    "study_id": "valid_1_a",
    **VALID_RESCALE,
}


def test_first_reconstruction_per_scan(dataset: Path, tmp_path: Path) -> None:
    out = dataset.parents[1] / "data" / "ct_rate"
    counts = ct_rate.convert(dataset, out, progress=False)
    manifest = out / "manifest.jsonl"
    assert read_jsonl(manifest) == [ROW_1A1, ROW_2A2, ROW_5A1, ROW_VALID_1A1]
    assert counts == {
        "rows": 4,
        "studies": 4,
        "splits": {"train": 2, "val": 1, "test": 1},
        # train_1_a_2 and valid_1_a_2 (a reconstruction of the scan was kept); train_1_b_1 has neither
        # findings nor impression; train_3_a_1 has no metadata; train_2_a_1 is not on disk.
        "skipped": {"other_reconstruction": 2, "empty_report": 1, "missing_metadata": 1, "missing_volume": 1},
        "manifest": str(manifest),
        "data_root": str(tmp_path / "CT-RATE" / "dataset"),  # the images' common folder, no wider
    }
    assert read_jsonl(out / "val.jsonl") == [ROW_1A1]
    assert read_jsonl(out / "train.jsonl") == [ROW_2A2, ROW_5A1]
    assert read_jsonl(out / "test.jsonl") == [ROW_VALID_1A1]
    for row in read_jsonl(manifest):
        assert (out / row["image"]).is_file()
    text = manifest.read_text(encoding="utf-8")
    for private in ("PHILIPS", "063Y", "Cough", "Screening"):  # metadata and clinical information stay out
        assert private not in text


def test_main_all_reconstructions(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = dataset.parent / "manifests" / "all.jsonl"
    argv = [str(dataset.parent), "--out", str(out), "--reconstructions", "all", "--val-fraction", "0", "--no-progress"]
    counts = ct_rate.main(argv)
    rows = read_jsonl(out)
    assert [(row["study_id"], row["image"].rsplit("/", 1)[1], row["split"]) for row in rows] == [
        ("train_1_a", "train_1_a_1.nii.gz", "train"),
        ("train_1_a", "train_1_a_2.nii.gz", "train"),
        ("train_2_a", "train_2_a_2.nii.gz", "train"),
        ("train_5_a", "train_5_a_1.nii.gz", "train"),
        ("valid_1_a", "valid_1_a_1.nii.gz", "test"),
        ("valid_1_a", "valid_1_a_2.nii.gz", "test"),
    ]
    assert rows[1]["labels"] == labels()  # labels are per volume in the CSV
    assert counts["skipped"] == {
        "other_reconstruction": 0,
        "empty_report": 1,
        "missing_metadata": 1,
        "missing_volume": 1,
    }
    printed = capsys.readouterr().out
    assert f"wrote 6 volumes from 4 studies to {out}" in printed
    assert "per split: train 4, val 0, test 2" in printed


def test_without_file_checks_and_other_sections(dataset: Path) -> None:
    out = dataset / "manifest.jsonl"
    counts = ct_rate.convert(dataset, out, check_files=False, sections=["impression", "history"], progress=False)
    rows = read_jsonl(out)
    assert [row["image"].rsplit("/", 1)[1] for row in rows] == [
        "train_1_a_1.nii.gz",
        "train_1_b_1.nii.gz",  # its clinical information is text enough for these sections
        "train_2_a_1.nii.gz",  # taken unseen: the first reconstruction, whether it is on disk or not
        "train_5_a_1.nii.gz",
        "valid_1_a_1.nii.gz",
    ]
    assert rows[0]["report"] == "Right effusion. Cough."
    assert rows[1]["report"] == "Follow-up."
    assert counts["skipped"] == {
        "other_reconstruction": 3,
        "empty_report": 0,
        "missing_metadata": 1,
        "missing_volume": 0,
    }


def test_bad_values_are_data_errors(dataset: Path) -> None:
    out = dataset.parent / "out"
    metadata = dataset / "metadata" / "train_metadata.csv"
    write_csv(metadata, METADATA_HEADER, [["train_1_a_1.nii.gz", "", "", "", "1", "-1024", "[0.75]", "1.5"]])
    with pytest.raises(DataError, match=r"line 2, 'XYSpacing': '\[0.75\]' is not 2 number\(s\)") as info:
        ct_rate.convert(dataset, out, progress=False)
    assert info.value.path == str(metadata)
    write_csv(metadata, METADATA_HEADER, [["train_1_a_1.nii.gz", "", "", "", "1", "-1024", "[0.75, 0.75]", "0"]])
    with pytest.raises(DataError, match=r"line 2: spacing \[0.75, 0.75, 0.0\] must be positive"):
        ct_rate.convert(dataset, out, progress=False)
    write_csv(metadata, METADATA_HEADER, [["scan_1.nii.gz", "", "", "", "1", "-1024", "[0.75, 0.75]", "1"]])
    with pytest.raises(DataError, match=r"line 2, 'VolumeName': 'scan_1.nii.gz' is not like train_1_a_1.nii.gz"):
        ct_rate.convert(dataset, out, progress=False)
    labels_csv = dataset / "multi_abnormality_labels" / "train_predicted_labels.csv"
    write_csv(labels_csv, ["VolumeName", *ct_rate.ABNORMALITIES], [["train_1_a_1.nii.gz", "2", *["0"] * 17]])
    with pytest.raises(DataError, match=r"line 2, 'Medical material': '2' is not one of 1, 0 or empty"):
        ct_rate.convert(dataset, out, progress=False)
    labels_csv.unlink()
    with pytest.raises(DataError, match="train_predicted_labels.csv: CSV file not found; download it from"):
        ct_rate.convert(dataset, out, progress=False)
    assert not list(out.glob("*"))


def test_bad_arguments_and_missing_dataset(dataset: Path) -> None:
    out = dataset.parent / "out"
    with pytest.raises(MMVLError, match="reconstructions='last'"):
        ct_rate.convert(dataset, out, reconstructions="last")
    with pytest.raises(MMVLError, match=r"sections=\['conclusion'\]: choose from"):
        ct_rate.convert(dataset, out, sections=["conclusion"])
    with pytest.raises(DataError, match="no radiology_text_reports folder here"):
        ct_rate.convert(dataset / "train", out)
    with pytest.raises(SystemExit, match="error: val_fraction=-0.1"):
        ct_rate.main([str(dataset), "--out", str(out), "--val-fraction", "-0.1"])
    for path in (dataset / "train").rglob("*.nii.gz"):
        path.unlink()
    for path in (dataset / "valid").rglob("*.nii.gz"):
        path.unlink()
    with pytest.raises(DataError, match=r"no rows to write \(skipped: empty_report 1, missing_metadata 1, "):
        ct_rate.convert(dataset, out, progress=False)
    assert not list(out.glob("*"))


def test_deidentify_pseudonyms_links_and_unchanged_splits(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--deidentify: no volume, scan or patient name in the manifests, file names or console; the same key
    gives the same pseudonyms; reconstructions of one scan share one; the split is the one without the flag."""
    options = ["--reconstructions", "all", "--no-progress"]
    plain = ct_rate.main([str(dataset), "--out", str(tmp_path / "plain"), *options])
    expected = read_jsonl(tmp_path / "plain" / "manifest.jsonl")
    capsys.readouterr()
    argv = [str(dataset), *options, "--deidentify"]
    ct_rate.main([*argv, "--out", str(tmp_path / "anon1")])
    key = tmp_path / "anon1" / "pseudonym.key"
    ct_rate.main([*argv, "--out", str(tmp_path / "anon2"), "--pseudonym-key", str(key)])
    printed = capsys.readouterr()
    rows, again = read_jsonl(tmp_path / "anon1" / "manifest.jsonl"), read_jsonl(tmp_path / "anon2" / "manifest.jsonl")
    assert [(row["study_id"], row["image"]) for row in rows] == [(row["study_id"], row["image"]) for row in again]
    assert len(rows) == len(expected) == plain["rows"] == 6
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    for row, original in zip(rows, expected):
        assert {**row, "image": None, "study_id": None} == {**original, "image": None, "study_id": None}
        assert re.fullmatch(rf"deidentified/{row['study_id']}/[0-9a-f]{{16}}\.nii\.gz", row["image"])
        copy, source = tmp_path / "anon1" / row["image"], tmp_path / "plain" / original["image"]
        assert os.path.samefile(copy, source) or copy.read_bytes() == source.read_bytes()
    pairs = {(original["study_id"], row["study_id"]) for row, original in zip(rows, expected)}
    assert len(pairs) == len(dict(pairs)) == len({pseudonym for _, pseudonym in pairs}) == 4  # one per scan
    for name in ("train", "val", "test"):
        assert len(read_jsonl(tmp_path / "anon1" / f"{name}.jsonl")) == plain["splits"][name]
    for folder in (tmp_path / "anon1", tmp_path / "anon2"):
        output = b"".join(path.read_bytes() for path in folder.glob("*.jsonl"))
        output += "\n".join(path.relative_to(folder).as_posix() for path in folder.rglob("*")).encode()
        for value in ("train_", "valid_"):
            assert value.encode() not in output and value not in printed.out + printed.err, value
    with pytest.raises(SystemExit, match="must be on disk"):
        ct_rate.main([*argv, "--no-check-files", "--out", str(tmp_path / "anon3")])
