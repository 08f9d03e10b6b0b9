from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mmvl.config import Config
from mmvl.errors import ConfigError


@pytest.fixture
def config_tree(tmp_path):
    (tmp_path / "_base_").mkdir()
    (tmp_path / "_base_" / "model.py").write_text(textwrap.dedent("""
        model = dict(image_encoder=dict(type="vit2d", depth=12, embed_dim=768), heads=[dict(type="clip")])
        train = dict(max_steps=100, lr=1e-3, amp=None, betas=(0.9, 0.98), flag=True)
    """))
    (tmp_path / "_base_" / "data.py").write_text('data = dict(manifest="a.jsonl", size=224)\n')
    (tmp_path / "child.py").write_text(textwrap.dedent("""
        import math
        _base_ = ["_base_/model.py", "_base_/data.py"]
        _private = 3
        model = dict(image_encoder=dict(depth=2))
        data = dict(_delete_=True, manifest="b.jsonl")
        extra = math.pi
    """))
    return tmp_path


def test_base_inheritance_merges_dicts_and_honours_delete(config_tree):
    cfg = Config.fromfile(config_tree / "child.py")
    assert cfg.model.image_encoder.depth == 2
    assert cfg.model.image_encoder.embed_dim == 768  # kept from the base
    assert cfg.model.heads[0].type == "clip"
    assert cfg.data == {"manifest": "b.jsonl"}  # _delete_ replaced instead of merging
    assert "math" not in cfg and "_private" not in cfg and "_base_" not in cfg
    assert cfg.extra == pytest.approx(3.14159, rel=1e-5)


def test_cfg_options_are_typed(config_tree):
    cfg = Config.fromfile(config_tree / "child.py")
    cfg.merge_options([
        "model.image_encoder.depth=4", "train.lr=2e-4", "train.max_steps=20", "train.flag=false",
        "train.amp=bf16", "train.betas=0.8,0.9", "model.heads.0.embed_dim=64",
    ])
    assert cfg.model.image_encoder.depth == 4 and isinstance(cfg.model.image_encoder.depth, int)
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 20 and cfg.train.flag is False
    assert cfg.train.amp == "bf16"
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.model.heads[0].embed_dim == 64  # new kwarg allowed inside a dict with type=
    cfg.merge_options(["train.lr=1"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


def test_unknown_key_and_bad_type_are_clear_errors(config_tree):
    cfg = Config.fromfile(config_tree / "child.py")
    with pytest.raises(ConfigError, match=r"unknown key 'max_step'.*Did you mean 'max_steps'"):
        cfg.merge_options(["train.max_step=5"])
    with pytest.raises(ConfigError, match=r"unknown key 'modle'"):
        cfg.merge_options(["modle.depth=5"])
    with pytest.raises(ConfigError, match=r"expected a value of type int"):
        cfg.merge_options(["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        cfg.merge_options(["train.max_steps"])


def test_dump_round_trips(config_tree, tmp_path):
    cfg = Config.fromfile(config_tree / "child.py")
    cfg.merge_options(["train.max_steps=7"])
    path = cfg.dump(tmp_path / "out" / "config.py")
    again = Config.fromfile(path)
    assert again.to_dict() == cfg.to_dict()


def test_missing_base_and_cycles(tmp_path):
    (tmp_path / "a.py").write_text('_base_ = "b.py"\nx = 1\n')
    with pytest.raises(ConfigError, match="not found"):
        Config.fromfile(tmp_path / "a.py")
    (tmp_path / "b.py").write_text('_base_ = "a.py"\n')
    with pytest.raises(ConfigError, match="circular"):
        Config.fromfile(tmp_path / "a.py")


def test_shipped_configs_load():
    repo = Path(__file__).resolve().parents[2]
    full = Config.fromfile(repo / "configs" / "cxr_clip.py")
    assert full.model.image_encoder.model_name == "vit_base_patch16_224"
    assert full.train.batch_size == 256 and full.data.manifest == "data/mimic_cxr/manifest.jsonl"
    tiny = Config.fromfile(repo / "configs" / "demo" / "cxr_clip_tiny.py")
    assert tiny.model.image_encoder.img_size == 64 and tiny.model.image_encoder.depth == 4
    assert tiny.model.text_encoder.pooling == "mean" and tiny.optim.weight_decay == 0.05
    assert tiny.model.text_encoder.type == "bert"  # inherited from the full config
    assert tiny.data.val_split == "val" and tiny.data.train_pipeline[1].size == 64
