"""Image-text retrieval Recall@K with paired rows (row i of the images matches row i of the texts).

With the report texts given, a candidate whose report equals the query's own (boilerplate such as "No acute
cardiopulmonary process.", or a duplicated report) counts as a hit: ranking such a twin first is not a miss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _normalised(text: str) -> str:
    """Whitespace and case do not make two reports different."""
    return " ".join(text.split()).casefold()


def same_report_mask(texts: Sequence[str]) -> torch.Tensor:
    """``(N, N)`` bool: entry ``[i, j]`` is True where report ``j`` equals report ``i`` (whitespace and case
    aside); the diagonal is always True."""
    codes: dict[str, int] = {}
    ids = torch.tensor([codes.setdefault(_normalised(text), len(codes)) for text in texts])
    return ids[:, None] == ids[None, :]


def _recall(similarity: torch.Tensor, ks: Sequence[int], hits: torch.Tensor | None = None) -> dict[int, float]:
    """Per query (row), the rank of its best-scoring hit among the candidates (columns) that are not hits.

    ``hits`` (``(N, N)`` bool, diagonal True) marks every candidate that counts as correct; None: only the paired
    one. Rank counts every non-hit candidate scoring at least as high as the best hit (ties count against the
    model), so a collapsed model with identical embeddings scores zero rather than perfect recall.
    """
    if hits is None:
        hits = torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    best_hit = similarity.masked_fill(~hits, float("-inf")).amax(dim=1, keepdim=True)
    rank = ((similarity >= best_hit) & ~hits).sum(dim=1)
    return {k: float((rank < k).float().mean()) for k in ks}


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    texts: Sequence[str] | None = None,
) -> dict:
    """``{"i2t_R@1": ..., "t2i_R@1": ..., ...}`` in [0, 1] for L2-normalised embeddings, one row per study.

    ``texts``: the N report texts of the rows. With them, image->text counts a retrieved report equal to the
    query's own as a hit, and text->image a retrieved image whose report equals the query text; without them
    only the paired row is a hit.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"paired embeddings expected, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if texts is not None and len(texts) != len(image_emb):
        raise ValueError(f"texts: {len(texts)} reports for {len(image_emb)} embedding rows; give one per row")
    similarity = image_emb.float() @ text_emb.float().T
    hits = None if texts is None else same_report_mask(texts).to(similarity.device)
    metrics = {f"i2t_R@{k}": v for k, v in _recall(similarity, ks, hits).items()}
    # The mask is symmetric: image j is a hit for text i exactly when report j equals report i.
    metrics.update({f"t2i_R@{k}": v for k, v in _recall(similarity.T, ks, hits).items()})
    return metrics
