"""tools/evaluate.py end to end on the tiny CLIP model trained on the synthetic CXR set: zero-shot (with plots),
retrieval and linear probes, unreadable images, bad arguments; and a report model scored with pycocoevalcap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, load_tool

FINDINGS = ["cardiomegaly", "nodule", "pleural effusion", "pneumothorax"]  # the manifest's labels, sorted

pytestmark = pytest.mark.slow


def evaluate(*argv: str) -> int:
    return load_tool("evaluate").main([*map(str, argv)])


def split_size(manifest: Path, split: str) -> int:
    return sum(json.loads(line)["split"] == split for line in manifest.read_text().splitlines())


def check_classification(metrics: dict, labels: list[str], n_rows: int) -> None:
    assert list(metrics["labels"]) == labels and metrics["n_rows"] == n_rows
    for entry in metrics["labels"].values():
        assert entry["threshold_source"] == "val" and 0.0 <= entry["threshold"] <= 1.0
        if "skipped" not in entry:
            assert 0.0 <= entry["auroc_ci"][0] <= entry["auroc"] <= entry["auroc_ci"][1] <= 1.0
            assert 0.0 <= entry["f1"] <= 1.0 and len(entry["f1_ci"]) == 2
    for average in ("macro", "micro"):
        assert math.isfinite(metrics[average]["auroc"]) and 0.0 <= metrics[average]["auroc"] <= 1.0
    assert metrics["bootstrap"] == {"n_resamples": 50, "seed": 3, "confidence": 0.95, "unit": "study",
                                    "n_units": n_rows, "method": "percentile"}  # one study per synthetic row


def test_zero_shot_with_plots(tiny_clip, synthetic_cxr, tmp_path, one_thread, capsys):
    work_dir, _ = tiny_clip
    out, plots = tmp_path / "zero_shot.json", tmp_path / "plots"
    code = evaluate(work_dir, "--manifest", synthetic_cxr, "--task", "zero_shot", "--out", out, "--plots", plots,
                    "--n-bootstrap", "50", "--seed", "3", "--batch-size", "7", "--device", "cpu")
    assert code == 0
    record = json.loads(out.read_text())
    n_test = split_size(synthetic_cxr, "test")
    assert record["task"] == "zero_shot" and record["model"].endswith("best.pt") and record["labels"] == FINDINGS
    assert record["n_rows"] == {"test": n_test, "val": split_size(synthetic_cxr, "val")} and record["failed"] == []
    assert record["preset"] == "chexzero" and record["mode"] == "pairwise" and record["seed"] == 3
    assert record["prompts"]["nodule"] == {"positive": ["nodule"], "negative": ["no nodule"]}
    assert record["mmvl_version"] and record["logit_scale"] > 0
    metrics = record["metrics"]
    check_classification(metrics, FINDINGS, n_test)
    assert 0.0 <= metrics["macro"]["auroc"] <= 1.0  # whether it beats chance is asserted elsewhere
    expected = {f"roc_{name.replace(' ', '_')}.png" for name in FINDINGS} | {"calibration.png"}
    assert {Path(path).name for path in record["plots"]} == expected == {path.name for path in plots.iterdir()}
    for path in plots.iterdir():
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) >= 300
    printed = capsys.readouterr().out
    assert "pleural effusion" in printed and "macro (4 labels)" in printed and "micro" in printed


def test_retrieval(tiny_clip, synthetic_cxr, tmp_path, one_thread):
    out = tmp_path / "retrieval.json"
    assert evaluate(tiny_clip[0], "--manifest", synthetic_cxr, "--task", "retrieval", "--out", out) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["n"] == split_size(synthetic_cxr, "test") and metrics["n_without_report"] == 0
    for direction in ("i2t", "t2i"):
        recalls = [metrics[f"{direction}_R@{k}"] for k in (1, 5, 10)]
        assert 0.0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1.0


def test_linear_probe(tiny_clip, synthetic_cxr, tmp_path, one_thread):
    out = tmp_path / "probe.json"
    code = evaluate(tiny_clip[0], "--manifest", synthetic_cxr, "--task", "linear_probe", "--out", out,
                    "--labels", "pleural effusion,cardiomegaly", "--n-bootstrap", "50", "--seed", "3")
    assert code == 0
    record = json.loads(out.read_text())
    assert record["feature_dim"] == 64 and "pooled" in record["features"]
    n_train = split_size(synthetic_cxr, "train")
    assert record["n_rows"]["train"] == n_train
    fractions = record["metrics"]["fractions"]
    assert list(fractions) == ["0.01", "0.1", "1"]
    assert [fractions[key]["sampling"]["n_drawn"] for key in fractions] == [
        round(0.01 * n_train), round(0.1 * n_train), n_train]
    for entry in fractions.values():
        assert entry["not_trained"] == {}
        for counts in entry["train_counts"].values():
            assert 0 < counts["n_positive"] < counts["n"]  # at least one of each class
        check_classification(entry["metrics"], ["pleural effusion", "cardiomegaly"], split_size(synthetic_cxr, "test"))
        assert set(entry["C"]) == {"pleural effusion", "cardiomegaly"}


def test_unreadable_images_are_listed_and_the_rest_evaluated(tiny_clip, synthetic_cxr, tmp_path, one_thread, capsys):
    rows = [json.loads(line) for line in synthetic_cxr.read_text().splitlines()]
    for row in rows:
        row["image"] = str(synthetic_cxr.parent / row["image"])
    test_rows = [row for row in rows if row["split"] == "test"]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom" * 20)
    test_rows[0]["image"] = str(broken)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "zero_shot.json"
    args = ("--manifest", manifest, "--task", "zero_shot", "--out", out, "--n-bootstrap", "0")
    assert evaluate(tiny_clip[0], *args) == 2  # absolute paths into synthetic_cxr's folder: outside the root
    assert "outside the data root" in capsys.readouterr().err and not out.exists()
    code = evaluate(tiny_clip[0], *args, "--allow-outside-root")
    assert code == 1
    record = json.loads(out.read_text())
    assert record["n_failed"] == 1
    failure, = record["failed"]
    assert failure["path"] == str(broken) and failure["split"] == "test" and "not a DICOM file" in failure["reason"]
    assert failure["study_id"] == test_rows[0]["study_id"]
    assert record["metrics"]["n_rows"] == len(test_rows) - 1
    assert "auroc_ci" not in record["metrics"]["macro"]  # --n-bootstrap 0: no intervals


def test_bad_arguments(tiny_clip, synthetic_cxr, tmp_path, capsys):
    work_dir = tiny_clip[0]
    common = ["--manifest", synthetic_cxr, "--out", tmp_path / "x.json"]
    assert evaluate(work_dir, *common, "--task", "zero_shot", "--labels", "edema") == 2
    assert "no label named ['edema']" in capsys.readouterr().err
    assert evaluate(work_dir, *common, "--task", "retrieval", "--split", "holdout") == 2
    assert "no rows with split 'holdout' (--split); splits found: ['test', 'train', 'val']" in capsys.readouterr().err
    assert evaluate(work_dir, *common, "--task", "report") == 2
    assert "no report generation head" in capsys.readouterr().err
    assert evaluate(tmp_path / "nowhere", *common, "--task", "retrieval") == 2
    with pytest.raises(SystemExit) as exit_info:
        evaluate(work_dir, *common, "--task", "retrieval", "--plots", tmp_path)
    assert exit_info.value.code == 2
    assert not (tmp_path / "x.json").exists()


def test_report_task(synthetic_cxr, tmp_path, one_thread, capsys, monkeypatch):
    # METEOR's JVM (tests/evaluation/test_metrics.py::test_meteor_with_java) would take most of this test's time:
    # here the tool reports it unavailable, with the reason, as on a machine without Java
    from mmvl.evaluation import report_metrics

    monkeypatch.setattr(report_metrics, "java_problem", lambda: "no 'java' on PATH")
    work = tmp_path / "report"
    assert load_tool("train").main([
        str(REPO / "configs" / "demo" / "cxr_report_tiny.py"), "--work-dir", str(work),
        "--cfg-options", f"data.manifest={synthetic_cxr}", "train.max_steps=2", "train.batch_size=8",
        "train.num_workers=0", "train.val_interval=2", "optim.warmup_steps=0", "model.image_encoder.depth=1",
        "model.image_encoder.embed_dim=64", "model.image_encoder.num_heads=2", "model.heads.0.decoder_dim=32",
        "model.heads.0.decoder_heads=2", "model.heads.0.decoder_depth=1",
    ]) == 0
    out = tmp_path / "report.json"
    code = evaluate(work, "--manifest", synthetic_cxr, "--task", "report", "--out", out, "--limit", "4",
                    "--num-beams", "2", "--max-length", "12", "--tokenizer", "simple")
    assert code == 0
    record = json.loads(out.read_text())
    assert record["generation"] == {"method": "beam", "num_beams": 2, "max_length": 12, "no_repeat_ngram_size": 0}
    assert record["decoding"] == {"method": "beam", "num_beams": 2, "length_penalty": 1.0, "early_stopping": True,
                                  "max_length": 12, "no_repeat_ngram_size": 0}
    metrics = record["metrics"]
    assert metrics["n"] == 4 and metrics["tokenizer"] == "simple"
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0.0
    assert metrics["meteor"] is None and metrics["unavailable"] == {"meteor": "no 'java' on PATH"}
    assert metrics["findings"]["findings"] == ["pleural effusion", "cardiomegaly", "pneumothorax", "nodule"]
    assert metrics["findings"]["unreadable"] == []
    ce = metrics["clinical_efficacy"]
    assert ce["n"] == 4 and ce["uncertain_policy"] == "positive" and ce["bootstrap"]["unit"] == "study"
    assert set(ce["common5"]["micro"]) >= {"precision", "recall", "f1", "f1_ci"}
    assert len(record["examples"]) == 4 and all(example["reference"] for example in record["examples"])
    printed = capsys.readouterr().out
    assert "BLEU-4" in printed and "clinical efficacy" in printed and "common 5" in printed
    assert "meteor unavailable: no 'java' on PATH" in printed
