"""mmvl.evaluation.grounding_metrics against hand-computed values, and tools/evaluate.py --task grounding on the
synthetic set's masks."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from mmvl.evaluation.grounding_metrics import (
    boxes_mask,
    centre_prior,
    grounding_scores,
    read_mask,
    row_targets,
    summarise,
)
from tests.conftest import load_tool

HEATMAP = np.array([[0, 1, 2, 3],
                    [4, 9, 6, 7],
                    [8, 5, 1, 0]], dtype=float)
TARGET = np.zeros((3, 4), bool)
TARGET[1, 1] = TARGET[1, 2] = TARGET[2, 1] = True


def test_scores_by_hand():
    scores = grounding_scores(HEATMAP, TARGET)
    assert scores["pointing"] == 1.0  # the 9 is inside
    # rescaled >= 0.5 keeps values >= 4.5: 9, 6, 7, 8, 5, of which 9, 6, 5 are in the target
    assert scores["iou"] == pytest.approx(3 / 5) and scores["dice"] == pytest.approx(6 / 8)
    # inside 9, 6, 5: mean 20/3, variance 26/9; outside 0,1,2,3,4,7,8,1,0: mean 26/9, variance 144/9 - (26/9)^2
    inside_var, outside_var = 26 / 9, 144 / 9 - (26 / 9) ** 2
    assert scores["cnr"] == pytest.approx((20 / 3 - 26 / 9) / math.sqrt(inside_var + outside_var))
    assert grounding_scores(-HEATMAP, TARGET)["pointing"] == 0.0  # the minimum sits outside
    flat = grounding_scores(np.ones((3, 4)), TARGET)  # every pixel ties for the maximum: 3 of 12 are inside
    assert flat == {"pointing": 3 / 12, "iou": 0.0, "dice": 0.0, "cnr": 0.0}
    assert grounding_scores(centre_prior((3, 4)), TARGET)["pointing"] == 1.0  # the tied (1, 1) and (1, 2)
    assert grounding_scores(centre_prior((3, 4)), TARGET & (np.arange(4) < 2))["pointing"] == 0.5
    assert grounding_scores(HEATMAP, TARGET, threshold=0.95)["iou"] == pytest.approx(1 / 3)  # only the 9
    with pytest.raises(ValueError, match="empty"):
        grounding_scores(HEATMAP, np.zeros((3, 4), bool))


def test_centre_prior_and_boxes():
    prior = centre_prior((3, 4))
    assert np.argwhere(prior == prior.max()).tolist() == [[1, 1], [1, 2]]  # around the centre (1, 1.5)
    assert prior[1, 1] == pytest.approx(math.exp(-0.5 * (0.5 / 1.0) ** 2))  # sigma = a quarter of 4 columns
    assert prior[0, 1] == pytest.approx(math.exp(-0.5 * (0.5 / 1.0) ** 2 - 0.5 * (1 / 0.75) ** 2))
    assert centre_prior((5, 5, 5)).argmax() == 62  # (2, 2, 2)
    mask = boxes_mask([[1, 0, 2, 2]], (3, 4))  # x 1-3 (columns 1, 2), y 0-2 (rows 0, 1)
    assert mask.astype(int).tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="positive size"):
        boxes_mask([[1, 0, 0, 2]], (3, 4))


def test_nifti_mask_follows_the_affine_onto_a_differently_ordered_scan(tmp_path):
    import nibabel as nib

    data = np.zeros((4, 5, 6), np.uint8)
    data[0, 1:3, 2] = 1
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "mask.nii.gz")
    flipped = np.array([[-2.0, 0, 0, 6], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])  # scan voxel i = mask voxel 3 - i
    geometry = SimpleNamespace(kind="3d", scan_shape=(4, 5, 6), scan_affine=flipped)
    assert np.array_equal(read_mask(tmp_path / "mask.nii.gz", geometry), data[::-1] > 0)
    same = SimpleNamespace(kind="3d", scan_shape=(4, 5, 6), scan_affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    assert np.array_equal(read_mask(tmp_path / "mask.nii.gz", same), data > 0)


def test_row_targets_and_summary(tmp_path):
    row = {"image": ["/d/a.png"], "masks": {"nodule": "masks/a.png"}, "boxes": {"nodule": [[0, 0, 2, 2]],
                                                                             "pneumonia": [[1, 1, 3, 3]]},
           "phrases": {"pneumonia": "left basal consolidation"}, "line": 1}
    targets = row_targets(row, 0, "/d")
    assert targets["nodule"] == {"masks": ["/d/masks/a.png"], "boxes": [[0, 0, 2, 2]], "phrase": None}
    assert targets["pneumonia"]["phrase"] == "left basal consolidation"

    def scores(pointing: float, cnr: float) -> dict[str, float]:
        return {"pointing": pointing, "iou": 0.5, "dice": 0.6, "cnr": cnr}

    records = [  # two images of study s1, one of s2
        {"label": "nodule", "study_id": "s1", "model": scores(1, 2.0), "centre_prior": scores(0, 1.0)},
        {"label": "nodule", "study_id": "s1", "model": scores(0, float("nan")), "centre_prior": scores(0, 1.0)},
        {"label": "nodule", "study_id": "s2", "model": scores(1, 1.0), "centre_prior": scores(1, 0.5)},
    ]
    summary = summarise(records, n_bootstrap=200, seed=0)
    entry = summary["labels"]["nodule"]
    assert entry["n_images"] == 3 and entry["n_studies"] == 2
    assert entry["pointing"]["model"] == pytest.approx(2 / 3)  # a mean over images
    assert entry["pointing"]["centre_prior"] == pytest.approx(1 / 3)
    assert entry["pointing"]["difference"] == pytest.approx(1 / 3)
    assert entry["cnr"]["model"] == pytest.approx(1.5)  # the NaN left out
    assert entry["cnr"]["difference"] == pytest.approx(((2 - 1) + (1 - 0.5)) / 2)  # paired, where both are defined
    low, high = entry["pointing"]["model_ci"]
    # resampling studies: all of s1 (1/2) or all of s2 (1) or a mix; never a single image of s1
    assert low == pytest.approx(0.5) and high == pytest.approx(1.0)


def test_evaluate_grounding_on_the_synthetic_masks(synthetic_cxr, tmp_path, one_thread):
    """The centre prior's pointing game in the JSON equals the one computed here from the mask files."""
    from PIL import Image

    from tests.zoo.conftest import IMAGE_2D, PIPELINE_2D, write_work_dir

    work = write_work_dir(tmp_path / "w2d", IMAGE_2D, PIPELINE_2D)
    out = tmp_path / "grounding.json"
    evaluate = load_tool("evaluate")
    assert evaluate.main([str(work), "--manifest", str(synthetic_cxr), "--data-root", str(synthetic_cxr.parent),
                          "--task", "grounding", "--limit", "12", "--n-bootstrap", "50", "--out", str(out),
                          "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    rows = [json.loads(line) for line in synthetic_cxr.read_text().splitlines()]
    rows = [row for row in rows if row["split"] == "test"][:12]
    expected: dict[str, list[float]] = {}
    for row in rows:
        for label, path in row["masks"].items():
            mask = np.asarray(Image.open(synthetic_cxr.parent / path)) > 0
            prior = centre_prior(mask.shape)
            expected.setdefault(label, []).append(float(mask[prior == prior.max()].mean()))
    assert set(result["metrics"]["labels"]) == set(expected) and result["method"] == "similarity"
    for label, hits in expected.items():
        entry = result["metrics"]["labels"][label]
        assert entry["n_images"] == len(hits)
        assert entry["pointing"]["centre_prior"] == pytest.approx(np.mean(hits))
        assert 0 <= entry["pointing"]["model"] <= 1 and entry["dice"]["model_ci"] is not None
    assert result["metrics"]["labels"]["cardiomegaly"]["pointing"]["centre_prior"] > 0.5  # the heart is central


def test_grounding_agrees_on_a_volume_read_as_nifti_and_as_dicom_series(tmp_path, one_thread):
    """The synthetic CT's masks are NIfTI in the volume's voxel grid; a DICOM series is read in another voxel order,
    so its masks are resampled through the affines. Every number, the model's and the centre prior's, is the same
    for the two manifests."""
    from tests.conftest import load_script
    from tests.zoo.conftest import IMAGE_3D, PIPELINE_3D, write_work_dir

    manifests = load_script("synthetic_ct").generate_ct(tmp_path / "ct", n=4, size=32, slices=8, seed=0)
    work = write_work_dir(tmp_path / "w3d", IMAGE_3D, PIPELINE_3D)
    evaluate = load_tool("evaluate")
    results = {}
    for name, manifest in manifests.items():
        out = tmp_path / f"{name}.json"
        assert evaluate.main([str(work), "--manifest", str(manifest), "--data-root", str(tmp_path / "ct"), "--task",
                              "grounding", "--split", "train", "--n-bootstrap", "0", "--out", str(out),
                              "--device", "cpu"]) == 0
        results[name] = json.loads(out.read_text())["metrics"]["labels"]
    assert len(results["nifti"]) >= 2 and results["nifti"].keys() == results["dicom"].keys()
    for label, entry in results["nifti"].items():
        for metric in ("pointing", "iou", "dice", "cnr"):
            for side in ("model", "centre_prior"):
                assert entry[metric][side] == pytest.approx(results["dicom"][label][metric][side], abs=1e-6), (
                    label, metric, side)
