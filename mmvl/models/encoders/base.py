"""What every encoder returns: a pooled embedding and the token sequence (MAE and report heads need tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncoderOutput:
    pooled: torch.Tensor  # (B, D)
    tokens: torch.Tensor  # (B, N, D); image: patch (+prefix) tokens, text: last hidden states
    attention_mask: torch.Tensor | None = None  # (B, N) for text tokens
