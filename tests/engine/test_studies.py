"""Studies, not images (issue 16): a manifest row lists a study's views; training draws one view per study per
epoch (reproducibly, across resumes) or one item per view, and a training batch never holds two views of one
study or two identical reports."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mmvl.data.datasets import ManifestDataset
from mmvl.data.loader import ResumableSampler, spread_groups
from mmvl.engine.checkpoint import load_checkpoint
from mmvl.engine.trainer import Trainer
from tests.engine.test_crash_safety import tinier_config


@pytest.fixture(scope="module")
def two_view_manifest(synthetic_cxr, tmp_path_factory) -> Path:
    """The synthetic set's rows paired into two-view studies (PA + LATERAL, one report), plus for each training
    study a second study with the very same report (a duplicate report, another study)."""
    rows = [json.loads(line) for line in synthetic_cxr.read_text().splitlines()]
    out = tmp_path_factory.mktemp("studies") / "manifest.jsonl"
    folder = synthetic_cxr.parent
    studies = []
    for a, b in zip(rows[0::2], rows[1::2]):
        split = a["split"] if a["split"] != "test" else "val"
        studies.append({"image": [str(folder / a["image"]), str(folder / b["image"])], "views": ["PA", "LATERAL"],
                        "report": a["report"], "labels": a["labels"], "split": split, "study_id": a["study_id"]})
    twins = [dict(study, study_id=study["study_id"] + "-twin", image=study["image"][::-1], views=["LATERAL", "PA"])
             for study in studies[:10] if study["split"] == "train"]
    out.write_text("".join(json.dumps(row) + "\n" for row in studies + twins))
    return out


def eval_pipeline():
    return [dict(type="LoadImage"), dict(type="ResizePad", size=32), dict(type="Normalize", mean=0.5, std=0.25)]


def test_views_are_drawn_per_epoch_and_default_to_frontal(two_view_manifest):
    data = ManifestDataset(two_view_manifest, eval_pipeline(), split="train", allow_outside_root=True)
    assert len(data) == len(data.rows)  # one item per study
    seen = Counter(data.view_of(index, seed) for index in range(len(data)) for seed in range(8))
    assert set(seen) == {0, 1} and min(seen.values()) > 0.3 * sum(seen.values())  # both views drawn
    assert data.view_of(0, 123) == data.view_of(0, 123)  # a seed decides: reproducible, hence resumable
    assert data[0]["meta"]["view_name"] == "PA"  # no seed (evaluation): the frontal view
    twin = next(i for i, row in enumerate(data.rows) if row["study_id"].endswith("-twin"))
    assert data[twin]["meta"]["view_name"] == "PA" and data[twin]["meta"]["view"] == 1  # frontal wherever it is
    options = dict(split="train", allow_outside_root=True)
    frontal = ManifestDataset(two_view_manifest, eval_pipeline(), **options, view_policy="frontal")
    assert {frontal.view_of(0, seed) for seed in range(20)} == {0}
    every = ManifestDataset(two_view_manifest, eval_pipeline(), **options, view_policy="all")
    assert len(every) == 2 * len(data.rows)


def test_spread_groups_keeps_keys_apart_and_the_order_otherwise():
    rng = np.random.default_rng(0)
    studies = rng.integers(0, 300, 1000)
    groups = [(("study", int(s)), f"report {int(s) % 40 if s % 5 == 0 else int(s)}") for s in studies]
    order = rng.permutation(1000)
    spread = spread_groups(order, groups, span=16)
    assert sorted(spread.tolist()) == list(range(1000))
    for start in range(0, 1000 - 1000 % 16, 16):
        keys = [key for index in spread[start:start + 16] for key in groups[index]]
        assert len(keys) == len(set(keys)), start
    unique = [(("study", i), f"r{i}") for i in range(1000)]
    assert spread_groups(order, unique, span=16).tolist() == order.tolist()  # nothing to spread: unchanged
    sampler = ResumableSampler(1000, seed=3, batch_size=8, world_size=2, rank=1, groups=groups)
    sampler.set_epoch(2, start=48)
    resumed = [index for index, _ in sampler]
    sampler.set_epoch(2)
    assert resumed == [index for index, _ in sampler][24:]  # mid-epoch resume continues the same spread order


def test_training_batches_never_hold_two_views_of_a_study_or_two_identical_reports(two_view_manifest, tmp_path,
                                                                                    one_thread):
    cfg = tinier_config(two_view_manifest, "data.view_policy=all", "data.allow_outside_root=True",
                        "train.batch_size=16")
    trainer = Trainer(cfg, tmp_path / "run")
    assert len(trainer.train_set) == 2 * len(trainer.train_set.rows)
    batches = 0
    for batch in trainer.loader:
        studies = [m["study_id"].removesuffix("-twin") for m in batch["meta"]]
        assert len(set(studies)) == len(studies)  # the twins share a report: kept apart too
        assert len(set(batch["report"])) == len(batch["report"])
        batches += 1
    assert batches == len(trainer.train_set) // 16


def test_two_view_study_training_sees_both_views_and_resumes_exactly(two_view_manifest, tmp_path, one_thread):
    options = ["data.allow_outside_root=True", "train.max_steps=8", "train.ckpt_interval=4", "train.batch_size=16",
               "train.deterministic=True", "optim.min_lr_ratio=1.0"]  # constant LR: the runs differ in max_steps
    straight = Trainer(tinier_config(two_view_manifest, *options), tmp_path / "straight")
    views: Counter = Counter()
    original = straight.train_set.__class__.__getitem__

    def counting(dataset, key):
        item = original(dataset, key)
        views[item["meta"]["view_name"]] += 1
        return item

    straight.train_set.__class__.__getitem__ = counting
    try:
        straight.fit()  # 8 steps x 16 = more than an epoch of the 60 training studies
    finally:
        straight.train_set.__class__.__getitem__ = original
    assert views["PA"] > 20 and views["LATERAL"] > 20, views
    Trainer(tinier_config(two_view_manifest, *options[:1], "train.max_steps=4", *options[2:]),
            tmp_path / "stopped").fit()
    Trainer(tinier_config(two_view_manifest, *options[:1], "train.max_steps=4", *options[2:]), tmp_path / "stopped",
            resume=True, resume_override=["train.max_steps=8"]).fit()
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_validation_retrieval_counts_identical_reports_as_hits(two_view_manifest, tmp_path, one_thread, monkeypatch):
    """The validation hook hands the reports to retrieval, which counts a twin report as a hit (its own tests)."""
    from mmvl.engine import hooks

    seen = {}
    original = hooks.retrieval_metrics

    def spy(image_emb, text_emb, ks=(1, 5, 10), texts=None):
        seen["texts"] = texts
        return original(image_emb, text_emb, ks, texts=texts)

    monkeypatch.setattr(hooks, "retrieval_metrics", spy)
    trainer = Trainer(tinier_config(two_view_manifest, "data.allow_outside_root=True"), tmp_path / "run")
    metrics = trainer.validate()
    assert seen["texts"] == [row["text"] for row in trainer.val_set.rows] and "val/i2t_R@1" in metrics


def test_unknown_view_policy_exits_2_naming_the_key(two_view_manifest, tmp_path, capsys):
    from tests.conftest import load_tool

    config = tmp_path / "config.py"
    tinier_config(two_view_manifest, "data.allow_outside_root=True").dump(config)
    code = load_tool("train").main([str(config), "--work-dir", str(tmp_path / "run"), "--cfg-options",
                                    "data.view_policy=sideways"])
    err = capsys.readouterr().err
    assert code == 2 and "data.view_policy='sideways' is not one of 'random', 'frontal', 'all'" in err
    assert not (tmp_path / "run").exists()
