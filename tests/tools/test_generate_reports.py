"""tools/generate_reports.py end to end: train a report model for a few steps with tools/train.py, write reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_tool

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report_work_dir(synthetic_cxr, tmp_path_factory):
    work = tmp_path_factory.mktemp("report_cli") / "work"
    code = load_tool("train").main([
        str(REPO / "configs" / "demo" / "cxr_report_tiny.py"), "--work-dir", str(work),
        "--cfg-options", f"data.manifest={synthetic_cxr}", "train.max_steps=2", "train.batch_size=8",
        "train.num_workers=0", "train.val_interval=2", "optim.warmup_steps=0", "model.image_encoder.depth=1",
        "model.image_encoder.embed_dim=64", "model.image_encoder.num_heads=2", "model.heads.0.decoder_dim=32",
        "model.heads.0.decoder_heads=2", "model.heads.0.decoder_depth=1",
    ])
    assert code == 0
    return work


def test_generate_reports_cli(report_work_dir, synthetic_cxr, tmp_path, capsys):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not a dicom" * 20)
    out = tmp_path / "reports.jsonl"
    code = load_tool("generate_reports").main([
        str(report_work_dir), str(bad), "--manifest", str(synthetic_cxr.parent / "test.jsonl"), "--limit", "5",
        "--method", "beam", "--num-beams", "2", "--max-length", "12", "--batch-size", "3", "--out", str(out),
    ])
    assert code == 1  # one input failed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    assert rows[0]["path"] == str(bad) and "not a DICOM file" in rows[0]["error"] and "report" not in rows[0]
    for row in rows[1:]:
        assert "error" not in row and isinstance(row["report"], str) and row["study_id"].startswith("syn")
        assert 1 <= row["n_tokens"] <= 11
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["requested"]["method"] == "beam" and sidecar["n_failed"] == 1
    assert sidecar["decoding"] == {"method": "beam", "num_beams": 2, "length_penalty": 1.0, "early_stopping": True,
                                   "max_length": 12, "no_repeat_ngram_size": 0}
    metrics = sidecar["metrics"]
    assert metrics["n_with_reference"] == 4 and 0.0 <= metrics["bleu4"] <= 1.0 and 0.0 <= metrics["rouge_l"] <= 1.0
    assert metrics["findings"]["findings"] == ["pleural effusion", "cardiomegaly", "pneumothorax", "nodule"]
    printed = capsys.readouterr().out
    assert "BLEU-4" in printed and "ROUGE-L" in printed and "majority class" in printed


def test_generate_reports_cli_on_a_folder_with_greedy(report_work_dir, synthetic_cxr, tmp_path):
    out = tmp_path / "folder.jsonl"
    code = load_tool("generate_reports").main([
        str(report_work_dir), str(synthetic_cxr.parent / "images"), "--limit", "3", "--method", "greedy",
        "--max-length", "8", "--out", str(out),
    ])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(row["path"]).name for row in rows] == ["000000.dcm", "000001.dcm", "000002.dcm"]
    assert all("study_id" not in row and "report" in row for row in rows)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert "metrics" not in sidecar and sidecar["decoding"]["method"] == "greedy"


def test_a_one_beam_search_is_recorded_as_the_greedy_search_it_is(report_work_dir, synthetic_cxr, tmp_path):
    out = tmp_path / "one_beam.jsonl"
    assert load_tool("generate_reports").main([
        str(report_work_dir), str(synthetic_cxr.parent / "images"), "--limit", "2", "--method", "beam",
        "--num-beams", "1", "--max-length", "8", "--out", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["requested"]["method"] == "beam" and sidecar["requested"]["num_beams"] == 1
    assert sidecar["decoding"] == {"method": "greedy", "max_length": 8, "no_repeat_ngram_size": 0}


def test_generate_reports_cli_errors(report_work_dir, tmp_path, capsys):
    tool = load_tool("generate_reports")
    assert tool.main([str(tmp_path / "nowhere"), "x.dcm"]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert tool.main([str(report_work_dir), "x.dcm", "--max-length", "1000"]) == 2
    assert "--max-length must be in [2, 256]" in capsys.readouterr().err
    assert tool.main([str(report_work_dir)]) == 2
    assert "no inputs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main([str(report_work_dir), "x.dcm", "--num-beams", "0"])
