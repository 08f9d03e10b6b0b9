"""Scores per study (issue 16): a study's views are grouped back from the images, its frontal views' scores are
aggregated, and tools/evaluate.py reports studies as its unit and every image beside them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmvl.data.inputs import InputItem
from mmvl.errors import ConfigError
from mmvl.evaluation.studies import aggregate, first_of_each, study_groups
from tests.conftest import load_tool


def test_groups_keep_frontal_views_and_aggregate():
    items = [InputItem("a_pa.dcm", study_id="s1", view="PA"), InputItem("a_lat.dcm", study_id="s1", view="LATERAL"),
             InputItem("b1.dcm", row=7), InputItem("b2.dcm", row=7),  # no id, no views: the row is the study
             InputItem("c_lat.dcm", study_id="s3", view="LATERAL"), InputItem("c_ap.dcm", study_id="s3", view="AP")]
    assert study_groups(items) == [[0], [2, 3], [5]]
    assert study_groups(items, views="all") == [[0, 1], [2, 3], [4, 5]]
    scores = np.array([[0.9], [0.1], [0.2], [0.6], [0.3], [0.7]])
    np.testing.assert_allclose(aggregate(scores, study_groups(items)), [[0.9], [0.4], [0.7]])
    np.testing.assert_allclose(aggregate(scores, study_groups(items), "max"), [[0.9], [0.6], [0.7]])
    assert [item.path for item in first_of_each(items)] == ["a_pa.dcm", "b1.dcm", "c_ap.dcm"]
    with pytest.raises(ConfigError, match="study aggregate"):
        aggregate(scores, [[0]], "median")


@pytest.fixture()
def two_view_test_manifest(synthetic_cxr, tmp_path) -> tuple[Path, int]:
    rows = [json.loads(line) for line in synthetic_cxr.read_text().splitlines()]
    out = tmp_path / "studies.jsonl"
    studies = [{**row, "image": [str(synthetic_cxr.parent / row["image"])] * 2, "views": ["LATERAL", "PA"]}
               for row in rows]
    out.write_text("".join(json.dumps(study) + "\n" for study in studies))
    return out, sum(study["split"] == "test" for study in studies)


def test_evaluate_scores_studies_and_reports_images(tiny_clip, two_view_test_manifest, tmp_path, one_thread):
    manifest, n_test = two_view_test_manifest
    out = tmp_path / "zs.json"
    code = load_tool("evaluate").main([str(tiny_clip[0]), "--manifest", str(manifest), "--task", "zero_shot",
                                       "--out", str(out), "--n-bootstrap", "20", "--allow-outside-root"])
    assert code == 0
    record = json.loads(out.read_text())
    metrics = record["metrics"]
    assert metrics["n_rows"] == n_test and metrics["bootstrap"]["n_units"] == n_test
    assert metrics["per_image"]["n_images"] == 2 * n_test
    assert metrics["per_image"]["views_scored"] == ["LATERAL", "PA"]
    assert "frontal views" in record["unit"]
    out = tmp_path / "ret.json"
    assert load_tool("evaluate").main([str(tiny_clip[0]), "--manifest", str(manifest), "--task", "retrieval",
                                       "--out", str(out), "--allow-outside-root"]) == 0
    retrieval = json.loads(out.read_text())["metrics"]
    assert retrieval["n"] == n_test and retrieval["n_images"] == 2 * n_test
