"""The whole-config check (mmvl/config/validate.py): typos refused by name before any expensive work, and the
size knobs (img_size, volume_size, spacing, hu_window) that fill the model and both pipelines."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from mmvl.config import Config
from mmvl.config.validate import resolve_config, validate_config
from mmvl.errors import ConfigError
from tests.conftest import load_tool

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "demo" / "cxr_clip_tiny.py"
CT_TINY = REPO / "configs" / "demo" / "ct_clip_tiny.py"
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.py") if "_base_" not in p.parts)


def tiny(*options: str, path: Path = TINY) -> Config:
    return Config.fromfile(path).merge_options(list(options))


def child_config(tmp_path: Path, body: str, base: Path = TINY) -> Path:
    """A config file inheriting ``base`` by absolute path, with ``body`` on top."""
    path = tmp_path / "child.py"
    path.write_text(f"_base_ = [{str(base)!r}]\n" + textwrap.dedent(body))
    return path


def resize_sizes(cfg: Config) -> list:
    return [step["size"] for name in ("train_pipeline", "eval_pipeline") for step in cfg.data[name]
            if step["type"] in ("ResizePad", "CropOrPad")]


# -- the reproductions of the issue -------------------------------------------------------------------------------
def test_cfg_options_typo_inside_data_is_refused_naming_the_key():
    # data carries type="manifest", which used to let any key in unchecked
    with pytest.raises(ConfigError, match=r"data\.manfest.*Did you mean 'manifest'"):
        tiny("data.manfest=x.jsonl")


@pytest.mark.parametrize("body, key, close", [
    ("trian = dict(max_steps=3)\n", "trian", "train"),
    ("data = dict(manfest='x.jsonl')\n", "data.manfest", "manifest"),
])
def test_config_file_typos_are_refused(tmp_path, body, key, close):
    cfg = Config.fromfile(child_config(tmp_path, body))
    with pytest.raises(ConfigError, match=rf"unknown key '{key}'.*Did you mean '{close}'") as err:
        validate_config(cfg)
    assert "Known keys:" in str(err.value)


@pytest.mark.parametrize("case", ["cfg-options data.manfest", "file trian", "file data.manfest"])
def test_train_cli_exits_2_on_a_typo(tmp_path, capsys, case):
    config, options = str(TINY), []
    if case == "cfg-options data.manfest":
        options, key = ["data.manfest=x.jsonl"], "data.manfest"
    elif case == "file trian":
        config, key = str(child_config(tmp_path, "trian = dict(max_steps=3)\n")), "trian"
    else:
        config, key = str(child_config(tmp_path, "data = dict(manfest='x.jsonl')\n")), "data.manfest"
    # a manifest that does not exist: were the typo let through, the run would stop there with another message
    argv = [config, "--work-dir", str(tmp_path / "work"), "--cfg-options",
            f"data.manifest={tmp_path / 'missing.jsonl'}", *options]
    assert load_tool("train").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and "Did you mean" in err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("option, close", [
    ("data.view_policy=frontl", "frontal"),
    ("data.on_error=skipp", "skip"),
    ("data.cache=dsk", "disk"),
])
def test_a_data_value_outside_its_choices_exits_2_naming_the_key_and_closest(tmp_path, capsys, option, close):
    # these used to pass the check and fail as a plain ValueError inside the dataset (exit 1, a traceback)
    argv = [str(TINY), "--work-dir", str(tmp_path / "work"), "--cfg-options", option]
    assert load_tool("train").main(argv) == 2
    err = capsys.readouterr().err
    key, value = option.split("=")
    assert f"{key}={value!r} is not one of" in err and f"Did you mean {close!r}?" in err
    assert not (tmp_path / "work").exists()


def test_misspelt_encoder_argument_is_refused_before_the_model_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"image_encoder\.dpeth.*Did you mean 'depth'"):
        tiny("model.image_encoder.dpeth=2")
    # the same typo in a file (no --cfg-options) is the config check's: timm's VisionTransformer signature
    cfg = Config.fromfile(child_config(tmp_path, "model = dict(image_encoder=dict(dpeth=2))\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'model\.image_encoder\.dpeth' in encoder 'vit2d'\. Did you "
                                          r"mean 'depth'"):
        validate_config(cfg)


def test_misspelt_optim_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*Did you mean 'lr'"):
        tiny("optim.lrr=1")
    cfg = Config.fromfile(child_config(tmp_path, "optim = dict(lrr=1.0)\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr' in optim\. Did you mean 'lr'"):
        validate_config(cfg)


def test_img_size_knob_sizes_the_model_and_both_pipelines(tmp_path):
    from mmvl.data.transforms import save_preprocess

    cfg = validate_config(tiny("img_size=48"))
    assert cfg.img_size == 48 and cfg.model.image_encoder.img_size == 48
    assert resize_sizes(cfg) == [48, 48]  # ResizePad of the train and the eval pipeline
    spec = json.loads(save_preprocess(tmp_path / "preprocess.json", cfg.data.eval_pipeline).read_text())["pipeline"]
    assert [step["size"] for step in spec if step["type"] == "ResizePad"] == [48]


def test_encoder_img_size_alone_is_refused_naming_both_values():
    with pytest.raises(ConfigError) as err:
        validate_config(tiny("model.image_encoder.img_size=48"))
    message = str(err.value)
    assert "model.image_encoder.img_size=48" in message and "img_size=64" in message and "set img_size=" in message
    # a pipeline step given its own size is refused the same way
    with pytest.raises(ConfigError, match=r"data\.eval_pipeline\.1\.size=32 disagrees with img_size=64"):
        validate_config(tiny("data.eval_pipeline.1.size=32"))


def test_img_size_and_a_matching_encoder_size_together_are_accepted():
    cfg = validate_config(tiny("img_size=48", "model.image_encoder.img_size=48"))
    assert cfg.model.image_encoder.img_size == 48 and resize_sizes(cfg) == [48, 48]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_validates_and_its_dump_loads_back_identically(path, tmp_path):
    resolved = validate_config(Config.fromfile(path))
    again = Config.fromfile(resolved.dump(tmp_path / "config.py"))
    assert validate_config(again).to_dict() == resolved.to_dict() == again.to_dict()
    assert resolve_config(resolved).to_dict() == resolved.to_dict()  # resolving twice changes nothing


def test_warmup_not_shorter_than_the_run_is_refused():
    with pytest.raises(ConfigError) as err:
        validate_config(tiny("train.max_steps=30"))  # the demo warms up for 30 steps
    message = str(err.value)
    assert "optim.warmup_steps=30" in message and "train.max_steps=30" in message
    assert "Set optim.warmup_steps below 30" in message
    validate_config(tiny("train.max_steps=31"))
    validate_config(tiny("train.max_steps=3", "optim.warmup_steps=0"))  # no warmup at all


@pytest.mark.parametrize("path", [TINY, CT_TINY, REPO / "configs" / "cxr_clip_report.py"], ids=lambda p: p.stem)
def test_validation_builds_nothing(monkeypatch, path):
    from mmvl.registry import DATASETS, ENCODERS, HEADS, TRANSFORMS

    def refuse(*args, **kwargs):
        raise AssertionError("validate_config built something")

    for registry in (ENCODERS, HEADS, TRANSFORMS, DATASETS):
        monkeypatch.setattr(registry, "build", refuse)
    validate_config(Config.fromfile(path))


# -- the 3D knobs -------------------------------------------------------------------------------------------------
def test_volume_spacing_and_window_knobs_fill_the_3d_model_and_pipelines():
    cfg = validate_config(tiny("volume_size=(32,32,32)", "spacing=(4.0,4.0,4.0)", "hu_window=(-500.0,500.0)",
                               path=CT_TINY))
    assert tuple(cfg.model.image_encoder.img_size) == (32, 32, 32)
    assert [tuple(size) for size in resize_sizes(cfg)] == [(32, 32, 32)] * 2
    for name in ("train_pipeline", "eval_pipeline"):
        steps = {step["type"]: step for step in cfg.data[name]}
        assert tuple(steps["Resample"]["spacing"]) == (4.0, 4.0, 4.0)
        assert (steps["IntensityWindow"]["low"], steps["IntensityWindow"]["high"]) == (-500.0, 500.0)
    with pytest.raises(ConfigError, match=r"model\.image_encoder\.img_size=\(24, 24, 24\) disagrees with "
                                          r"volume_size=\(48, 48, 48\)"):
        validate_config(tiny("model.image_encoder.img_size=(24,24,24)", path=CT_TINY))


def test_a_knob_nothing_takes_is_refused():
    with pytest.raises(ConfigError, match=r"volume_size=\(8, 8, 8\) is set but nothing in this config takes it"):
        validate_config(tiny("volume_size=(8,8,8)"))


def test_the_dump_follows_a_later_knob_change(tmp_path):
    dumped = validate_config(tiny("img_size=48")).dump(tmp_path / "config.py")
    again = validate_config(Config.fromfile(dumped).merge_options(["img_size=32"]))
    assert again.model.image_encoder.img_size == 32 and resize_sizes(again) == [32, 32]


# -- nested recipes and builder-provided keys ---------------------------------------------------------------------
def test_bert_config_and_tokenizer_recipe_typos_are_refused(tmp_path):
    cfg = Config.fromfile(child_config(tmp_path, "model = dict(text_encoder=dict(config=dict(hidden_sizee=64)))\n"))
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.config\.hidden_sizee' in BertConfig\. Did you mean "
                                          r"'hidden_size'"):
        validate_config(cfg)
    cfg = Config.fromfile(child_config(tmp_path, "model = dict(text_encoder=dict(tokenizer=dict(vocab_sise=9)))\n"))
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.tokenizer\.vocab_sise.*Did you mean 'vocab_size'"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match=r"config\.vocab_size: set from the tokenizer"):
        validate_config(tiny("model.text_encoder.config={'vocab_size': 10}"))


def test_two_different_tokenizer_recipes_are_refused():
    # the trainer trains one vocabulary, from the first recipe, for the text encoder and the report head
    cfg = Config.fromfile(REPO / "configs" / "cxr_clip_report.py").merge_options(
        ["model.heads.1.tokenizer.vocab_size=8000"])
    with pytest.raises(ConfigError, match=r"model\.heads\.1\.tokenizer=.*differs from model\.text_encoder\.tokenizer"):
        validate_config(cfg)


def test_head_keys_the_model_builder_handles_are_accepted():
    cfg = validate_config(tiny("model.heads.0.loss_weight=0.5", "model.heads.0.name=contrastive"))
    assert cfg.model.heads[0].loss_weight == 0.5
    with pytest.raises(ConfigError, match=r"model\.heads\.0\.embed_dm.*Did you mean 'embed_dim'"):
        tiny("model.heads.0.embed_dm=3")


def test_cfg_options_may_set_any_schema_key_the_file_leaves_out(tmp_path):
    path = child_config(tmp_path, "train = dict(_delete_=True, max_steps=100, batch_size=8)\n")
    cfg = Config.fromfile(path).merge_options(["train.vis_interval=5"])  # in TRAIN_DEFAULTS, not in the file
    assert validate_config(cfg).train.vis_interval == 5


# -- the other tools that read a training config ------------------------------------------------------------------
@pytest.mark.parametrize("tool", ["check_data", "make_shards"])
def test_data_tools_exit_2_on_a_config_typo(tmp_path, capsys, tool):
    config = child_config(tmp_path, "data = dict(manfest='x.jsonl')\n")
    argv = [str(tmp_path / "missing.jsonl"), "--config", str(config)]
    if tool == "make_shards":
        argv += ["--out", str(tmp_path / "shards")]
    assert load_tool(tool).main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.manfest" in err and "'manifest'" in err


@pytest.mark.parametrize("tool", ["train", "check_data", "make_shards"])
def test_tool_help_names_exit_status_2(capsys, tool):
    with pytest.raises(SystemExit):
        load_tool(tool).parse_args(["--help"])
    assert "Exit status 2: " in " ".join(capsys.readouterr().out.split())
