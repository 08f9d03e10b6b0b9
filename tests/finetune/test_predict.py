"""Fine-tuned classifiers in the zoo (issue 19, part 5): ``tools/export.py`` on a LoRA fine-tuning work dir writes
plain merged weights, label names and validation-chosen thresholds; ``mmvl.predict`` on the entry gives the work
dir's (adapter) model's probabilities; ``tools/predict.py`` writes one row per file found, a broken one as an
error row (exit 1)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmvl
from mmvl import zoo
from mmvl.engine.trainer import Trainer
from mmvl.errors import ConfigError
from mmvl.evaluation.metrics import choose_thresholds, target_matrix
from mmvl.loading import load_pretrained
from mmvl.models.finetune import lora_layers
from tests.conftest import load_tool
from tests.finetune.conftest import finetune_config

LABELS = ["cardiomegaly", "nodule", "pleural effusion", "pneumothorax"]
# merged W + B A * alpha / r against the adapter's two matmuls differ by float32 rounding only: measured 6e-8 (one
# float32 ulp at 0.5) on 40 scans of this setup, while dropping the adapters moved the probabilities by 0.14. 1e-5
# leaves 100x room for rounding on other CPUs and is still 10^4 below a lost adapter (asserted > 1e-3 below)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def lora_run(synthetic_cxr, tmp_path_factory):
    """A LoRA fine-tuning work dir (12 steps, big enough adapters to matter) and its exported zoo entry."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("lora_run")
        cfg = finetune_config("cls_vit_cxr_tiny", synthetic_cxr, "train.max_steps=12", "train.val_interval=12",
                              "train.ckpt_interval=12", "optim.lr=1e-2")
        Trainer(cfg, root / "work").fit()
        result = zoo.export(root / "work", "cls_tiny", out=root / "zoo" / "cls_tiny")
    finally:
        torch.set_num_threads(threads)
    return root / "work", result


@pytest.fixture(scope="module")
def scans(synthetic_cxr, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    images = sorted((synthetic_cxr.parent / "images").glob("*.dcm"))[:5]
    for image in images:
        shutil.copy(image, folder / image.name)
    return folder


def probabilities(rows):
    return np.array([[row[label] for label in LABELS] for row in rows if not row["error"]])


def test_export_merges_lora_and_records_thresholds(lora_run, synthetic_cxr):
    work, result = lora_run
    config = json.loads((result.path / "config.json").read_text(encoding="utf-8"))
    assert config["model"]["mode"] == "full" and "lora" not in config["model"] and "init_from" not in config["model"]
    names = set(load_file(result.path / "model.safetensors"))
    assert not [n for n in names if "lora_" in n or "base_layer" in n]
    assert "heads.cls.classifier.weight" in names
    assert not lora_layers(mmvl.zoo.load(result.path).model)
    classifier = config["classifier"]
    assert classifier["labels"] == LABELS and classifier["task"] == "multilabel"
    assert result.checks["merged"]["max_abs_diff"] <= TOLERANCE
    # the thresholds are the F1-optimal ones on the validation rows, as evaluation chooses them
    val = [row for line in synthetic_cxr.read_text(encoding="utf-8").splitlines()
           if (row := json.loads(line)).get("split") == "val"]
    rows = mmvl.predict(result.path, manifest=synthetic_cxr.parent / "val.jsonl", progress=False)
    assert classifier["n_val"] == len(rows) == len(val) > 0
    targets = target_matrix([row["labels"] for row in val], LABELS)
    expected, sources = choose_thresholds(probabilities(rows), targets, LABELS)
    assert classifier["threshold_source"] == sources
    np.testing.assert_allclose(classifier["thresholds"], expected, rtol=0, atol=1e-7)
    for row in rows:
        assert [row[f"{label}_pred"] for label in LABELS] == [
            int(row[label] >= t) for label, t in zip(LABELS, classifier["thresholds"])]
    card = (result.path / "README.md").read_text(encoding="utf-8")  # the model card lists every threshold
    assert "## Thresholds" in card
    for label, threshold, source in zip(LABELS, classifier["thresholds"], sources):
        assert f"| {label} | {threshold:.4f} | {source} |" in card


def test_predict_round_trip_equals_work_dir(lora_run, scans):
    work, result = lora_run
    adapted = load_pretrained(work)
    assert lora_layers(adapted.model)  # the work dir's model runs the adapters unmerged
    from_work = mmvl.predict(adapted, scans, progress=False)
    from_entry = mmvl.predict(result.path, scans, progress=False)
    assert [r["path"] for r in from_work] == [r["path"] for r in from_entry] and len(from_entry) == 5
    np.testing.assert_allclose(probabilities(from_entry), probabilities(from_work), rtol=0, atol=TOLERANCE)
    # the adapters matter: without them the probabilities move far beyond the tolerance
    for _, layer in lora_layers(adapted.model):
        layer.scaling = {key: 0.0 for key in layer.scaling}
    base = mmvl.predict(adapted, scans, progress=False)
    assert np.abs(probabilities(base) - probabilities(from_entry)).max() > 100 * TOLERANCE


def test_predict_refuses_headless_model_and_unknown_threshold(lora_run, scans):
    work, result = lora_run
    headless = mmvl.zoo.load(result.path)
    del headless.model.heads["cls"]  # as a CLIP model: no classification head
    with pytest.raises(ConfigError, match="one classification head"):
        mmvl.predict(headless, scans, progress=False)
    with pytest.raises(ConfigError, match="not labels"):
        mmvl.predict(result.path, scans, progress=False, thresholds={"edema": 0.5})


def test_predict_cli_error_row_exit_1(lora_run, scans, tmp_path, capsys):
    work, result = lora_run
    folder = tmp_path / "in"
    shutil.copytree(scans, folder)
    (folder / "broken.dcm").write_bytes(b"not a dicom")
    out = tmp_path / "preds.csv"
    code = load_tool("predict").main([str(result.path), str(folder), "--out", str(out), "--device", "cpu",
                                      "--threshold", "nodule=0"])
    assert code == 1
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 6
    assert list(rows[0]) == ["path", "study_id", "view", *LABELS, *(f"{label}_pred" for label in LABELS), "error"]
    broken = [row for row in rows if row["path"].endswith("broken.dcm")]
    assert len(broken) == 1 and "not a DICOM" in broken[0]["error"] and broken[0]["nodule"] == ""
    good = [row for row in rows if not row["error"]]
    api = {row["path"]: row for row in mmvl.predict(result.path, folder, progress=False)}
    for row in good:
        assert row["nodule_pred"] == "1"  # the override: every probability reaches 0
        for label in LABELS:
            assert math.isclose(float(row[label]), api[row["path"]][label], abs_tol=1e-6)  # CSV's 6 decimals
    sidecar = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["n_failed"] == 1 and sidecar["classifier"]["thresholds"][1] == 0.0
    assert load_tool("predict").main([str(result.path), str(folder), "--threshold", "nodule"]) == 2


def test_multiclass_entry_predicts_the_most_probable_class(synthetic_cxr, scans, tmp_path, one_thread):
    cfg = finetune_config("multiclass_vit_cxr_tiny", synthetic_cxr, "train.max_steps=2", "train.val_interval=2",
                          "train.ckpt_interval=2")
    Trainer(cfg, tmp_path / "work").fit()
    result = zoo.export(tmp_path / "work", "mc", out=tmp_path / "zoo" / "mc")
    classifier = json.loads((result.path / "config.json").read_text(encoding="utf-8"))["classifier"]
    assert classifier["task"] == "multiclass" and classifier["thresholds"] is None
    assert "## Thresholds" not in (result.path / "README.md").read_text(encoding="utf-8")  # argmax: none to list
    names = classifier["labels"]
    rows = mmvl.predict(result.path, scans, progress=False)
    assert len(rows) == 5 and set(rows[0]) == {"path", "study_id", "view", *names, "prediction", "error"}
    for row in rows:
        assert math.isclose(sum(row[name] for name in names), 1.0, abs_tol=1e-5)
        assert row["prediction"] == max(names, key=lambda name: row[name])
