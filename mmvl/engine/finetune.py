"""The fine-tuning side of a training run: the image encoder's starting weights from ``model.init_from`` (a
training work dir, a checkpoint, or a model-zoo entry by folder or name, read by :mod:`mmvl.loading`), the
classification heads told where their labels sit in the dataset's label columns, and the optimizer's groups
split by encoder layer for layer-wise learning-rate decay and the encoder's learning-rate multiplier."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mmvl.errors import CheckpointError, ConfigError
from mmvl.models.finetune import encoder_depth, encoder_layer_id, load_encoder_weights
from mmvl.utils import get_logger

logger = get_logger(__name__)


def load_init_from(model: nn.Module, init_from: str | None) -> int:
    """Load the image encoder of ``init_from`` into ``model.image_encoder`` (before or after its LoRA adapters
    were added); returns the number of tensors loaded, 0 without ``init_from`` (random initialisation). The
    configured encoder must match the source's architecture: a difference is refused naming the tensor."""
    if not init_from:
        return 0
    from mmvl.loading import load_pretrained  # loading reads checkpoints and zoo entries; imported when used

    try:
        source = load_pretrained(str(init_from)).model
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        raise ConfigError(f"model.init_from={init_from!r}: {err}") from err
    encoder = getattr(source, "image_encoder", None)
    if encoder is None:
        raise ConfigError(f"model.init_from={init_from!r} has no image encoder")
    count = load_encoder_weights(model.image_encoder, encoder.state_dict(), str(init_from))
    logger.info("model.init_from: %d image-encoder tensors from %s", count, init_from)
    return count


def layer_scaled_groups(model: nn.Module, groups: list[dict[str, Any]], lr: float, layer_decay: float = 1.0,
                        encoder_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """Split the optimizer's named ``groups`` by encoder layer, each at ``lr x scale``: encoder parameters of layer
    ``i`` (0: embeddings, 1..depth: blocks, depth + 1: the final norm; :func:`mmvl.models.finetune.encoder_layer_id`)
    get ``encoder_lr_mult x layer_decay ** (depth + 1 - i)``, everything outside the encoder (heads) 1. Groups are
    named ``<group>/layer<i>`` (``<group>/heads``) and ordered by name and layer, the same for a given model and
    config (a resume relies on it). Unchanged (``1.0``, ``1.0``): ``groups`` as given."""
    for key, value in (("optim.layer_decay", layer_decay), ("optim.encoder_lr_mult", encoder_lr_mult)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1e3:
            raise ConfigError(f"{key} must be a number >= 0 (1.0: off), got {value!r}")
    if layer_decay == 1 and encoder_lr_mult == 1:
        return groups
    encoder = model.image_encoder
    depth = encoder_depth(encoder) if layer_decay != 1 else 0
    layer_of = {id(param): encoder_layer_id(encoder, name) if layer_decay != 1 else 0
                for name, param in encoder.named_parameters()}
    out = []
    for group in groups:
        by_layer: dict[int | None, list[nn.Parameter]] = {}
        for param in group["params"]:
            by_layer.setdefault(layer_of.get(id(param)), []).append(param)
        for layer in sorted(by_layer, key=lambda k: -1 if k is None else k):
            scale = 1.0 if layer is None else encoder_lr_mult * layer_decay ** (depth + 1 - layer)
            suffix = "heads" if layer is None else f"layer{layer}"
            out.append({**group, "name": f"{group.get('name', 'group')}/{suffix}", "params": by_layer[layer],
                        "lr": group.get("lr", lr) * scale, "lr_scale": scale})
    return out


def bind_labels(model: nn.Module, label_names: Sequence[str]) -> None:
    """Give every classification head the dataset's label order (the columns of ``batch["labels"]``)."""
    for head in model.heads.values():
        if getattr(head, "is_classifier", False):
            head.bind_labels(label_names)


def mask_labels(model_cfg: Mapping[str, Any]) -> list[str] | None:
    """The labels whose masks the data must carry: those of the model's segmentation head, if it has one."""
    heads = model_cfg.get("heads") or []
    for head in heads if isinstance(heads, list | tuple) else [heads]:
        if isinstance(head, Mapping) and head.get("type") == "segmentation":
            return list(head.get("label_names") or [])
    return None


def prepare_finetune(model: nn.Module, model_cfg: dict[str, Any], label_names: Sequence[str], resume: bool) -> None:
    """What a run does to a freshly built model before training: the ``init_from`` weights (a resume takes every
    weight from its checkpoint instead, so the source need not exist any more) and the heads' label columns."""
    if not resume:
        load_init_from(model, model_cfg.get("init_from"))
    bind_labels(model, label_names)


__all__ = ["bind_labels", "layer_scaled_groups", "load_init_from", "mask_labels", "prepare_finetune"]
