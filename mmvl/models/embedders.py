"""A model's towers without its training heads, giving the embeddings the full model gives: ``EncoderModel`` (the
image and/or text encoder with the contrastive projection, what a partial zoo entry holds) and ``ImageEmbedder``
(``encode_image`` as one module with a tensor output, the form TorchScript, ONNX and MONAI bundles take)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmvl.errors import ConfigError
from mmvl.registry import ENCODERS


def contrastive_head(model: nn.Module) -> nn.Module | None:
    """The head that defines the model's shared image-text space (``model.contrastive_head``), or None."""
    try:
        return model.contrastive_head
    except (ConfigError, AttributeError):
        return None


def image_projection(model: nn.Module) -> nn.Linear | None:
    head = contrastive_head(model)
    return None if head is None else head.image_proj


def text_projection(model: nn.Module) -> nn.Linear | None:
    head = contrastive_head(model)
    return None if head is None else head.text_proj


class EncoderModel(nn.Module):
    """The towers of a partial entry (``--parts image`` or ``--parts text``): an image and/or a text encoder with
    the contrastive head's projection to the shared space, if the model had one.

    ``encode_image``/``encode_text`` give what the full model gives: L2-normalised projected embeddings (the
    normalised pooled feature when there is no projection).
    """

    def __init__(self, image_encoder: Mapping[str, Any] | None = None, text_encoder: Mapping[str, Any] | None = None,
                 embed_dim: int | None = None, max_logit_scale: float = 100.0):
        super().__init__()
        if not image_encoder and not text_encoder:
            raise ConfigError("an encoder entry needs an image_encoder or a text_encoder")
        self.image_encoder = ENCODERS.build(image_encoder) if image_encoder else None
        self.text_encoder = ENCODERS.build(text_encoder) if text_encoder else None
        self.image_proj = (nn.Linear(self.image_encoder.out_dim, embed_dim, bias=False)
                           if embed_dim and self.image_encoder is not None else None)
        self.text_proj = (nn.Linear(self.text_encoder.out_dim, embed_dim, bias=False)
                          if embed_dim and self.text_encoder is not None else None)
        self.logit_scale = nn.Parameter(torch.zeros(())) if embed_dim else None
        self.embed_dim = embed_dim
        self.max_log_scale = float(torch.tensor(max_logit_scale).log())

    @property
    def tokenizer(self) -> Any:
        return None if self.text_encoder is None else self.text_encoder.tokenizer

    @property
    def max_length(self) -> int:
        return getattr(self.text_encoder, "max_length", 128)

    @property
    def contrastive_head(self) -> EncoderModel:
        if self.logit_scale is None:
            raise ConfigError("this entry has no contrastive projection, so no shared image-text embedding")
        return self

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_encoder is None:
            raise ConfigError("this zoo entry holds the text encoder only (exported with --parts text)")
        pooled = self.image_encoder(images).pooled
        return F.normalize(self.image_proj(pooled) if self.image_proj is not None else pooled, dim=-1)

    def encode_text(self, texts: Sequence[str] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.text_encoder is None:
            raise ConfigError("this zoo entry holds the image encoder only (exported with --parts image)")
        device = next(self.parameters()).device
        tokens = self.text_encoder.tokenize(texts, device) if not isinstance(texts, Mapping) else texts
        pooled = self.text_encoder(tokens["input_ids"], tokens["attention_mask"]).pooled
        return F.normalize(self.text_proj(pooled) if self.text_proj is not None else pooled, dim=-1)


class ImageEmbedder(nn.Module):
    """Image encoder + projection + L2 normalisation as one module with a tensor output: ``encode_image`` of the
    model, in the form TorchScript, ONNX and MONAI bundles take (``forward(images) -> (B, D)``).

    ``image_encoder``: an encoder config dict (``type=...``) or a built encoder; ``embed_dim``: the projection's
    output size, or None for the normalised pooled feature.
    """

    def __init__(self, image_encoder: Mapping[str, Any] | nn.Module, embed_dim: int | None = None):
        super().__init__()
        self.image_encoder = ENCODERS.build(image_encoder) if isinstance(image_encoder, Mapping) else image_encoder
        self.image_proj = nn.Linear(self.image_encoder.out_dim, embed_dim, bias=False) if embed_dim else None

    @classmethod
    def from_model(cls, model: nn.Module) -> ImageEmbedder:
        """Sharing the modules of a loaded model (no copy)."""
        embedder = cls(model.image_encoder)
        projection = image_projection(model)
        if projection is not None:
            embedder.image_proj = projection
        return embedder.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.image_encoder(images).pooled
        return F.normalize(self.image_proj(pooled) if self.image_proj is not None else pooled, dim=-1)
