"""open_clip towers: vision towers by open_clip model name, so open_clip configs and checkpoints plug into mmvl,
and open_clip's transformers text tower (a BERT-family encoder + open_clip's text projection), as open_clip
checkpoints imported into mmvl (:func:`mmvl.zoo.import_open_clip`) have it."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.models.encoders.bert_text import HFTextEncoder
from mmvl.registry import ENCODERS


@ENCODERS.register("open_clip", "open_clip_vision")
class OpenCLIPVisionEncoder(nn.Module):
    """The ``visual`` tower of ``open_clip.create_model(model_name, pretrained=...)``.

    ``model_name`` is any open_clip name (``ViT-B-16``, ``local-dir:/path``, ``hf-hub:org/repo``);
    ``pretrained`` a local checkpoint file (a full open_clip checkpoint: its text tower is discarded) or an
    open_clip tag when the hub is reachable. open_clip towers take RGB: a 1-channel input is copied to three
    channels (mind the pipeline's Normalize: open_clip models were trained with per-channel mean/std).
    ``pooled`` is the tower's projected embedding, ``tokens`` its final patch tokens.
    """

    spatial_dims = 2
    config_knobs = {"img_size": "img_size"}  # filled from the config's img_size (mmvl.config.validate)

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        in_chans: int = 1,
        img_size: int | None = None,
        token_drop: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        import open_clip

        schema = model_name.split(":", 1)[0] if ":" in model_name else None
        if schema is None and model_name not in open_clip.list_models():
            raise ConfigError(f"open_clip has no model '{model_name}' (see open_clip.list_models())")
        if pretrained and os.sep in pretrained and not os.path.isfile(pretrained):
            raise ConfigError(f"image_encoder.pretrained: file not found: {pretrained}")
        if in_chans not in (1, 3):
            raise ConfigError(f"image_encoder.in_chans must be 1 or 3 for open_clip towers, got {in_chans}")
        model = open_clip.create_model(model_name, pretrained=pretrained, force_image_size=img_size,
                                       force_patch_dropout=token_drop or None)
        self.visual = model.visual
        if hasattr(self.visual, "output_tokens"):
            self.visual.output_tokens = True
        if grad_checkpointing:
            self.visual.set_grad_checkpointing(True)
        self.model_name, self.in_chans = model_name, in_chans
        self.out_dim = int(model.visual.output_dim)
        self.image_size = tuple(getattr(self.visual, "image_size", ()) or ())

    def forward(self, images: torch.Tensor, token_drop: float | None = None) -> EncoderOutput:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} expects (B, {self.in_chans}, H, W), got {tuple(images.shape)}")
        if token_drop:
            raise ValueError("open_clip towers drop tokens through their own patch_dropout (token_drop at build)")
        if self.in_chans == 1:
            images = images.expand(-1, 3, -1, -1)
        out = self.visual(images)
        pooled, tokens = out if isinstance(out, tuple) else (out, out[:, None])
        return EncoderOutput(pooled=pooled, tokens=tokens)


@ENCODERS.register("open_clip_hf_text")
class ProjectedHFTextEncoder(HFTextEncoder):
    """A transformers text encoder followed by open_clip's text projection (``proj_type`` ``"linear"`` or
    ``"mlp"``: Linear-GELU-Linear without biases, hidden width ``(width + proj_dim) // 2``), so open_clip models
    with an MLP text head (BiomedCLIP) import exactly; ``pooled`` is the projected feature and the contrastive
    head's text projection is the identity."""

    def __init__(self, proj_type: str = "mlp", proj_dim: int = 512, **kwargs: Any):
        super().__init__(**kwargs)
        width = self.out_dim
        if proj_type == "linear":
            self.proj = nn.Linear(width, proj_dim, bias=False)
        elif proj_type == "mlp":
            hidden = (width + proj_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                      nn.Linear(hidden, proj_dim, bias=False))
        else:
            raise ConfigError(f"text_encoder.proj_type must be 'linear' or 'mlp', got {proj_type!r}")
        self.proj_type, self.out_dim = proj_type, int(proj_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        out = super().forward(input_ids, attention_mask)
        return EncoderOutput(pooled=self.proj(out.pooled), tokens=out.tokens, attention_mask=out.attention_mask)
