"""What every encoder returns, and the token dropping that ViT encoders share (FLIP, MAE)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from mmvl.errors import ConfigError
from mmvl.ops import patch_attention
from mmvl.utils import get_logger


@dataclass
class EncoderOutput:
    pooled: torch.Tensor  # (B, D)
    tokens: torch.Tensor  # (B, N, D); image: patch (+prefix) tokens, text: last hidden states
    attention_mask: torch.Tensor | None = None  # (B, N) for text tokens
    keep_index: torch.Tensor | None = None  # (B, N_kept): which patch tokens survived token dropping
    # forward(..., hidden_states=True): every block's output (ViT: (B, N, D) before the final norm; Swin: the
    # patch embedding's and each stage's (B, C, *grid) maps), for dense heads (segmentation decoders)
    hidden_states: list[torch.Tensor] | None = None


def drop_tokens(tokens: torch.Tensor, ratio: float, n_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a random ``1 - ratio`` of the patch tokens of each sample (FLIP / MAE random masking).

    ``tokens``: ``(B, n_prefix + N, D)``; prefix tokens (class, registers) are always kept. Returns the
    kept tokens ``(B, n_prefix + K, D)`` and the kept patch indices ``(B, K)`` in ascending order, drawn
    from torch's global RNG (so seeding and checkpointed RNG state make it reproducible).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"token drop ratio must be in [0, 1), got {ratio}")
    batch, total, dim = tokens.shape
    n_patches = total - n_prefix
    n_keep = max(1, round(n_patches * (1.0 - ratio)))
    noise = torch.rand(batch, n_patches, device=tokens.device)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    patches = tokens[:, n_prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, dim))
    return torch.cat([tokens[:, :n_prefix], patches], dim=1), keep


def run_blocks(blocks: nn.Module, x: torch.Tensor, checkpointing: bool,
               outputs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Apply a sequence of transformer blocks, recomputing activations in backward when ``checkpointing``;
    ``outputs``, when given, receives every block's output."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
        if outputs is not None:
            outputs.append(x)
    return x


STRIPPED_PREFIXES = ("module.", "model.", "swinViT.", "vit.", "encoder.")


def load_weights_file(module: nn.Module, path: str, what: str) -> None:
    """Load a local ``.safetensors`` or ``.pt``/``.pth``/``.bin`` state dict into ``module``.

    ``{"state_dict": ...}``/``{"model": ...}`` wrappers and common key prefixes (``module.`` from DDP,
    ``swinViT.``/``vit.`` from MONAI's SwinUNETR/UNETR checkpoints) are removed. Missing or unexpected keys
    are logged; a file whose keys match nothing, or whose shapes differ, is an error naming the file.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{what}.pretrained_path: file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = module.state_dict()
    cleaned = {}
    for key, value in state.items():
        for prefix in ("", *STRIPPED_PREFIXES):
            if key.startswith(prefix) and key[len(prefix):] in own:
                cleaned[key[len(prefix):]] = value
                break
    if not cleaned:
        raise ConfigError(f"{path}: no parameter names match {what} (first keys: {list(state)[:3]})")
    wrong = [k for k, v in cleaned.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ConfigError(f"{path}: shapes differ from {what} for {wrong[:3]} (e.g. {tuple(cleaned[wrong[0]].shape)} "
                          f"vs {tuple(own[wrong[0]].shape)}); check img_size/patch_size/hidden_size")
    result = module.load_state_dict(cleaned, strict=False)
    logger = get_logger(__name__)
    logger.info("%s: loaded %d tensors from %s", what, len(cleaned), path)
    if result.missing_keys:
        logger.warning("%s: %d parameters not in %s (left as initialised): %s", what, len(result.missing_keys),
                       path, result.missing_keys[:5])


def use_mmvl_attention(module: nn.Module, attention: str, what: str) -> int:
    """``attention="mmvl"``: route the timm/MONAI attention modules inside ``module`` through
    :func:`mmvl.ops.attention` (xformers on GPU when installed, else torch SDPA); ``"native"``: leave them."""
    if attention not in ("mmvl", "native"):
        raise ConfigError(f"{what}.attention must be 'mmvl' or 'native', got {attention!r}")
    if attention == "native":
        return 0
    return patch_attention(module)
