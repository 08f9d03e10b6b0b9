"""All-gather of per-rank embeddings with gradients, for contrastive losses whose negatives span every rank.

As open_clip's ``gather_features(gather_with_grad=True)``: the backward sums each slice's gradients from every
rank back to the rank that owns it. Written with plain ``all_gather`` and ``all_reduce`` (which gloo and NCCL
both have; ``torch.distributed.nn.all_gather``'s backward aborts on gloo in torch 2.13), and ranks may hold
different numbers of rows: a batch that lost unreadable samples is smaller than the others, while a plain
all_gather needs equal shapes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_rows(tensor: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """``(rows of every rank concatenated in rank order, index of this rank's first row)``.

    ``with_grad=False`` gathers the other ranks' rows as constants and keeps this rank's own rows (and their
    gradient) in place, like open_clip with ``gather_with_grad=False``.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    sizes = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(size) for size in all_sizes]
    largest = max(counts)
    padded = tensor
    if tensor.shape[0] < largest:
        padded = torch.cat([tensor, tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))])
    if with_grad:
        parts = list(_AllGather.apply(padded.contiguous()))
    else:
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded.detach().contiguous())
        parts[rank] = padded
    gathered = torch.cat([part[:count] for part, count in zip(parts, counts)])
    return gathered, sum(counts[:rank])


class _AllGather(torch.autograd.Function):
    """Equal-shaped all_gather whose backward all-reduces (sums) the gradient of every slice and keeps this
    rank's own: the gradient of every rank's loss with respect to this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([g if g is not None else torch.zeros_like(grads[0]) for g in grads]).contiguous()
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]
