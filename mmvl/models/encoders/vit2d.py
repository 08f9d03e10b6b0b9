"""2D image encoders from timm (ViT, Swin) with a 1-channel stem for radiographs.

A 3-channel pretrained stem is adapted to ``in_chans=1`` by timm, which sums the RGB filters: the
1-channel model then gives exactly what the RGB model gives for the gray image copied to three channels
(averaging would scale the first activations by 1/3).
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput, drop_tokens, run_blocks, use_mmvl_attention
from mmvl.registry import ENCODERS


@ENCODERS.register("timm_vit", "vit2d")
class TimmImageEncoder(nn.Module):
    """Any timm backbone taking ``(B, C, H, W)``; returns the pooled pre-logits feature and the tokens.

    ``model_kwargs`` go to ``timm.create_model`` (``depth``, ``embed_dim``, ``patch_size``...).
    ``pretrained_path`` loads a local timm checkpoint (``.safetensors``/``.bin``) through timm's own
    pretrained machinery, which adapts a 3-channel stem to ``in_chans``; ``pretrained=True`` fetches
    the named weights from the hub (needs network access).
    """

    spatial_dims = 2
    config_knobs = {"img_size": "img_size"}  # filled from the config's img_size (mmvl.config.validate)

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        in_chans: int = 1,
        img_size: int | None = 224,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        grad_checkpointing: bool = False,
        token_drop: float = 0.0,
        attention: str = "mmvl",
        **model_kwargs: Any,
    ):
        super().__init__()
        import timm

        if not timm.is_model(model_name):
            raise ConfigError(f"timm has no model '{model_name}' (see timm.list_models('*vit*'))")
        kwargs: dict[str, Any] = dict(num_classes=0, in_chans=in_chans, **model_kwargs)
        if img_size is not None:
            kwargs["img_size"] = img_size
        if pretrained_path is not None:
            if not os.path.isfile(pretrained_path):
                raise ConfigError(f"image_encoder.pretrained_path: file not found: {pretrained_path}")
            pretrained = True
            kwargs["pretrained_cfg_overlay"] = dict(file=os.fspath(pretrained_path))
        self.model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        self.model.set_grad_checkpointing(grad_checkpointing)
        self.grad_checkpointing = grad_checkpointing
        self.patched_attention = use_mmvl_attention(self.model, attention, "image_encoder")
        self.model_name = model_name
        self.out_dim = int(self.model.num_features)
        self.is_vit = all(hasattr(self.model, name) for name in ("_pos_embed", "blocks", "num_prefix_tokens"))
        if token_drop and not self.is_vit:
            raise ConfigError(f"image_encoder.token_drop needs a ViT; '{model_name}' has no token sequence to drop")
        self.token_drop = float(token_drop)
        self.in_chans = in_chans
        if self.is_vit:  # the patch grid, for heads that work on patches (MAE)
            self.patch_size = tuple(self.model.patch_embed.patch_size)
            self.grid = tuple(self.model.patch_embed.grid_size)
            self.num_prefix_tokens = int(self.model.num_prefix_tokens)  # class/register tokens before the patches

    @classmethod
    def forwarded_kwargs(cls, cfg: Mapping[str, Any], where: str) -> set[str] | None:
        """The names ``model_kwargs`` may hold for ``cfg``, for the config check (nothing is built): the arguments
        of ``timm.create_model`` and of the model class in the timm module that defines ``model_name`` (the one
        class there taking ``num_classes``); ``None`` where that class is not one, or takes ``**kwargs`` itself."""
        import timm
        from timm.models import model_entrypoint

        model_name = cfg.get("model_name", inspect.signature(cls).parameters["model_name"].default)
        if not isinstance(model_name, str) or not timm.is_model(model_name):
            close = difflib.get_close_matches(str(model_name), timm.list_models(), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{where}.model_name: timm has no model {model_name!r}.{hint} "
                              "(see timm.list_models('*vit*'))")
        module = sys.modules[model_entrypoint(model_name).__module__]
        classes = [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, nn.Module)
                   and obj.__module__ == module.__name__ and "num_classes" in inspect.signature(obj).parameters]
        if len(classes) != 1:
            return None
        parameters = inspect.signature(classes[0]).parameters
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return None
        create = {n for n, p in inspect.signature(timm.create_model).parameters.items() if p.kind is not p.VAR_KEYWORD}
        return (set(parameters) | create) - {"model_name", "num_classes"}  # the encoder sets num_classes=0

    def forward(self, images: torch.Tensor, token_drop: float | None = None,
                hidden_states: bool = False) -> EncoderOutput:
        if images.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects (B, C, H, W) images, got shape {tuple(images.shape)}")
        ratio = self.token_drop if token_drop is None else token_drop
        if hidden_states and not self.is_vit:
            raise ValueError(f"{self.model_name}: hidden states are given by ViT encoders only")
        if not self.is_vit:
            features = self.model.forward_features(images)
            pooled = self.model.forward_head(features, pre_logits=True)
            tokens = features if features.ndim == 3 else features.flatten(1, 2)  # Swin gives NHWC maps
            return EncoderOutput(pooled=pooled, tokens=tokens)
        model = self.model  # timm's forward_features, with token dropping between embedding and blocks
        x = model._pos_embed(model.patch_embed(images))
        keep = None
        if ratio and (self.training or token_drop is not None):
            x, keep = drop_tokens(x, ratio, n_prefix=model.num_prefix_tokens)
        hidden = [] if hidden_states else None
        x = model.norm(run_blocks(model.blocks, model.norm_pre(x), self.grad_checkpointing, hidden))
        pooled = model.forward_head(x, pre_logits=True)
        return EncoderOutput(pooled=pooled, tokens=x, keep_index=keep, hidden_states=hidden)


@ENCODERS.register("timm_swin", "swin2d")
class TimmSwinEncoder(TimmImageEncoder):
    """Swin transformer from timm; same interface, Swin defaults."""

    def __init__(self, model_name: str = "swin_tiny_patch4_window7_224", **kwargs: Any):
        super().__init__(model_name=model_name, **kwargs)
