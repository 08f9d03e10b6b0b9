from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmvl.data.datasets import ManifestDataset
from mmvl.data.loader import Collate, ResumableSampler
from mmvl.data.manifest import load_manifest
from mmvl.data.tokenizer import load_tokenizer, train_wordpiece_tokenizer
from mmvl.data.transforms import Pipeline, load_preprocess, save_preprocess
from mmvl.errors import ManifestError

EVAL = [dict(type="LoadImage"), dict(type="ResizePad", size=32), dict(type="Normalize", mean=0.5, std=0.25)]
TRAIN = [dict(type="LoadImage"), dict(type="ResizePad", size=32), dict(type="RandomAugment2D"),
         dict(type="Normalize", mean=0.5, std=0.25)]


@pytest.fixture
def small_manifest(tmp_path, make_dicom):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        make_dicom(f"img/{i}.dcm", rng.integers(0, 4000, (24, 16)).astype(np.uint16))
        report = "" if i == 5 else f"FINDINGS: finding number {i}. IMPRESSION: impression {i}."
        rows.append({"image": f"img/{i}.dcm", "report": report, "labels": {"effusion": i % 2},
                     "split": "train" if i < 4 else "val", "study_id": f"s{i}"})
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_manifest_rows_splits_labels_and_empty_reports(small_manifest):
    train = ManifestDataset(small_manifest, EVAL, split="train")
    assert len(train) == 4 and train.label_names == ["effusion"]
    item = train[1]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["report"] == "finding number 1. impression 1."
    assert item["labels"].tolist() == [1.0] and item["meta"]["study_id"] == "s1"
    val = ManifestDataset(small_manifest, EVAL, split="val")
    assert len(val) == 1 and val.skipped_empty_reports == 1  # row 6 has an empty report


def test_missing_image_is_an_error_naming_it(small_manifest):
    (small_manifest.parent / "img" / "2.dcm").unlink()
    with pytest.raises(ManifestError) as err:
        ManifestDataset(small_manifest, EVAL)
    assert "img/2.dcm" in str(err.value) and "line 3" in str(err.value) and "1 image file(s)" in str(err.value)
    with pytest.raises(ManifestError, match="no rows with split == 'test'"):
        ManifestDataset(small_manifest, EVAL, split="test", check_files=False)


def test_corrupt_image_skipped_and_counted_when_asked(small_manifest):
    (small_manifest.parent / "img" / "0.dcm").write_bytes(b"garbage" * 50)
    strict = ManifestDataset(small_manifest, EVAL, split="train")
    with pytest.raises(Exception, match="0.dcm"):
        strict[0]
    lenient = ManifestDataset(small_manifest, EVAL, split="train", on_error="skip")
    skipped = lenient[0]["skipped"]
    assert skipped["path"].endswith("0.dcm") and "not a DICOM file" in skipped["reason"] and skipped["line"] == 1
    batch = Collate()([lenient[0], lenient[1], lenient[2]])
    assert batch["n_skipped"] == 1 and batch["image"].shape == (2, 1, 32, 32)
    assert batch["skipped"] == [skipped]


def test_csv_manifest_and_bad_rows(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('image,report,split,labels\na.dcm;b.dcm,some text,train,"{""x"": 1}"\n')
    rows = load_manifest(path)
    assert rows[0]["image"] == [str(tmp_path / "a.dcm"), str(tmp_path / "b.dcm")]
    assert rows[0]["labels"] == {"x": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.dcm", "report": "x"}\n{"report": "no image"}\n')
    with pytest.raises(ManifestError, match="row 2: no 'image' path"):
        load_manifest(bad)
    bad.write_text('{"image": "a.dcm"\n')
    with pytest.raises(ManifestError, match="line 1: invalid JSON"):
        load_manifest(bad)


def test_resize_pad_keeps_aspect(make_dicom):
    tall = np.zeros((40, 20), dtype=np.uint16)
    tall[:, :] = 1000
    tall[0, 0] = 0
    path = make_dicom("tall.dcm", tall)
    image = Pipeline([dict(type="LoadImage"), dict(type="ResizePad", size=20)])(path)["image"][0]
    assert image.shape == (20, 20)
    assert np.allclose(image[:, :5], 0) and np.allclose(image[:, -5:], 0)  # padded left/right
    assert image[5:15, 6:14].min() > 0.9  # the resized content sits in the middle


def test_augmentation_is_seeded_and_eval_pipeline_round_trips(small_manifest, tmp_path):
    path = str(small_manifest.parent / "img" / "1.dcm")
    train = Pipeline(TRAIN)
    a, b, c = train(path, seed=7)["image"], train(path, seed=7)["image"], train(path, seed=8)["image"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    spec_file = save_preprocess(tmp_path / "preprocess.json", EVAL)
    rebuilt = load_preprocess(spec_file)
    assert rebuilt.spec == EVAL
    assert np.array_equal(rebuilt(path)["image"], ManifestDataset(small_manifest, EVAL)[1]["image"].numpy())


def test_sampler_resumes_mid_epoch():
    sampler = ResumableSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:]
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in full]
    assert sorted(i for i, _ in full) == list(range(10))


def test_wordpiece_tokenizer_frames_and_reloads(tmp_path):
    reports = ["No pleural effusion.", "Moderate right pleural effusion.", "The heart is enlarged."] * 4
    tokenizer = train_wordpiece_tokenizer(reports, tmp_path / "tok", vocab_size=200, min_frequency=1)
    ids = tokenizer("moderate pleural effusion")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    reloaded = load_tokenizer(tmp_path / "tok")
    assert reloaded("moderate pleural effusion")["input_ids"] == ids
    assert (tmp_path / "tok" / "vocab.txt").read_text().splitlines()[:2] == ["[PAD]", "[UNK]"]


def test_wordpiece_vocabulary_is_identical_across_processes(tmp_path):
    """A rerun of the same config must build the same vocabulary (not so with tokenizers' trainer, #1794)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from mmvl.data.tokenizer import train_wordpiece_tokenizer as t; "
        "t([f'report {i} shows a {w} effusion' for i in range(30) for w in ('small', 'large', 'tiny')] * 2, "
        "sys.argv[1], vocab_size=200, min_frequency=2)"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], check=True, env=env)
    assert (tmp_path / "1" / "tokenizer.json").read_bytes() == (tmp_path / "2" / "tokenizer.json").read_bytes()
    vocab = (tmp_path / "1" / "vocab.txt").read_text().splitlines()
    # special tokens, characters, then words by frequency with ties in alphabetical order
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    order = [vocab.index(token) for token in ("##w", "effusion", "large", "small", "10")]
    assert order == sorted(order)
