"""mmvl.evaluation.grounding_comparison against hand-computed values, and two models side by side through
tools/evaluate.py (--task grounding with two MODELs): every number of the table equals the one-model runs'."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmvl.evaluation.grounding_comparison import (
    align_studies,
    comparison_table,
    paired_auroc_difference,
    paired_grounding,
)
from tests.conftest import load_tool


def test_paired_auroc_difference_by_hand():
    # label "a": baseline AUROC 3/4 (0.4 is below the negative 0.6), model 1.0; the unknown row (-1) is left out
    # label "b": one class only, skipped
    targets = np.array([[0, 1], [0, 1], [1, 1], [1, 1], [-1, 1]])
    baseline = np.array([[0.1, 0.5], [0.6, 0.5], [0.4, 0.5], [0.9, 0.5], [0.0, 0.5]])
    model = np.array([[0.1, 0.5], [0.2, 0.5], [0.3, 0.5], [0.9, 0.5], [1.0, 0.5]])
    out = paired_auroc_difference(baseline, model, targets, ["a", "b"], n_bootstrap=200, seed=0)
    assert out["a"]["difference"] == pytest.approx(0.25) and out["a"]["n"] == 4
    assert out["b"] == {"skipped": out["b"]["skipped"]} and "one class" in out["b"]["skipped"]
    low, high = out["a"]["difference_ci"]
    # the model ranks every drawn pair right (AUROC 1) and the baseline all but the (0.6 negative, 0.4 positive)
    # pair: a resample's difference lies in [0, 1], 0 without that pair, 1 with nothing else drawn
    assert 0 <= low <= 0.25 <= high <= 1 and low < high and out["a"]["n_resamples"] <= 200
    same = paired_auroc_difference(baseline, baseline, targets, ["a", "b"], n_bootstrap=50)
    assert same["a"]["difference"] == 0 and same["a"]["difference_ci"] == [0.0, 0.0]


def test_paired_auroc_difference_resamples_studies():
    """Rows of one study are drawn together: two copies of a study never split, so with every study duplicated the
    interval equals that of the undoubled rows."""
    rng = np.random.default_rng(0)
    targets = (rng.random((30, 1)) < 0.5).astype(int)
    baseline, model = rng.random((30, 1)), rng.random((30, 1))
    single = paired_auroc_difference(baseline, model, targets, ["x"], study_ids=[f"s{i}" for i in range(30)],
                                     n_bootstrap=100, seed=3)
    doubled = paired_auroc_difference(np.repeat(baseline, 2, 0), np.repeat(model, 2, 0), np.repeat(targets, 2, 0),
                                      ["x"], study_ids=[f"s{i // 2}" for i in range(60)], n_bootstrap=100, seed=3)
    assert doubled["x"]["difference"] == pytest.approx(single["x"]["difference"])
    assert doubled["x"]["difference_ci"] == pytest.approx(single["x"]["difference_ci"])


def _record(path, label, study, pointing, cnr):
    return {"path": path, "label": label, "study_id": study,
            "model": {"pointing": pointing, "iou": 0.0, "dice": 0.0, "cnr": cnr},
            "centre_prior": {"pointing": 0.0, "iou": 0.0, "dice": 0.0, "cnr": 0.0}}


def test_paired_grounding_by_hand():
    baseline = [_record("1.dcm", "nodule", "s1", 0.0, 1.0), _record("2.dcm", "nodule", "s2", 1.0, 2.0),
                _record("3.dcm", "nodule", "s3", 0.0, 0.5)]
    model = [_record("1.dcm", "nodule", "s1", 1.0, 3.0), _record("2.dcm", "nodule", "s2", 1.0, 1.0),
             _record("9.dcm", "nodule", "s9", 1.0, 9.0)]  # 3.dcm missing here, 9.dcm in the baseline: unpaired
    out = paired_grounding(baseline, model, n_bootstrap=100, seed=0)["nodule"]
    assert out["n_images"] == 2 and out["n_studies"] == 2
    assert out["pointing"]["difference"] == pytest.approx(((1 - 0) + (1 - 1)) / 2)
    assert out["cnr"]["difference"] == pytest.approx(((3 - 1) + (1 - 2)) / 2)
    low, high = out["pointing"]["difference_ci"]
    assert low == pytest.approx(0.0) and high == pytest.approx(1.0)  # s2 twice, or s1 twice


def test_align_studies():
    rows_a, rows_b = align_studies(["s1", "s2", "s3"], ["s3", "s1"])
    assert rows_a.tolist() == [0, 2] and rows_b.tolist() == [1, 0]


def test_comparison_table_layout():
    def entry(model, prior):
        return {"n_images": 5, "n_studies": 4, **{m: {"model": model, "model_ci": [0.0, 1.0], "centre_prior": prior,
                                                      "centre_prior_ci": [0.0, 0.5]} for m in ("pointing", "cnr")}}

    grounding = {"clip": {"labels": {"nodule": entry(0.2, 0.1)}}, "local": {"labels": {"nodule": entry(0.6, 0.1)}}}
    differences = {"local": {"nodule": {m: {"difference": 0.4, "difference_ci": [0.1, 0.7]}
                                        for m in ("pointing", "cnr")}}}
    zero_shot = {name: {"labels": {"nodule": {"n": 20, "n_positive": 6, "auroc": auroc, "auroc_ci": [0.5, 0.9]}}}
                 for name, auroc in (("clip", 0.8), ("local", 0.75))}
    table = comparison_table(["clip", "local"], grounding, differences, zero_shot,
                             {"local": {"nodule": {"difference": -0.05, "difference_ci": [-0.2, 0.1]}}})
    lines = table.splitlines()
    assert lines[0] == "| finding | metric | n | centre prior | clip | local | local - clip |"
    assert lines[2] == ("| nodule | pointing game | 5 | 0.100 [0.000, 0.500] | 0.200 [0.000, 1.000] | "
                        "0.600 [0.000, 1.000] | +0.400 [+0.100, +0.700] |")
    assert lines[3].startswith("|  | CNR | 5 |")
    assert lines[4] == ("|  | zero-shot AUROC | 20 (6 pos.) | - | 0.800 [0.500, 0.900] | 0.750 [0.500, 0.900] | "
                        "-0.050 [-0.200, +0.100] |")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A global-only CLIP work dir and a CLIP + local alignment one (fixed seeds, untrained)."""
    from tests.zoo.conftest import IMAGE_2D, PIPELINE_2D, write_work_dir

    root = tmp_path_factory.mktemp("two_models")
    clip = write_work_dir(root / "clip", IMAGE_2D, PIPELINE_2D, seed=0)
    local = write_work_dir(root / "local", IMAGE_2D, PIPELINE_2D, seed=1, heads=[
        {"type": "clip", "embed_dim": 32}, {"type": "local_align", "embed_dim": 32}])
    return clip, local


def test_two_models_side_by_side_through_the_cli(two_models, synthetic_cxr, tmp_path, one_thread, capsys):
    """Each model's grounding and zero-shot numbers in the comparison equal those of a one-model run with the same
    options; the paired point differences equal the differences of the models' means; the table (printed and
    in the .md beside the JSON) has a column per model, the centre prior's and the difference's."""
    clip, local = two_models
    evaluate = load_tool("evaluate")
    common = ["--manifest", str(synthetic_cxr), "--data-root", str(synthetic_cxr.parent), "--limit", "10",
              "--n-bootstrap", "30", "--device", "cpu"]
    out = tmp_path / "comparison.json"
    assert evaluate.main([f"clip={clip}", f"local={local}", "--task", "grounding", "--out", str(out),
                          *common]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    table = (tmp_path / "comparison.md").read_text()
    header = "| finding | metric | n | centre prior | clip | local | local - clip |"
    assert table.splitlines()[0] == header and header in printed and result["table"] == table
    assert result["comparison"] == ["clip", "local"] and result["baseline"] == "clip"
    labels = result["runs"]["clip"]["grounding"]["labels"]
    assert labels == ["cardiomegaly", "nodule", "pleural effusion", "pneumothorax"]
    for label in labels:
        assert f"| {label} | pointing game |" in table
    assert table.count("| zero-shot AUROC |") == len(labels)

    alone = {}
    for name, work in (("clip", clip), ("local", local)):
        for task in ("grounding", "zero_shot"):
            single = tmp_path / f"{name}_{task}.json"
            assert evaluate.main([str(work), "--task", task, "--out", str(single), *common]) == 0
            alone[name, task] = json.loads(single.read_text())
            assert result["runs"][name][task]["metrics"] == alone[name, task]["metrics"], (name, task)
    assert alone["local", "grounding"]["metrics"] != alone["clip", "grounding"]["metrics"]  # two different models

    grounding = {name: alone[name, "grounding"]["metrics"]["labels"] for name in ("clip", "local")}
    auroc = {name: alone[name, "zero_shot"]["metrics"]["labels"] for name in ("clip", "local")}
    for label in labels:
        paired = result["differences"]["grounding"]["local"][label]
        assert paired["n_images"] == grounding["clip"][label]["n_images"]
        for metric in ("pointing", "iou", "dice", "cnr"):
            expected = grounding["local"][label][metric]["model"] - grounding["clip"][label][metric]["model"]
            assert paired[metric]["difference"] == pytest.approx(expected, abs=1e-12), (label, metric)  # float64
            assert paired[metric]["difference_ci"] is not None
        if "skipped" not in auroc["clip"][label]:
            expected = auroc["local"][label]["auroc"] - auroc["clip"][label]["auroc"]
            difference = result["differences"]["zero_shot_auroc"]["local"][label]
            assert difference["difference"] == pytest.approx(expected, abs=1e-12)


def test_several_models_only_for_grounding_and_names_apart(two_models, synthetic_cxr, tmp_path, capsys):
    clip, local = two_models
    evaluate = load_tool("evaluate")
    with pytest.raises(SystemExit) as raised:
        evaluate.main([str(clip), str(local), "--manifest", str(synthetic_cxr), "--task", "zero_shot"])
    assert raised.value.code == 2 and "--task grounding only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:  # both folders are called ".../run"-like names: the same default name
        evaluate.main([f"a={clip}", f"a={local}", "--manifest", str(synthetic_cxr), "--task", "grounding"])
    assert raised.value.code == 2 and "two models named ['a']" in capsys.readouterr().err
    assert evaluate.model_specs(["clip=work_dirs/x", "work_dirs/y/", "zoo-name"]) == [
        ("clip", "work_dirs/x"), ("y", "work_dirs/y/"), ("zoo-name", "zoo-name")]
