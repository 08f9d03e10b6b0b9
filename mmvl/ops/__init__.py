"""Low-level ops shared by the models: one attention entry point (xformers / torch SDPA / math) and its patches."""

from __future__ import annotations

from mmvl.ops._attention import (
    BACKENDS,
    ENV_VAR,
    AttentionBackendError,
    attention,
    available_backends,
    current_backend,
    patch_attention,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "AttentionBackendError",
    "attention",
    "available_backends",
    "current_backend",
    "patch_attention",
]
