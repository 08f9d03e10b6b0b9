"""Image-text retrieval Recall@K with paired rows (row i of the images matches row i of the texts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _recall(similarity: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    correct = similarity.diagonal().unsqueeze(1)
    # Rank counts every other candidate scoring at least as high as the match (ties count against the
    # model), so a collapsed model with identical embeddings scores zero rather than perfect recall.
    rank = (similarity >= correct).sum(dim=1) - 1
    return {k: float((rank < k).float().mean()) for k in ks}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """``{"i2t_R@1": ..., "t2i_R@1": ..., ...}`` in [0, 1] for L2-normalised embeddings."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"paired embeddings expected, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    similarity = image_emb.float() @ text_emb.float().T
    metrics = {f"i2t_R@{k}": v for k, v in _recall(similarity, ks).items()}
    metrics.update({f"t2i_R@{k}": v for k, v in _recall(similarity.T, ks).items()})
    return metrics
