"""Image-text contrastive losses, one code path for one process and for many: CLIP's InfoNCE (with optional soft
targets, as the label-aware head uses) and SigLIP's pairwise sigmoid loss.

As open_clip's ``ClipLoss(local_loss, gather_with_grad, rank, world_size)``, where this process sits is explicit
arguments, not globals: with ``world_size > 1`` each rank's embeddings are all-gathered
(:func:`mmvl.ops.gather.all_gather_rows`, ranks may hold different batch sizes) so the negatives span every rank;
``world_size == 1`` is the same computation on a "gathered" batch that is the local one. In one process the
results equal open_clip's ``ClipLoss`` and ``SigLipLoss`` bitwise (tests/models/test_losses.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmvl.ops.gather import all_gather_rows


class GatheredLoss(nn.Module):
    """What both losses share: ``rank``/``world_size`` and the gather of every rank's rows."""

    def __init__(self, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.gather_with_grad = gather_with_grad
        self.set_world(rank, world_size)

    def set_world(self, rank: int, world_size: int) -> None:
        """Where this process sits among ``world_size`` processes (the trainer sets it through the model)."""
        self.rank, self.world_size = int(rank), int(world_size)

    def gather(self, rows: torch.Tensor, with_grad: bool | None = None) -> tuple[torch.Tensor, int]:
        """Every rank's rows in rank order and the index of this rank's first one; ``(rows, 0)`` in one process.
        ``with_grad`` (default ``gather_with_grad``): other ranks' rows carry their gradient back to them."""
        if self.world_size == 1:
            return rows, 0
        return all_gather_rows(rows, with_grad=self.gather_with_grad if with_grad is None else with_grad)


class GatheringHead:
    """For heads whose ``loss_fn`` is a :class:`GatheredLoss`: the trainer places them among the training processes
    with ``set_world`` (with more than one, the loss gathers every rank's rows; validation runs with
    ``world_size=1`` on local batches), and ``rank``/``world_size`` read where they sit."""

    loss_fn: GatheredLoss

    def set_world(self, rank: int, world_size: int) -> None:
        self.loss_fn.set_world(rank, world_size)

    @property
    def rank(self) -> int:
        return self.loss_fn.rank

    @property
    def world_size(self) -> int:
        return self.loss_fn.world_size


class ClipLoss(GatheredLoss):
    """Symmetric InfoNCE (CLIP, Radford et al. 2021): ``(CE(t X Y^T, T) + CE(t Y X^T, T)) / 2`` for L2-normalised
    image and text embeddings ``X``, ``Y``, logit scale ``t`` and targets ``T`` (each row's own pair, or a soft
    target matrix).

    Across ranks the logits span the gathered batch; with ``local_loss`` each rank computes only its own rows'
    terms against every rank's columns (memory linear in the global batch; the same gradients once DDP averages
    them, and the mean of the ranks' losses is the global loss). ``gather_with_grad`` as open_clip.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__(gather_with_grad, rank, world_size)
        self.local_loss = local_loss

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(logits per image, logits per text, global index of their first row)``: the whole gathered batch, or
        with ``local_loss`` this rank's rows against every rank's columns. The products are open_clip's, in its
        order, so one process gives its numbers exactly."""
        if self.world_size == 1:
            all_image, all_text, first = image_emb, text_emb, 0
        else:  # one gather for both (one sync point and one backward all-reduce instead of two)
            both, first = self.gather(torch.cat([image_emb, text_emb], dim=1))
            all_image, all_text = both.split([image_emb.shape[1], text_emb.shape[1]], dim=1)
        if self.local_loss or self.world_size == 1:  # in one process its own rows are all the rows
            return scale * image_emb @ all_text.T, scale * text_emb @ all_image.T, first
        per_image = scale * all_image @ all_text.T
        return per_image, per_image.T, 0

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """The loss; ``targets``: None (each image's own report), or soft targets ``(N, N)`` over the gathered
        batch (rows sum to 1, symmetric: the same matrix serves images over texts and texts over images)."""
        per_image, per_text, first = self.logits(image_emb, text_emb, scale)
        rows = len(per_image)
        if targets is None:
            targets = torch.arange(first, first + rows, device=per_image.device)
        else:
            targets = targets[first:first + rows].to(per_image.dtype)
        return (F.cross_entropy(per_image, targets) + F.cross_entropy(per_text, targets)) / 2


class SigLipLoss(GatheredLoss):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023): ``-1/B sum_ij log sigmoid(z_ij (t x_i . y_j + b))`` with
    ``z_ij = 1`` for a matching pair and -1 otherwise, over this rank's ``B`` images and every rank's texts
    (gathered with gradients), normalised by ``B`` as open_clip's distributed SigLIP loss is."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__(gather_with_grad=True, rank=rank, world_size=world_size)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
                ) -> torch.Tensor:
        all_text, first = self.gather(text_emb)
        logits = scale * image_emb @ all_text.T + bias
        rows = torch.arange(len(image_emb), device=logits.device)
        signs = -torch.ones_like(logits)
        signs[rows, rows + first] = 1.0
        return -F.logsigmoid(signs * logits).sum() / len(image_emb)
