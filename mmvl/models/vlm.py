"""The vision-language model: an image encoder, an optional text encoder and weighted pretraining heads."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmvl.errors import ConfigError
from mmvl.models.finetune import apply_mode, check_mode
from mmvl.registry import ENCODERS, HEADS


class VisionLanguageModel(nn.Module):
    """Builds encoders and heads from config dicts; ``forward(batch)`` sums the heads' weighted losses.

    ``heads`` is a list of head configs; each may carry ``name`` (log prefix, default its type) and
    ``loss_weight`` (default 1.0). Heads receive both encoders' outputs and the batch.

    Head protocol (all optional beyond ``forward``): ``needs_image_encoder = True`` makes the head get
    ``image_encoder=`` at build (for its patch grid); a ``mask_ratio`` attribute > 0 makes the image
    encoder drop that fraction of patch tokens (the largest ratio among the heads wins: CLIP + MAE heads
    then share one masked encoding, as in FLIP/MedFLIP); ``tokenizer``/``max_length`` attributes provide
    the report tokenizer when there is no text encoder; ``needs_hidden_states = True`` makes the encoder
    return every block's output (``EncoderOutput.hidden_states``, for segmentation decoders);
    ``visualize(model, batch, path)`` writes a picture that the trainer asks for every ``train.vis_interval``
    steps; ``is_classifier = True`` heads return their ``scores`` in eval mode and ``evaluate(scores, targets)``
    scores a validation split; ``is_segmenter = True`` heads return ``dice_stats`` (voxel counts) in eval mode
    and ``evaluate(counts)`` gives the split's Dice.

    Fine-tuning (:mod:`mmvl.models.finetune`): ``mode`` says what trains (``full``, ``linear``, ``lora``,
    ``lora+head``), ``lora`` the adapters' rank, alpha, dropout and targets; ``init_from`` (a work dir or zoo entry)
    names where the image encoder's starting weights come from. The model is built with random weights and
    adapters, so a checkpoint of it loads without that source; the trainer loads ``init_from`` into a fresh run
    (:func:`mmvl.engine.finetune.load_init_from`).
    """

    def __init__(
        self,
        image_encoder: Mapping[str, Any],
        heads: Sequence[Mapping[str, Any]],
        text_encoder: Mapping[str, Any] | None = None,
        mode: str = "full",
        lora: Mapping[str, Any] | None = None,
        init_from: str | None = None,
    ):
        super().__init__()
        check_mode(mode, lora)  # before anything is built
        self.image_encoder = ENCODERS.build(image_encoder, where="model.image_encoder")
        self.text_encoder = ENCODERS.build(text_encoder, where="model.text_encoder") if text_encoder else None
        if isinstance(heads, Mapping):
            heads = [heads]
        if not heads:
            raise ConfigError("model.heads is empty: add at least one head, e.g. dict(type='clip', embed_dim=512)")
        self.heads = nn.ModuleDict()
        self.loss_weights: dict[str, float] = {}
        for index, head_cfg in enumerate(heads):
            head_cfg = copy.deepcopy(dict(head_cfg))
            name = head_cfg.pop("name", head_cfg.get("type"))
            if name in self.heads:
                raise ConfigError(f"model.heads: two heads named '{name}'; give them distinct 'name' values")
            self.loss_weights[name] = float(head_cfg.pop("loss_weight", 1.0))
            extra = {}
            if "type" in head_cfg and getattr(HEADS.get(head_cfg["type"]), "needs_image_encoder", False):
                extra["image_encoder"] = self.image_encoder
            self.heads[name] = HEADS.build(
                head_cfg,
                where=f"model.heads.{index}",
                image_dim=self.image_encoder.out_dim,
                text_dim=self.text_encoder.out_dim if self.text_encoder is not None else None,
                **extra,
            )
        self.mask_ratio = max(float(getattr(head, "mask_ratio", 0.0) or 0.0) for head in self.heads.values())
        # dense heads (segmentation) read every block's output, not only the last tokens
        self.needs_hidden_states = any(getattr(head, "needs_hidden_states", False) for head in self.heads.values())
        if self.needs_hidden_states and self.mask_ratio:
            raise ConfigError("model.heads: a segmentation head needs every patch token; it cannot share the encoder "
                              "with a masking head (mask_ratio > 0)")
        self.mode, self.init_from = mode, init_from
        apply_mode(self, mode, lora)

    def train(self, mode: bool = True) -> VisionLanguageModel:
        super().train(mode)
        if self.mode == "linear":  # frozen encoders give their eval-mode features (no dropout, no DropPath)
            for encoder in (self.image_encoder, self.text_encoder):
                if encoder is not None:
                    encoder.eval()
        return self

    def set_world(self, rank: int, world_size: int) -> None:
        """Tell heads whose loss spans ranks (contrastive) where this process sits; the trainer calls it."""
        for head in self.heads.values():
            if hasattr(head, "set_world"):
                head.set_world(rank, world_size)

    @property
    def world_size(self) -> int:
        return max((getattr(head, "world_size", 1) for head in self.heads.values()), default=1)

    @property
    def tokenizer(self) -> Any:
        """The report tokenizer: the text encoder's, else the first head's that has one."""
        if self.text_encoder is not None:
            return self.text_encoder.tokenizer
        return next((h.tokenizer for h in self.heads.values() if getattr(h, "tokenizer", None) is not None), None)

    @property
    def max_length(self) -> int:
        lengths = [getattr(m, "max_length", None) for m in (self.text_encoder, *self.heads.values())]
        return max((n for n in lengths if n), default=128)

    @property
    def contrastive_head(self) -> nn.Module:
        for head in self.heads.values():
            if getattr(head, "is_contrastive", False):
                return head
        raise ConfigError("this model has no contrastive head, so it has no shared image-text embedding")

    @property
    def report_head(self) -> nn.Module:
        for head in self.heads.values():
            if getattr(head, "generates_reports", False):
                return head
        raise ConfigError("this model has no report generation head (type='report_gen'); train one with "
                          "configs/cxr_report.py")

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.mask_ratio:
            image_out = self.image_encoder(batch["image"], token_drop=self.mask_ratio)
        elif self.needs_hidden_states:
            image_out = self.image_encoder(batch["image"], hidden_states=True)
        else:
            image_out = self.image_encoder(batch["image"])
        text_out = None
        if self.text_encoder is not None and "input_ids" in batch:
            text_out = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        outputs: dict[str, torch.Tensor] = {}
        total = None
        for name, head in self.heads.items():
            head_out = head(image_out, text_out, batch)
            weighted = self.loss_weights[name] * head_out["loss"]
            total = weighted if total is None else total + weighted
            for key, value in head_out.items():
                outputs[f"{name}/{key}"] = value
        outputs["loss"] = total
        return outputs

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings in the shared space, ``(B, embed_dim)``."""
        return self.contrastive_head.project_image(self.image_encoder(images))

    def encode_text(self, texts: Sequence[str] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised text embeddings for a list of strings (or already tokenized input)."""
        if self.text_encoder is None:
            raise ConfigError("this model has no text encoder")
        device = next(self.parameters()).device
        tokens = self.text_encoder.tokenize(texts, device) if not isinstance(texts, Mapping) else texts
        return self.contrastive_head.project_text(self.text_encoder(tokens["input_ids"], tokens["attention_mask"]))


def tokenizer_users(model_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The text encoder and head config dicts of a model config that carry a ``tokenizer`` (a folder, or a
    ``dict(type="wordpiece", ...)`` recipe the trainer turns into one)."""
    heads = model_cfg.get("heads") or []
    return [cfg for cfg in (model_cfg.get("text_encoder"), *(heads if isinstance(heads, list) else [heads]))
            if isinstance(cfg, dict) and cfg.get("tokenizer") is not None]


def build_model(cfg: Mapping[str, Any]) -> VisionLanguageModel:
    """Build the model from the config's ``model`` dict."""
    cfg = dict(cfg)
    cfg.pop("type", None)
    return VisionLanguageModel(**cfg)
