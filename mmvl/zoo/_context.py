"""What the export writers (the mmvl format in ``export.py`` and the interop formats in ``open_clip_format.py``,
``hf_text.py``, ``monai_bundle.py``, ``compiled.py``) share: the context they are given, the embedding check
each runs on what it wrote, the probe texts, and the tokenizer and BERT-config helpers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmvl.errors import CheckpointError, ConfigError
from mmvl.loading import LoadedModel
from mmvl.models.encoders.bert_text import bert_config_names

MIN_COSINE = 0.9999  # interop embeddings against mmvl's, float32, on the same input
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
PROBE_TEXTS = ["no acute cardiopulmonary process", "small left pleural effusion", "pneumothorax", "normal study"]


class NotExportable(ConfigError):
    """This model cannot be written in a requested format (the message says why)."""


@dataclass
class ExportContext:
    """What the format writers get: the loaded ``model`` (eval, CPU, float32), the entry folder being written
    (``out``), the entry's ``config`` (config.json, without the formats list), and probe inputs."""

    model: nn.Module
    loaded: LoadedModel
    out: Path
    name: str
    config: dict[str, Any]
    probe_images: torch.Tensor
    probe_texts: list[str]
    final: Path | None = None  # where the entry will be once written (``out`` is a temporary sibling)

    @property
    def parts(self) -> list[str]:
        return self.config["parts"]

    @property
    def input(self) -> dict[str, Any]:
        return self.config["input"]


def compare(reference: torch.Tensor, other: torch.Tensor | Any, what: str, threshold: float = MIN_COSINE,
            ) -> dict[str, Any]:
    """Row-wise cosine of two embedding batches (float32); refuses the export below ``threshold``."""
    other = torch.as_tensor(other).float().reshape(reference.shape)
    reference = reference.float()
    cosine = torch.nn.functional.cosine_similarity(reference, other, dim=-1).min().item()
    result = {"cosine_min": round(cosine, 7), "max_abs_diff": float((reference - other).abs().max()),
              "bitwise_equal": bool(torch.equal(reference, other))}
    if not cosine >= threshold:
        raise CheckpointError(f"{what}: embeddings differ from mmvl's (min cosine {cosine:.6f} < {threshold}); "
                              "the export is wrong, not written")
    return result


def plain(value: Any) -> Any:
    """Nested dicts/lists/tuples as JSON-ready dicts and lists; anything else must already be JSON data."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"config value {value!r} ({type(value).__name__}) is not plain data; config.json holds JSON only")


def bert_config_fields(hf_config: Any, tokenizer: Any) -> dict[str, Any] | None:
    """The ``config=`` fields that rebuild a pretrained BERT-family text model from scratch, or None when
    ``HFTextEncoder(config=...)`` (a ``BertModel`` sized by the tokenizer) cannot express it."""
    if hf_config.model_type != "bert" or hf_config.vocab_size != len(tokenizer):
        return None
    if hf_config.pad_token_id != tokenizer.pad_token_id:
        return None
    known = bert_config_names()  # a saved config may hold more (gradient_checkpointing...), which BertModel ignores
    fields = {key: value for key, value in hf_config.to_diff_dict().items() if key in known}
    for key in ("vocab_size", "pad_token_id", "architectures", "_name_or_path", "transformers_version", "model_type",
                "torch_dtype", "dtype", "_attn_implementation_autoset", "add_pooling_layer"):
        fields.pop(key, None)
    return plain(fields)


def save_tokenizer(tokenizer: Any, source: Any, folder: Path) -> None:
    """The tokenizer's own files when it came from a folder (byte-identical; only tokenizer files, the folder may
    be a whole pretrained model), else ``save_pretrained``."""
    files = [Path(source) / name for name in TOKENIZER_FILES] if isinstance(source, (str, os.PathLike)) else []
    files = [file for file in files if file.is_file()]
    folder.mkdir(parents=True, exist_ok=True)
    if files:
        for file in files:
            shutil.copy2(file, folder / file.name)
    else:
        tokenizer.save_pretrained(str(folder))
