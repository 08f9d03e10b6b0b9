"""The CT base config's pipelines on the synthetic CT set: DICOM-series and NIfTI copies of each study give
the same tensors, and the data check passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmvl.config import Config
from mmvl.data.check import check_manifest
from mmvl.data.datasets import ManifestDataset
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.eval_pipeline.2.spacing=[6.0,6.0,6.0]", "data.eval_pipeline.4.size=[12,12,10]",
         "data.train_pipeline.2.spacing=[6.0,6.0,6.0]", "data.train_pipeline.4.size=[12,12,10]"]


@pytest.fixture(scope="module")
def synthetic_ct(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_ct")
    return load_script("synthetic_ct").generate_ct(out, n=6, size=32, slices=16, seed=0)


@pytest.fixture(scope="module")
def data_cfg():
    cfg = Config.fromfile(REPO / "configs" / "_base_" / "datasets" / "ct_manifest.py")
    cfg.merge_options(SMALL)
    return cfg["data"]


def test_series_and_nifti_copies_give_the_same_tensors(synthetic_ct, data_cfg):
    from_dicom = ManifestDataset(synthetic_ct["dicom"], data_cfg["eval_pipeline"])
    from_nifti = ManifestDataset(synthetic_ct["nifti"], data_cfg["eval_pipeline"])
    assert len(from_dicom) == len(from_nifti) == 6
    for index in range(6):
        a, b = from_dicom[index], from_nifti[index]
        assert a["image"].shape == (1, 12, 12, 10) and a["report"] == b["report"]
        np.testing.assert_allclose(a["image"].numpy(), b["image"].numpy(), atol=1e-3)
    train = ManifestDataset(synthetic_ct["dicom"], data_cfg["train_pipeline"], cache="memory")
    assert train[(0, 3)]["image"].shape == (1, 12, 12, 10)
    assert train.label_names and train[0]["labels"].shape == (len(train.label_names),)


def test_data_check_passes_on_both_copies(synthetic_ct, data_cfg):
    for manifest in synthetic_ct.values():
        n_rows, problems = check_manifest(manifest, pipeline=data_cfg["eval_pipeline"], progress=False)
        assert n_rows == 6 and problems == []
