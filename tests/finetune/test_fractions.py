"""Label fractions (issue 19, part 3): seeded, nested, study-level subsets of the training split that hold every
label's positives where the split has one, recorded in the work dir, the same for every mode and training seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmvl.data.fractions import label_fraction_subset, study_key
from mmvl.engine.trainer import Trainer
from mmvl.errors import ConfigError
from tests.finetune.conftest import finetune_config

LABELS = ["common", "rare", "absent"]
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def make_rows(n_studies: int = 400, seed: int = 0) -> list[dict]:
    """Studies of one to three rows (views); "rare" is positive in 3 studies, "absent" never; some labels unknown."""
    rng = np.random.default_rng(seed)
    rare = set(rng.choice(n_studies, 3, replace=False).tolist())
    rows = []
    for study in range(n_studies):
        labels = {"common": int(rng.random() < 0.3), "rare": int(study in rare), "absent": 0}
        if rng.random() < 0.1:
            del labels["common"]  # unknown
        for view in range(int(rng.integers(1, 4))):
            rows.append({"image": [f"s{study}_v{view}.dcm"], "study_id": f"s{study:04d}",
                         "labels": labels if view == 0 else {"common": labels.get("common", 0), "rare": 0}})
    return rows


def test_subsets_are_nested_seeded_and_hold_positives():
    rows = make_rows()
    subsets = [label_fraction_subset(rows, LABELS, fraction, seed=3) for fraction in FRACTIONS]
    for small, large in zip(subsets, subsets[1:]):
        assert set(small["study_ids"]) <= set(large["study_ids"])  # nested
        assert len(small["study_ids"]) <= len(large["study_ids"])
    for subset in subsets:
        assert subset["positives"]["rare"] >= 1 and subset["positives"]["common"] >= 1
        assert subset["missing"] == ["absent"]  # no positive in the split: reported, not invented
        assert subset["n_studies"] == 400 and len(set(subset["study_ids"])) == len(subset["study_ids"])
    assert subsets[0]["n_drawn"] == 4 and "rare" in subsets[0]["added"]  # 1% of 400, the rare positive added
    assert len(subsets[-1]["study_ids"]) == 400
    # the rows of a study count together: a study positive in one view is a positive study
    rare_studies = {row["study_id"] for row in rows if row["labels"].get("rare") == 1}
    assert subsets[0]["positives"]["rare"] == len(rare_studies & set(subsets[0]["study_ids"]))

    again = label_fraction_subset(rows, LABELS, 0.1, seed=3)
    assert again["study_ids"] == subsets[3]["study_ids"]  # seeded: the same draw
    other = label_fraction_subset(rows, LABELS, 0.1, seed=4)
    assert set(other["study_ids"]) != set(again["study_ids"])
    shuffled = label_fraction_subset(list(reversed(rows)), LABELS, 0.1, seed=3)
    assert set(shuffled["study_ids"]) == set(again["study_ids"])  # manifest order does not matter

    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="label_fraction"):
            label_fraction_subset(rows, LABELS, bad)


def test_study_key_falls_back_to_the_first_image():
    assert study_key({"study_id": "s1", "image": ["a"]}) == "s1"
    assert study_key({"study_id": "", "image": ["a", "b"]}) == "a"


def test_trainer_trains_on_the_recorded_subset_for_every_mode_and_seed(synthetic_cxr, tmp_path, one_thread):
    subsets = []
    for name, options in (("lora", ["model.mode=lora"]), ("full", ["model.mode=full", "model.lora=None",
                                                                   "train.seed=7"])):
        cfg = finetune_config("cls_vit_cxr_tiny", synthetic_cxr, *options, "data.label_fraction=0.05",
                              "data.label_fraction_seed=1", "train.max_steps=1", "train.val_interval=1000",
                              "train.batch_size=4")
        trainer = Trainer(cfg, tmp_path / name)
        record = json.loads((tmp_path / name / "label_fraction.json").read_text())
        assert record["fraction"] == 0.05 and record["seed"] == 1
        assert {row["study_id"] for row in trainer.train_set.rows} == set(record["study_ids"])
        assert len(trainer.train_set) == len(record["study_ids"]) < 20
        assert all(record["positives"][label] >= 1 for label in record["labels"])
        subsets.append(record["study_ids"])
    assert subsets[0] == subsets[1]  # paired: another mode and training seed, the same studies

    shards = finetune_config("cls_vit_cxr_tiny", synthetic_cxr, "data.label_fraction=0.1", "data.type=shards",
                             "data.shards=x")
    with pytest.raises(ConfigError, match="label_fraction"):
        Trainer(shards, tmp_path / "shards")
