"""The text encoder as a transformers folder (AutoModel/AutoTokenizer), and imported back into mmvl."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from mmvl import zoo
from tests.zoo.conftest import export_entry

TEXTS = ["small left pleural effusion", "no acute cardiopulmonary process", "nodule", "stable cardiomegaly"]


def test_transformers_loads_the_text_encoder(entry2d, one_thread):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    folder = entry2d / "text_encoder"
    assert {"config.json", "model.safetensors", "tokenizer.json", "mmvl_text.json"} <= {p.name for p in
                                                                                         folder.iterdir()}
    sidecar = json.loads((folder / "mmvl_text.json").read_text())
    assert sidecar["pooling"] == "mean" and sidecar["embed_dim"] == 32
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    embedded = F.normalize(pooled @ load_file(str(folder / "text_projection.safetensors"))["weight"].T, dim=-1)
    expected = zoo.load(entry2d).encode_text(TEXTS)
    assert F.cosine_similarity(expected, embedded, dim=-1).min() >= 0.9999


def test_import_transformers_folder_and_export_text_entry(entry2d, tmp_path, one_thread):
    imported = zoo.import_hf_text(entry2d / "text_encoder")
    expected = zoo.load(entry2d).encode_text(TEXTS)
    assert F.cosine_similarity(expected, imported.encode_text(TEXTS), dim=-1).min() >= 0.9999
    entry = export_entry(imported, tmp_path / "zoo", "text_only")
    config = json.loads((entry / "config.json").read_text())
    assert config["parts"] == ["text"] and config["model"]["text_encoder"]["tokenizer"] == "tokenizer"
    assert "pretrained" not in config["model"]["text_encoder"]  # a BERT: rebuilt from config=, weights in safetensors
    assert torch.equal(zoo.load(entry).encode_text(TEXTS), imported.encode_text(TEXTS))


def test_export_tool_imports_a_transformers_folder(entry2d, tmp_path, one_thread):
    from tests.conftest import load_tool

    out = tmp_path / "zoo" / "from_hf"
    assert load_tool("export").main(["--from-transformers", str(entry2d / "text_encoder"), "--name", "from_hf",
                                     "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["formats"] == ["mmvl", "hf"]
    expected = zoo.load(entry2d).encode_text(TEXTS)
    assert F.cosine_similarity(expected, zoo.load(out).encode_text(TEXTS), dim=-1).min() >= 0.9999
