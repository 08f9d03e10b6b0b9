"""Shards (mmvl/data/shards.py, tools/make_shards.py): the same samples as the manifest, split disjointly over
ranks and workers, reproducible augmentation and resume, refusal of a different deterministic pipeline."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, get_worker_info

from mmvl.config import Config
from mmvl.data.datasets import ManifestDataset
from mmvl.data.shards import ShardDataset, write_shards
from mmvl.errors import DataError
from mmvl.registry import DATASETS
from tests.conftest import load_tool

REPO = Path(__file__).resolve().parents[2]
DATA = Config.fromfile(REPO / "configs" / "demo" / "cxr_clip_tiny.py")["data"]  # 64 px, as synthetic_cxr
TRAIN, EVAL = list(DATA["train_pipeline"]), list(DATA["eval_pipeline"])


@pytest.fixture(scope="module")
def shards(synthetic_cxr, tmp_path_factory) -> Path:
    """synthetic_cxr through the train pipeline's deterministic head, 10 rows a shard: train 16 shards, val and
    test 2 each."""
    out = tmp_path_factory.mktemp("shards")
    summary = write_shards(synthetic_cxr, out, TRAIN, shard_size=10, progress=False)
    counts = {split: (c["shards"], c["samples"], c["skipped"]) for split, c in summary["splits"].items()}
    assert counts == {"test": (2, 20, 0), "train": (16, 160, 0), "val": (2, 20, 0)}
    assert summary["bytes"] == sum(p.stat().st_size for p in out.glob("*.tar"))
    return out


def _indices(samples) -> list[int]:
    return [sample["meta"]["index"] for sample in samples]


def test_shards_yield_the_manifest_samples(synthetic_cxr, shards):
    """The eval pipeline over shards written from the train pipeline's head (Normalize then runs at read time)
    gives the manifest dataset's samples exactly; built the way the trainer builds a manifest dataset."""
    common = dict(manifest=shards, report_sections=("findings", "impression"), on_error="skip", cache=None,
                  cache_dir=None, cache_workers=0, root=None, allow_outside_root=False)
    for split in ("val", "test"):
        streamed = list(DATASETS.build(dict(type="shards", split=split, pipeline=EVAL, **common)))
        reference = ManifestDataset(synthetic_cxr, EVAL, split=split)
        expected = [reference[i] for i in range(len(reference))]

        def key(sample):
            meta = sample["meta"]
            return meta["study_id"], meta["index"], sample["report"], tuple(sample["labels"].tolist())

        assert len(streamed) == len(expected) == 20
        assert sorted(map(key, streamed)) == sorted(map(key, expected))
        for sample in streamed:
            assert sample["image"].dtype == torch.float32
            assert torch.equal(sample["image"], expected[sample["meta"]["index"]]["image"])
            assert sample["meta"]["path"] == str(Path(expected[sample["meta"]["index"]]["meta"]["path"])
                                                 .relative_to(synthetic_cxr.parent))
        dataset = ShardDataset(shards, split=split, pipeline=EVAL)
        assert len(dataset) == 20 and dataset.label_names == reference.label_names
        assert dataset.texts == reference.texts and dataset.skipped_rows == []


def _tagged(samples):
    """Collate inside the worker: (worker id, row indices of the batch)."""
    return get_worker_info().id, [sample["meta"]["index"] for sample in samples]


def test_ranks_and_workers_split_disjointly(shards, monkeypatch):
    """2 ranks (the RANK/WORLD_SIZE that webdataset's split_by_node reads) x 2 loader workers: 16 shards, 4
    each; the four parts are disjoint and make up the split."""
    parts: dict[tuple[int, int], list[int]] = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = ShardDataset(shards, split="train", pipeline=EVAL, shuffle_buffer=8, seed=3)
        loader = DataLoader(dataset, batch_size=10, num_workers=2, collate_fn=_tagged, multiprocessing_context="fork")
        for worker, indices in loader:
            parts.setdefault((rank, worker), []).extend(indices)
    assert sorted(parts) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(indices) == 40 == len(set(indices)) for indices in parts.values())
    for a, b in itertools.combinations(parts.values(), 2):
        assert not set(a) & set(b)
    assert sorted(i for indices in parts.values() for i in indices) == list(range(160))


def test_augmentation_reproducible_and_resume_mid_epoch(shards):
    """Train pipeline, shuffled, through 2 persistent workers: an epoch replays exactly (images too),
    set_epoch(e, start=k) resumes at batch k, and the next epoch differs."""
    dataset = ShardDataset(shards, split="train", pipeline=TRAIN, shuffle_buffer=16, seed=1)
    loader = DataLoader(dataset, batch_size=8, num_workers=2, persistent_workers=True, multiprocessing_context="fork")

    def epoch(number: int, start: int = 0) -> list[tuple[list[int], torch.Tensor]]:
        dataset.set_epoch(number, start=start, batch_size=8)
        return [(batch["meta"]["index"].tolist(), batch["image"]) for batch in loader]

    first = epoch(0)
    assert len(first) == 20 and sorted(i for indices, _ in first for i in indices) == list(range(160))
    resumed = epoch(0, start=3)
    assert [indices for indices, _ in resumed] == [indices for indices, _ in first[3:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, first[3:], strict=True))
    second = epoch(1)
    assert [indices for indices, _ in second] != [indices for indices, _ in first]
    one = {i: image for indices, images in first for i, image in zip(indices, images, strict=True)}
    two = {i: image for indices, images in second for i, image in zip(indices, images, strict=True)}
    assert not torch.equal(one[0], two[0])  # a new epoch draws new augmentations


def test_resampled_streams_beyond_one_epoch(shards):
    dataset = ShardDataset(shards, split="val", pipeline=EVAL, resampled=True, seed=5)
    stream = _indices(itertools.islice(dataset, 3 * len(dataset)))
    assert len(stream) == 60 and set(stream) <= set(range(20))
    assert stream == _indices(itertools.islice(dataset, 60))  # same (seed, epoch): same draws


def test_different_deterministic_pipeline_or_sections_refused(shards):
    resized = [dict(step, size=32) if step["type"] == "ResizePad" else step for step in EVAL]
    with pytest.raises(DataError, match="deterministic steps") as err:
        ShardDataset(shards, split="val", pipeline=resized)
    assert str(shards) in str(err.value)
    with pytest.raises(DataError, match="report_sections"):
        ShardDataset(shards, split="val", pipeline=EVAL, report_sections=("impression",))
    with pytest.raises(DataError, match="no split 'dev'"):
        ShardDataset(shards, split="dev", pipeline=EVAL)


def test_make_shards_cli(synthetic_cxr, tmp_path, capsys):
    tool = load_tool("make_shards")
    out = tmp_path / "shards"
    code = tool.main([str(synthetic_cxr), "--out", str(out), "--shard-size", "8", "--config",
                      str(REPO / "configs" / "demo" / "cxr_clip_tiny.py"), "--split", "val", "--split", "test",
                      "--dtype", "float16", "--jobs", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "val: 3 shards, 20 samples, 0 rows skipped" in printed
    assert f"to train: --cfg-options data.type=shards data.shards={out}" in printed
    index = json.loads((out / "shards.json").read_text())
    assert sorted(index["splits"]) == ["test", "val"] and index["dtype"] == "float16"
    assert [s["samples"] for s in index["splits"]["val"]["shards"]] == [8, 8, 4]
    assert [step["type"] for step in index["deterministic_pipeline"]] == ["LoadImage", "ResizePad"]
    assert index["pipeline"] == json.loads(json.dumps(TRAIN)) and index["report_sections"] == ["findings", "impression"]
    with tarfile.open(out / "val-000000.tar") as tar:
        names = sorted(tar.getnames())[:4]
        assert names == ["000000000.image.npy", "000000000.labels.json", "000000000.meta.json", "000000000.report.txt"]
        assert np.load(io.BytesIO(tar.extractfile(names[0]).read())).dtype == np.float16
        assert set(json.loads(tar.extractfile(names[2]).read())) == {"path", "study_id", "index"}
    assert tool.main([str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_unreadable_rows_skipped_and_counted(synthetic_cxr, tmp_path):
    rows = [json.loads(line) for line in synthetic_cxr.read_text().splitlines()[:3]]
    for row in rows:
        row["image"] = str(synthetic_cxr.parent / row["image"])
        row["split"] = "train"
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"not a dataset" * 10)
    rows.append(dict(rows[0], image="garbage.dcm", study_id="bad"))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = write_shards(manifest, tmp_path / "out", TRAIN, shard_size=2, allow_outside_root=True, progress=False)
    assert summary["splits"]["train"]["samples"] == 3 and summary["splits"]["train"]["skipped"] == 1
    (entry,) = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert entry["line"] == 4 and entry["path"] == "garbage.dcm" and entry["index"] == 3 and entry["reason"]
    assert summary["skipped"] == [entry]
    dataset = ShardDataset(tmp_path / "out", split="train", pipeline=EVAL)
    assert len(dataset) == 3 and sorted(_indices(dataset)) == [0, 1, 2]


@pytest.mark.slow
def test_trainer_streams_shards_and_resumes_mid_epoch(shards, synthetic_cxr, tmp_path, one_thread):
    """data.type=shards in a config: training and validation from the shards, and a run stopped after 3 steps
    and resumed ends where an uninterrupted one does (same batches, same augmentation)."""
    from mmvl.engine.checkpoint import load_checkpoint
    from mmvl.engine.trainer import Trainer
    from tests.conftest import tiny_clip_config

    def config(steps):
        return tiny_clip_config(synthetic_cxr, "data.type=shards", f"data.shards={shards}", "data.shuffle_buffer=20",
                                f"train.max_steps={steps}", "train.batch_size=8", "train.val_interval=3",
                                "train.ckpt_interval=3", "optim.warmup_steps=1", "optim.min_lr_ratio=1.0",
                                "train.deterministic=True")  # constant LR: the runs differ in max_steps

    straight = Trainer(config(6), tmp_path / "straight")
    assert type(straight.train_set).__name__ == "ShardDataset" and len(straight.train_set) == 160
    metrics = straight.fit()
    assert "val/i2t_R@5" in metrics  # validation read the val shards
    Trainer(config(3), tmp_path / "stopped").fit()
    Trainer(config(3), tmp_path / "stopped", resume=True, resume_override=["train.max_steps=6"]).fit()
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
