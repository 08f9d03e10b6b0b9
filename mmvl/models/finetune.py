"""Fine-tuning modes of a model's image encoder (``model.mode``): which parameters train, LoRA adapters through
Hugging Face ``peft`` on the attention and MLP projections of the timm and MONAI towers and their merge into
plain weights, and the layer index of each encoder parameter for layer-wise learning-rate decay (BEiT, Bao et al.
2022; MAE's fine-tuning recipe, He et al. 2022).

``linear``: the encoders are frozen (and kept in eval mode: no dropout or DropPath in features that never
train), the heads train. ``full``: everything trains. ``lora``: LoRA adapters in the image encoder and each
head's output layer train (``output_layer``; heads without one stay frozen); ``lora+head``: the adapters and every
head parameter train. The base weights of the encoders never change in the LoRA modes (a text tower, where there
is one, is frozen in every mode but ``full``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmvl.errors import ConfigError

MODES = ("full", "linear", "lora", "lora+head")
# Leaf names of the projections LoRA adapts: timm Attention (qkv, proj) and Mlp (fc1, fc2), as in its ViT and Swin;
# MONAI SABlock (qkv, out_proj) and MLPBlock (linear1, linear2), as in its ViT and SwinUNETR's Swin.
LORA_TARGETS = ("qkv", "proj", "out_proj", "fc1", "fc2", "linear1", "linear2")
LORA_DEFAULTS: dict[str, Any] = dict(rank=8, alpha=16, dropout=0.0, targets=LORA_TARGETS)
# Modules of the encoder's transformer blocks (the patch embedding's own "proj" convolution is not one of them).
_BLOCK_PATTERN = re.compile(r"(^|\.)(blocks|layers\d*)\.")


def check_mode(mode: Any, lora: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The mode's LoRA settings (defaults filled), or None outside the LoRA modes; unknown modes and LoRA keys are
    refused naming the closest match."""
    import difflib

    if mode not in MODES:
        close = difflib.get_close_matches(str(mode), MODES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.mode={mode!r} is not one of {', '.join(map(repr, MODES))}.{hint}")
    if lora is not None and not mode.startswith("lora"):
        raise ConfigError(f"model.lora is set but model.mode={mode!r} trains no adapters; set model.mode='lora' or "
                          "'lora+head', or remove model.lora")
    if not mode.startswith("lora"):
        return None
    settings = dict(LORA_DEFAULTS)
    for key, value in (lora or {}).items():
        if key not in LORA_DEFAULTS:
            close = difflib.get_close_matches(str(key), LORA_DEFAULTS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key 'model.lora.{key}'.{hint} Known keys: {', '.join(LORA_DEFAULTS)}")
        settings[key] = value
    if int(settings["rank"]) < 1:
        raise ConfigError(f"model.lora.rank must be >= 1, got {settings['rank']!r}")
    settings["targets"] = tuple(settings["targets"])
    return settings


def lora_module_names(encoder: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules inside the encoder's transformer blocks whose own name is one of
    ``targets``."""
    names = [name for name, module in encoder.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets and _BLOCK_PATTERN.search(name)]
    if not names:
        raise ConfigError(f"model.lora.targets {tuple(targets)} match no linear layer in the transformer blocks of "
                          f"the image encoder ({type(encoder).__name__}); known projections: {', '.join(LORA_TARGETS)}")
    return names


def add_lora(encoder: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
             targets: Sequence[str] = LORA_TARGETS) -> list[str]:
    """Wrap the target projections of ``encoder`` in place with ``peft`` LoRA layers (``lora_A``/``lora_B``, B
    initialised to zero, so the encoder's output is unchanged until training moves it); returns the wrapped
    module names. peft freezes every non-adapter parameter of ``encoder``."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_module_names(encoder, targets)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=names,
                        bias="none")
    inject_adapter_in_model(config, encoder)
    return names


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter in ``module`` into its base weight (``W + B A * alpha / r``) and put the plain layer
    back in its place, in place; returns ``module``, whose state dict then has the names of the model without
    LoRA (for export). Outputs are those of the adapted model up to float rounding."""
    for name, layer in lora_layers(module):
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    if hasattr(module, "mode") and isinstance(module.mode, str) and module.mode.startswith("lora"):
        module.mode = "full"  # what remains is a plain model
    return module


def merged_model_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model config that rebuilds a model after :func:`merge_lora` (for export): no adapters (``mode="full"``,
    no ``lora``) and no ``init_from`` (the weights travel with it)."""
    cfg = {key: value for key, value in model_cfg.items() if key not in ("lora", "init_from")}
    if str(cfg.get("mode", "full")).startswith("lora"):
        cfg["mode"] = "full"
    return cfg


def apply_mode(model: nn.Module, mode: str, lora: Mapping[str, Any] | None) -> None:
    """Set which parameters of ``model`` (with ``image_encoder`` and ``heads``) train, adding LoRA adapters in the
    LoRA modes (:data:`MODES`)."""
    settings = check_mode(mode, lora)
    encoder = model.image_encoder
    if mode == "full":
        return
    text = getattr(model, "text_encoder", None)
    if text is not None:
        text.requires_grad_(False)
    if mode == "linear":
        encoder.requires_grad_(False)
        return
    add_lora(encoder, **settings)
    for param_name, param in encoder.named_parameters():
        param.requires_grad_("lora_" in param_name)
    for head in model.heads.values():
        if mode == "lora+head":
            head.requires_grad_(True)
            continue
        head.requires_grad_(False)
        output = getattr(head, "output_layer", None)
        if output is not None:
            output.requires_grad_(True)


def load_encoder_weights(encoder: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> int:
    """Load a plain encoder state dict (no LoRA) into ``encoder``, which may already carry adapters (its base
    weights then sit under ``<layer>.base_layer``); every base tensor must be there with its shape. Returns the
    number of tensors loaded."""
    own = encoder.state_dict()
    mapped = {}
    for key in own:
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        if plain not in state:
            raise ConfigError(f"model.init_from={source}: its image encoder has no '{plain}'; the configured "
                              "model.image_encoder differs from the one it was trained with (copy its image_encoder "
                              "settings)")
        if tuple(state[plain].shape) != tuple(own[key].shape):
            raise ConfigError(f"model.init_from={source}: '{plain}' is {tuple(state[plain].shape)} there, "
                              f"{tuple(own[key].shape)} in the configured model.image_encoder; make the two agree")
        mapped[key] = state[plain]
    unused = sorted(set(state) - {key.replace(".base_layer.", ".") for key in mapped})
    if unused:
        raise ConfigError(f"model.init_from={source}: {len(unused)} tensors of its image encoder have no place in the "
                          f"configured one (e.g. {unused[:3]}); make model.image_encoder match it")
    encoder.load_state_dict(mapped, strict=False)
    return len(mapped)


# -- layer-wise learning-rate decay ------------------------------------------------------------------------
def encoder_depth(encoder: nn.Module) -> int:
    """The number of transformer blocks of a timm or MONAI ViT/Swin encoder (layer ids run 0 = embeddings,
    1..depth = blocks, depth + 1 = what follows: final norm, heads)."""
    inner = _inner(encoder)
    if hasattr(inner, "blocks"):  # timm ViT, MONAI ViT
        return len(inner.blocks)
    if hasattr(inner, "layers"):  # timm Swin
        return sum(len(stage.blocks) for stage in inner.layers)
    stages = _monai_swin_stages(inner)
    if stages:
        return sum(len(stage.blocks) for stage in stages)
    raise ConfigError(f"optim.layer_decay: no transformer blocks found in {type(encoder).__name__}; layer decay "
                      "applies to ViT and Swin encoders")


def encoder_layer_id(encoder: nn.Module, name: str) -> int:
    """The layer id (see :func:`encoder_depth`) of the encoder parameter ``name`` (LoRA adapters share their
    block's id)."""
    inner_prefix = _inner_prefix(encoder)
    name = name[len(inner_prefix):] if inner_prefix and name.startswith(inner_prefix) else name
    inner = _inner(encoder)
    depth = encoder_depth(encoder)
    if re.match(r"(cls_token|reg_token|pos_embed|patch_embed|patch_embedding|absolute_pos_embed)", name):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:  # ViT
        return int(match.group(1)) + 1
    if hasattr(inner, "layers"):  # timm Swin: layers.<stage>.blocks.<b>; a stage's downsample opens it
        starts = _stage_starts([len(stage.blocks) for stage in inner.layers])
        match = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)", name)
        if match:
            stage = int(match.group(1))
            return starts[stage] + 1 + int(match.group(3)) if match.group(3) else starts[stage]
    stages = _monai_swin_stages(inner)
    if stages:  # MONAI Swin: layers<k>.0.blocks.<b>; a stage's downsample closes it
        starts = _stage_starts([len(stage.blocks) for stage in stages])
        match = re.match(r"layers(\d+)\.0\.(blocks\.(\d+)|downsample)", name)
        if match:
            stage = int(match.group(1)) - 1
            return starts[stage] + 1 + int(match.group(3)) if match.group(3) else starts[stage] + len(
                stages[stage].blocks)
    return depth + 1


def _stage_starts(sizes: Sequence[int]) -> list[int]:
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts


def _inner_prefix(encoder: nn.Module) -> str:
    for attribute in ("model", "vit", "swin"):
        if isinstance(getattr(encoder, attribute, None), nn.Module):
            return attribute + "."
    return ""


def _inner(encoder: nn.Module) -> nn.Module:
    prefix = _inner_prefix(encoder)
    return getattr(encoder, prefix[:-1]) if prefix else encoder


def _monai_swin_stages(inner: nn.Module) -> list[nn.Module]:
    return [getattr(inner, f"layers{k}")[0] for k in range(1, 9) if hasattr(inner, f"layers{k}")]


__all__ = ["LORA_DEFAULTS", "LORA_TARGETS", "MODES", "add_lora", "apply_mode", "check_mode", "encoder_depth",
           "encoder_layer_id", "load_encoder_weights", "lora_layers", "lora_module_names", "merge_lora",
           "merged_model_config"]
