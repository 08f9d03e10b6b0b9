"""End to end through the command-line tools: train a few steps, zero-shot the result, check outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import load_tool

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(synthetic_cxr, tmp_path_factory):
    work = tmp_path_factory.mktemp("cli") / "work"
    code = load_tool("train").main([
        str(REPO / "configs" / "demo" / "cxr_clip_tiny.py"), "--work-dir", str(work), "--seed", "3",
        "--cfg-options", f"data.manifest={synthetic_cxr}", "train.max_steps=2", "train.batch_size=8",
        "train.num_workers=0", "train.val_interval=2", "optim.warmup_steps=0", "model.image_encoder.depth=1",
        "model.text_encoder.config.num_hidden_layers=1",
    ])
    assert code == 0
    return work


def test_train_cli_writes_work_dir(trained):
    text = (trained / "config.py").read_text()
    assert "'seed': 3" in text and "'max_steps': 2" in text and "'depth': 1" in text
    assert json.loads((trained / "preprocess.json").read_text())["pipeline"][1] == {"type": "ResizePad", "size": 64}


def test_train_cli_reports_config_errors(capsys):
    code = load_tool("train").main([str(REPO / "configs" / "demo" / "cxr_clip_tiny.py"),
                                    "--cfg-options", "train.max_stepz=3"])
    assert code == 2
    assert "unknown key 'max_stepz'" in capsys.readouterr().err


def test_zero_shot_cli(trained, synthetic_cxr, tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not a dicom" * 20)
    out = tmp_path / "preds.csv"
    code = load_tool("zero_shot").main([
        str(trained), str(bad), "--manifest", str(synthetic_cxr.parent / "test.jsonl"), "--limit", "6",
        "--labels", "pleural effusion,pneumothorax", "--preset", "ctclip", "--out", str(out),
    ])
    assert code == 1  # one input failed
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and list(rows[0]) == ["path", "study_id", "view", "pleural effusion", "pneumothorax", "error"]
    assert rows[0]["path"] == str(bad) and "not a DICOM file" in rows[0]["error"]
    for row in rows[1:]:
        assert row["error"] == "" and row["study_id"].startswith("syn")
        assert 0.0 <= float(row["pneumothorax"]) <= 1.0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["preset"] == "ctclip" and sidecar["n_failed"] == 1
    assert sidecar["prompts"]["pneumothorax"]["negative"] == ["pneumothorax is not present."]


def test_no_patient_identifiers_in_artefacts(trained, synthetic_cxr, tmp_path):
    import pydicom

    header = pydicom.dcmread(next((synthetic_cxr.parent / "images").glob("*.dcm")))
    secrets = [str(header.PatientName), str(header.PatientID)]
    assert all(secrets)
    out = tmp_path / "p.csv"
    load_tool("zero_shot").main([str(trained), str(synthetic_cxr.parent / "images"), "--limit", "4",
                                 "--labels", "nodule", "--out", str(out)])
    for path in [*trained.rglob("*"), out, out.with_suffix(".json")]:
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, (secret, path)
