"""Text encoders from the transformers BERT family: a local pretrained directory or a from-scratch config."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmvl.data.tokenizer import load_tokenizer
from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.registry import ENCODERS, unknown_key_message

# BertConfig fields the encoder sets from its tokenizer
FROM_TOKENIZER = ("vocab_size", "pad_token_id")


def bert_config_names() -> set[str]:
    """The fields ``BertConfig`` knows: its keyword arguments and the attributes of a default config (any other
    keyword is kept as an attribute that nothing reads)."""
    from transformers import BertConfig

    fields = {n for n, p in inspect.signature(BertConfig.__init__).parameters.items()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    return fields | {n for n in BertConfig().to_dict() if not n.startswith("_") and n != "model_type"}


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
            model_config = pretrained_config(pretrained, config or {}, local)
            self.model = AutoModel.from_pretrained(pretrained, config=model_config, local_files_only=local)
        else:
            bert_config = BertConfig(vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id,
                                     **config)
            self.model = BertModel(bert_config, add_pooling_layer=False)
        if pretrained is not None:
            check_vocabulary(self.tokenizer, tokenizer_path, self.model, pretrained)
        if grad_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.pooling = pooling
        self.max_length = max_length
        self.out_dim = int(self.model.config.hidden_size)

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any], where: str) -> None:
        """The config check (nothing is built): ``config`` holds ``BertConfig`` fields only, since transformers
        keeps any other keyword as an attribute nothing reads; ``vocab_size``/``pad_token_id`` are the tokenizer's."""
        config = cfg.get("config")
        if config is None:
            return
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where}.config must be a dict of BertConfig fields, got {config!r}")
        fields = bert_config_names()
        for key in config:
            if key in FROM_TOKENIZER:
                raise ConfigError(f"{where}.config.{key}: set from the tokenizer's vocabulary; leave it out")
            if key not in fields:
                raise ConfigError(unknown_key_message(f"{where}.config.{key}", fields - set(FROM_TOKENIZER),
                                                      "BertConfig"))

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


# Fields that fix the shapes of a pretrained model's weights: ``config`` may not change them.
ARCHITECTURE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "vocab_size", "type_vocab_size")


def pretrained_config(pretrained: str, overrides: dict[str, Any], local: bool) -> Any:
    """The pretrained model's config with ``overrides`` applied (dropout rates and the like take effect); an
    override of a field the weights' shapes depend on, or of a field the config does not have, is refused."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(pretrained, local_files_only=local)
    for key, value in overrides.items():
        if not hasattr(model_config, key):
            raise ConfigError(f"text_encoder.config.{key}: {type(model_config).__name__} of {pretrained} has no such "
                              "field")
        if key in ARCHITECTURE_FIELDS and getattr(model_config, key) != value:
            raise ConfigError(
                f"text_encoder.config.{key}={value!r} conflicts with the pretrained model {pretrained} "
                f"({key}={getattr(model_config, key)!r}): its weights fix it. Remove it (e.g. --cfg-options "
                "model.text_encoder.config=None) to use the pretrained architecture."
            )
        setattr(model_config, key, value)
    return model_config


def check_vocabulary(tokenizer: Any, tokenizer_path: str, model: nn.Module, pretrained: str) -> None:
    """The token ids ``tokenizer`` produces must be the rows of ``model``'s embedding table they were trained as:
    no id beyond the table, the special tokens at the ids the model's config declares, and, where the pretrained
    folder has a tokenizer of its own and another one is given, the same vocabulary. A from-scratch WordPiece
    vocabulary fed to a pretrained BERT runs without any error, on meaningless embeddings; this refuses it."""
    rows = model.get_input_embeddings().num_embeddings
    size = len(tokenizer)
    problems = []
    if size > rows:
        problems.append(f"the tokenizer has {size} tokens but the model's embedding table only {rows} rows")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        declared = getattr(model.config, name, None)
        ours = getattr(tokenizer, name, None)
        if declared is not None and ours is not None and declared != ours:
            problems.append(f"{name} is {ours} in the tokenizer but {declared} in the model's config")
    if str(tokenizer_path) != str(pretrained) and os.path.isdir(str(pretrained)) and any(
            os.path.isfile(os.path.join(pretrained, name)) for name in ("tokenizer.json", "vocab.txt")):
        own = load_tokenizer(pretrained)
        if own.get_vocab() != tokenizer.get_vocab():
            ids = {token: (tokenizer.convert_tokens_to_ids(token), own.convert_tokens_to_ids(token))
                   for token in (own.cls_token, own.sep_token, own.pad_token, own.unk_token) if token is not None}
            mismatched = [f"{token} = {a} vs {b}" for token, (a, b) in ids.items() if a != b]
            problems.append(f"its vocabulary ({size} tokens) is not the pretrained model's own ({len(own)} tokens"
                            + (f"; {', '.join(mismatched)}" if mismatched else "") + ")")
    if problems:
        raise ConfigError(
            f"text_encoder.tokenizer {tokenizer_path} does not match text_encoder.pretrained {pretrained}: "
            f"{'; '.join(problems)}. Leave text_encoder.tokenizer unset to use the pretrained model's own tokenizer."
        )
