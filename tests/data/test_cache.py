"""The disk cache (mmvl.data.datasets.ArrayCache) and the loader worker choice of cached datasets; cached and
uncached datasets giving the same tensors is tested in test_pipelines.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmvl.data import datasets
from mmvl.data.datasets import ArrayCache, ManifestDataset

EVAL_2D = [dict(type="LoadImage"), dict(type="ResizePad", size=16), dict(type="Normalize", mean=0.5, std=0.25)]
TRAIN_2D = EVAL_2D[:2] + [dict(type="RandomAugment2D")] + EVAL_2D[2:]


@pytest.fixture
def manifest(tmp_path, make_dicom):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        make_dicom(f"{i}.dcm", rng.integers(0, 4000, (20, 13)).astype(np.uint16), WindowCenter=2000, WindowWidth=4000)
        rows.append({"image": f"{i}.dcm", "report": f"FINDINGS: finding {i}."})
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class Stage:
    """A stand-in for the pipeline's deterministic head that counts its calls."""

    def __init__(self, shape):
        self.shape, self.calls = shape, 0

    def __call__(self, item):
        self.calls += 1
        if item["path"] == "bad":
            return {"error": "bad: cannot decode"}
        return {"image": torch.full(self.shape, float(len(item["path"])), dtype=torch.float32),
                "meta": {"path": item["path"], "spacing": np.float32(0.5), "shape": list(self.shape[1:])}}


@pytest.mark.parametrize("shape", [(1, 4, 4), (1, 64, 64, 80)])
def test_array_cache_stores_images_metadata_and_errors(tmp_path, shape):
    assert np.prod(shape[:3]) * 4 < datasets.MMAP_BYTES < np.prod(shape) * 4 or len(shape) == 3  # read; mapped
    items = [{"path": "ab", "stamp": [1, 2]}, {"path": "bad", "stamp": [1, 2]}]
    stage = Stage(shape)
    cache = ArrayCache(items, stage, tmp_path)
    assert not cache.filled()
    first = [cache[0], cache[1]]
    assert cache.filled() and stage.calls == 2
    again = ArrayCache(items, stage, tmp_path)
    hit, error = again[0], again[1]
    assert stage.calls == 2  # read back, not recomputed
    assert error == {"error": "bad: cannot decode"} == first[1]
    np.testing.assert_array_equal(hit["image"], first[0]["image"])
    assert hit["image"].dtype == torch.float32 and tuple(hit["image"].shape) == shape
    assert hit["meta"] == {"path": "ab", "spacing": 0.5, "shape": list(shape[1:])}
    hit["image"].add_(1.0)  # writable either way (copy-on-write when mapped), and the file keeps its values
    np.testing.assert_array_equal(again[0]["image"], first[0]["image"])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".npy"]  # no partial files left


def test_array_cache_key_follows_the_stamp_and_spec(tmp_path):
    keys = {ArrayCache([{"path": "a", "stamp": stamp, "spec": spec}], Stage((1, 2, 2)), tmp_path).keys[0]
            for stamp in ([1, 2], [1, 3]) for spec in ("[]", "[{}]")}
    assert len(keys) == 4


def test_loader_workers_is_zero_only_for_a_filled_cache_without_random_steps(tmp_path, manifest):
    assert ManifestDataset(manifest, EVAL_2D).loader_workers(4) == 4  # no cache: every item is real work
    assert ManifestDataset(manifest, EVAL_2D, cache="memory").loader_workers(4) == 0
    assert ManifestDataset(manifest, TRAIN_2D, cache="memory").loader_workers(4) == 4  # augmentation is real work
    disk = ManifestDataset(manifest, EVAL_2D, cache="disk", cache_dir=tmp_path / "cache")
    assert disk.loader_workers(4) == 4
    for index in range(len(disk)):
        disk[index]
    again = ManifestDataset(manifest, EVAL_2D, cache="disk", cache_dir=tmp_path / "cache")
    assert again.loader_workers(4) == 0
    uncached = ManifestDataset(manifest, EVAL_2D)
    for index in range(len(again)):
        np.testing.assert_array_equal(again[index]["image"], uncached[index]["image"])
