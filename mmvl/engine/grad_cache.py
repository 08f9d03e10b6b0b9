"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
a contrastive batch larger than the encoders' activation memory allows, with the gradients of the plain step."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from mmvl.errors import ConfigError


def check_grad_cache(model: nn.Module, chunks: int, distributed: bool, strategy: str) -> None:
    if not chunks:
        return
    heads = list(model.heads.values())
    if len(heads) != 1 or not getattr(heads[0], "is_contrastive", False) or model.mask_ratio \
            or model.text_encoder is None:
        raise ConfigError("train.grad_cache_chunks needs a model with one contrastive head (clip, siglip, "
                          "clip_soft) and a text encoder, without masking; set it to 0")
    if distributed and strategy != "ddp":
        raise ConfigError("train.grad_cache_chunks works with train.strategy='ddp' only")


def grad_cache_step(model: nn.Module, batch: dict[str, Any], chunks: int,
                    autocast: Callable[[], AbstractContextManager],
                    backward: Callable[[torch.Tensor], None]) -> dict[str, Any]:
    """Forward and backward of one micro-batch: (1) embeddings of each chunk without autograd graphs, (2) the loss
    of the whole batch and its gradient with respect to the embeddings (``backward(loss)`` scales and
    back-propagates it), (3) each chunk again with its graph, back-propagating those gradients. The RNG state of
    each chunk is replayed in (3), so dropout draws the same masks: the gradients are those of the plain step."""
    (name, head), = model.heads.items()
    device = batch["image"].device
    parts = torch.arange(len(batch["image"]), device=device).chunk(chunks)
    devices = [device] if device.type == "cuda" else []

    def embed(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast():
            image = model.image_encoder(batch["image"][rows])
            text = model.text_encoder(batch["input_ids"][rows], batch["attention_mask"][rows])
            return head.embed(image, text)

    states, images, texts = [], [], []
    with torch.no_grad():
        for rows in parts:
            states.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]))
            image_emb, text_emb = embed(rows)
            images.append(image_emb)
            texts.append(text_emb)
    image_all = torch.cat(images).requires_grad_()
    text_all = torch.cat(texts).requires_grad_()
    out = head.loss_from_embeddings(image_all, text_all, batch)
    loss = model.loss_weights[name] * out["loss"]
    backward(loss)
    for rows, (cpu_state, cuda_states) in zip(parts, states):
        torch.set_rng_state(cpu_state)
        for cuda_device, state in zip(devices, cuda_states):
            torch.cuda.set_rng_state(state, cuda_device)
        image_emb, text_emb = embed(rows)
        torch.autograd.backward([image_emb, text_emb], [image_all.grad[rows], text_all.grad[rows]])
    return {"loss": loss, **{f"{name}/{key}": value for key, value in out.items()}}
