"""Text encoders from the transformers BERT family: a local pretrained directory or a from-scratch config."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmvl.data.tokenizer import load_tokenizer
from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.registry import ENCODERS


@ENCODERS.register("bert", "hf_text")
class HFTextEncoder(nn.Module):
    """A transformers encoder (BERT, PubMedBERT, CXR-BERT, MiniLM...) pooled by ``[CLS]`` or mean.

    Either ``pretrained`` (a model directory or hub name; its tokenizer is used unless ``tokenizer``
    is given) or ``config`` (``BertConfig`` fields, e.g. ``num_hidden_layers=2``) plus ``tokenizer``
    (a tokenizer directory, e.g. the WordPiece vocabulary the trainer trains on the reports).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        config: dict[str, Any] | None = None,
        pooling: str = "cls",
        max_length: int = 128,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        if pooling not in ("cls", "mean"):
            raise ConfigError(f"text_encoder.pooling must be 'cls' or 'mean', got '{pooling}'")
        if pretrained is None and config is None:
            raise ConfigError("text_encoder needs either 'pretrained' (model directory or name) or 'config'")
        tokenizer_path = tokenizer or pretrained
        if tokenizer_path is None:
            raise ConfigError(
                "text_encoder.tokenizer is not set: give a tokenizer directory (tools/train.py trains one on "
                "the training reports and sets it when the text encoder is built from a config)"
            )
        if os.path.isdir(str(tokenizer_path)):
            self.tokenizer = load_tokenizer(tokenizer_path)
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if pretrained is not None:
            local = os.path.isdir(pretrained)
            self.model = AutoModel.from_pretrained(pretrained, local_files_only=local)
        else:
            bert_config = BertConfig(vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id,
                                     **config)
            self.model = BertModel(bert_config, add_pooling_layer=False)
        if grad_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.pooling = pooling
        self.max_length = max_length
        self.out_dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {k: tokens[k].to(device) for k in ("input_ids", "attention_mask")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return EncoderOutput(pooled=pooled, tokens=hidden, attention_mask=attention_mask)
