"""The text encoder as a standard transformers folder (``text_encoder/``: config.json, model.safetensors, tokenizer
files, loadable with ``AutoModel``/``AutoTokenizer``), with the pooling and the projection to the shared space
beside it, and the way back: an mmvl text encoder from a local transformers folder."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmvl.errors import ConfigError
from mmvl.loading import LoadedModel
from mmvl.models import EncoderModel
from mmvl.models.embedders import contrastive_head, text_projection
from mmvl.models.encoders import HFTextEncoder
from mmvl.zoo._context import ExportContext, NotExportable, compare, save_tokenizer

FOLDER = "text_encoder"
SIDECAR = "mmvl_text.json"  # pooling, max_length, projection: what turns AutoModel's output into mmvl's embedding
PROJECTION = "text_projection.safetensors"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers without progress bars and load reports: the pooler a saved ``BertModel`` lacks (mmvl pools
    itself, the pooler was never trained) is reported as newly initialised on every load."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def write_text_model(text_encoder: nn.Module, folder: Path, tokenizer_source: Any = None) -> Path:
    """``save_pretrained`` of the transformer (safetensors) and its tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        text_encoder.model.save_pretrained(str(folder), safe_serialization=True)
    save_tokenizer(text_encoder.tokenizer, tokenizer_source, folder)
    return folder


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """mmvl's text pooling: the first ([CLS]) token, or the mean over the attention mask."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@torch.no_grad()
def export_hf_text(context: ExportContext) -> dict[str, Any]:
    """``text_encoder/`` + ``mmvl_text.json`` (+ ``text_projection.safetensors``); read back with transformers'
    AutoModel/AutoTokenizer, pooled and projected as the sidecar says, compared with mmvl's text embeddings."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    text = getattr(context.model, "text_encoder", None)
    if "text" not in context.parts or text is None:
        raise NotExportable("no text encoder in this export")
    if type(text) is not HFTextEncoder:
        raise NotExportable(f"the text encoder is a {type(text).__name__} (its projection is part of the tower); "
                            "export open_clip instead")
    folder = context.out / FOLDER
    if not (folder / "config.json").is_file():
        text_cfg = context.loaded.config["model"].get("text_encoder") or {}
        write_text_model(text, folder, text_cfg.get("tokenizer") or text_cfg.get("pretrained"))
    projection = text_projection(context.model)
    sidecar = {"pooling": text.pooling, "max_length": text.max_length, "normalize": True,
               "projection": PROJECTION if projection is not None else None,
               "embed_dim": int(projection.weight.shape[0]) if projection is not None else None}
    (folder / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    if projection is not None:
        save_file({"weight": projection.weight.detach().contiguous()}, str(folder / PROJECTION))

    with quiet_transformers():
        model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokens = tokenizer(context.probe_texts, padding=True, truncation=True, max_length=text.max_length,
                       return_tensors="pt")
    hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    pooled = pool(hidden, tokens["attention_mask"], text.pooling)
    own_tokens = text.tokenize(context.probe_texts)
    checks = {"pooled": compare(text(own_tokens["input_ids"], own_tokens["attention_mask"]).pooled, pooled,
                                "transformers text encoder")}
    if projection is not None and contrastive_head(context.model) is not None:
        embedded = F.normalize(pooled @ projection.weight.T, dim=-1)
        checks["embedding"] = compare(context.model.encode_text(context.probe_texts), embedded,
                                      "transformers text encoder + projection")
    return checks


def import_hf_text(folder: str | os.PathLike, pooling: str | None = None, max_length: int | None = None
                   ) -> LoadedModel:
    """An mmvl text-only model (``LoadedModel`` with ``encode_text``) from a local transformers folder: the
    ``text_encoder/`` of a zoo entry (its ``mmvl_text.json`` gives pooling and the projection) or any BERT-family
    model folder (``pooling`` ``"cls"`` or ``"mean"``, default cls). ``mmvl.zoo.export(model, name)`` writes it
    as a zoo entry (``--parts text``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: not a transformers model folder (no config.json)")
    sidecar = json.loads((folder / SIDECAR).read_text()) if (folder / SIDECAR).is_file() else {}
    text_cfg = {"type": "bert", "pretrained": str(folder), "pooling": pooling or sidecar.get("pooling", "cls"),
                "max_length": int(max_length or sidecar.get("max_length") or 128)}
    embed_dim = sidecar.get("embed_dim") if sidecar.get("projection") else None
    with quiet_transformers():
        model = EncoderModel(text_encoder=text_cfg, embed_dim=embed_dim)
    if embed_dim:
        model.text_proj.weight.data.copy_(load_file(str(folder / sidecar["projection"]))["weight"])
        model.logit_scale.data.fill_(0.0)
    config = {"model": {"text_encoder": text_cfg}, "imported_from": {"transformers": folder.name}}
    return LoadedModel(model=model.eval(), preprocess=None, config=config, source=str(folder),
                       info={"imported": "transformers"})
