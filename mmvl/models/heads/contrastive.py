"""CLIP-style contrastive head: linear projections to a shared space and symmetric InfoNCE (open_clip ClipLoss)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmvl.models.encoders.base import EncoderOutput
from mmvl.registry import HEADS


@HEADS.register("clip", "contrastive")
class ContrastiveHead(nn.Module):
    """Projects pooled image/text features to ``embed_dim`` and applies open_clip's ``ClipLoss``.

    The loss is open_clip's own (it already handles ``local_loss`` and ``gather_with_grad`` for
    multi-GPU runs); the learnable temperature starts at 1/0.07 and is clamped to ``max_logit_scale``
    (100 in CLIP, Radford et al. 2021) inside the forward pass, so no trainer hook is needed.
    """

    is_contrastive = True

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        embed_dim: int = 512,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        from open_clip.loss import ClipLoss

        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=image_dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text_dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.max_log_scale = math.log(max_logit_scale)
        self.embed_dim = embed_dim
        self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                                rank=rank, world_size=world_size)

    def project_image(self, image: EncoderOutput) -> torch.Tensor:
        return F.normalize(self.image_proj(image.pooled), dim=-1)

    def project_text(self, text: EncoderOutput) -> torch.Tensor:
        return F.normalize(self.text_proj(text.pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, image: EncoderOutput, text: EncoderOutput | None, batch: dict[str, Any]) -> dict[str, Any]:
        if text is None:
            raise ValueError("the contrastive head needs a text encoder and tokenized reports in the batch")
        image_emb = self.project_image(image).float()
        text_emb = self.project_text(text).float()
        scale = self.scale()
        loss = self.loss_fn(image_emb, text_emb, scale)
        with torch.no_grad():
            target = torch.arange(len(image_emb), device=image_emb.device)
            accuracy = (image_emb @ text_emb.T).argmax(-1).eq(target).float().mean()
        return {"loss": loss, "logit_scale": scale.detach(), "i2t_acc": accuracy}
