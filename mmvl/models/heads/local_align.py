"""Local image-text alignment in the manner of GLoRIA (Huang et al. 2021): every word of a report attends over an
image's patch tokens, and a contrastive loss over the batch's images and reports scores how well each word is
matched by the region it attended to. The same word-patch similarities give phrase heatmaps (``mmvl.grounding``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.models.losses import GatheredLoss, GatheringHead
from mmvl.registry import HEADS

AGGREGATIONS = ("sum", "mean")


def word_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: which tokens are words of the report. A BERT-family tokenizer writes
    ``[CLS] word pieces [SEP]`` and pads; the words are the attended positions less the first ([CLS]) and the last
    ([SEP]) attended one (left or right padding alike). Sub-word pieces count as words of their own."""
    attended = attention_mask.bool()
    positions = torch.arange(attended.shape[1], device=attended.device).expand_as(attended)
    first = attended.int().argmax(dim=1)  # the first attended position
    last = torch.where(attended, positions, -1).max(dim=1).values
    return attended & (positions != first[:, None]) & (positions != last[:, None])


def _all_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over every rank."""
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


@HEADS.register("local_align")
class LocalAlignmentHead(GatheringHead, nn.Module):
    """Word-to-patch attention with GLoRIA's local contrastive loss, on 2D and 3D ViT token grids.

    Patch tokens ``v_n`` (the image encoder's tokens less its class/register tokens; with a masked encoding, FLIP
    or MAE beside this head, the visible ones) and word tokens ``w_t`` (the text encoder's tokens less [CLS], [SEP]
    and padding, :func:`word_mask`) are projected to ``embed_dim`` and L2-normalised. For image ``i`` and report
    ``j``::

        s_tn  = w_t . v_n                                  cosine similarity of word t and patch n
        a_tn  = softmax_n(gamma1 * s_tn)                   where word t looks in image i
        c_t   = sum_n a_tn v_n                             the attended region feature of word t
        Z_ij  = log sum_t exp(gamma2 * cos(c_t, w_t))      ("sum"; "mean" subtracts log(number of words))
        loss  = 1/2 [CE(gamma3 Z, I) + CE(gamma3 Z^T, I)]  each image against every report, and back

    with GLoRIA's temperatures ``gamma1 = 4``, ``gamma2 = 5``, ``gamma3 = 10`` (fixed, as in the paper). The
    paper's attention is one softmax over regions, as here; its code (gloria/loss/gloria_loss.py, from
    AttnGAN) first takes a softmax over the words and uses raw, not L2-normalised, features. The two directions
    are averaged (GLoRIA adds them), so a ``loss_weight`` means the same as on the CLIP head. A report with no
    word tokens scores ``Z = 0`` against every image. The loss runs in float32 with autocast off: bf16 would round
    the attention logits.

    Across ranks (``set_world``, as the CLIP head): each rank all-gathers the projected word tokens and their mask
    (with gradients; padded to the longest report of any rank), scores its own images against every report,
    ``Z[own images, all reports]``, and all-gathers those rows (with gradients) into the global ``Z``: every rank
    then has the loss of the global batch, as the CLIP head without ``local_loss``, and the gradients are those
    of one process once DDP averages them. Patch tokens never leave their rank.

    Memory: the gathered words take ``4 B_global T E`` bytes (float32, T the longest report of any rank, at most
    ``text_encoder.max_length``). Scoring ``C`` images against every report makes the pair tensors ``s``, ``a``
    (``C x B_global x T x N``) and ``c`` (``C x B_global x T x E``), about ``4 C B_global T (2N + 3E)`` bytes;
    ``image_chunk`` (default 16) bounds ``C``: a rank with more images scores them in chunks whose intermediates
    are recomputed in backward, so between forward and backward only ``Z`` is kept and the peak is a few times one
    chunk's (~4 GB for 16 images against 256 reports of 128 tokens, N = 196 patches, E = 512), at the price of
    running the head's forward twice. ``image_chunk=None`` scores all images at once and keeps everything.

    **Heatmaps**: :meth:`patch_similarity` is what ``mmvl.grounding`` calls on a model with this head
    (``mmvl.evaluation.grounding.PATCH_SIMILARITY``): ``(image, text) -> (B, P, N)``, the similarity of each of
    ``N`` patches of ``B`` images with each of ``P`` texts (phrases, prompts), the mean over a text's words of
    ``s_tn``. :meth:`word_patch_similarity` gives ``s_tn`` itself, word by word, ``(B, T, N)``. ``N`` runs over
    ``grid`` in row-major order (the encoder's token order), so ``.reshape(..., *head.grid)`` is the map on the
    patch grid; the attention ``a`` is ``softmax(gamma1 * s)`` over ``N``.
    """

    needs_image_encoder = True

    def __init__(
        self,
        image_dim: int,
        text_dim: int | None,
        image_encoder: nn.Module | None = None,
        embed_dim: int = 512,
        gamma1: float = 4.0,
        gamma2: float = 5.0,
        gamma3: float = 10.0,
        aggregation: str = "sum",
        image_chunk: int | None = 16,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if text_dim is None:
            raise ConfigError("model.heads: the 'local_align' head needs a text encoder; add model.text_encoder "
                              "(e.g. dict(type='bert', ...))")
        grid = getattr(image_encoder, "grid", None)
        if grid is None or not hasattr(image_encoder, "num_prefix_tokens"):
            raise ConfigError(
                f"model.heads: the 'local_align' head needs a ViT image encoder whose tokens are patches of a grid, "
                f"and {type(image_encoder).__name__} has none (Swin merges patches between stages); use "
                "image_encoder type='vit2d' or type='vit3d'")
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"model.heads: local_align.aggregation must be one of {AGGREGATIONS}, got "
                              f"{aggregation!r}")
        if image_chunk is not None and (not isinstance(image_chunk, int) or image_chunk < 1):
            raise ConfigError(f"model.heads: local_align.image_chunk must be a positive integer or None, got "
                              f"{image_chunk!r}")
        for name, value in (("gamma1", gamma1), ("gamma2", gamma2), ("gamma3", gamma3)):
            if not value > 0:
                raise ConfigError(f"model.heads: local_align.{name} must be positive, got {value}")
        self.grid = tuple(int(n) for n in grid)
        self.num_prefix_tokens = int(image_encoder.num_prefix_tokens)
        self.patch_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.word_proj = nn.Linear(text_dim, embed_dim, bias=False)
        nn.init.normal_(self.patch_proj.weight, std=image_dim**-0.5)
        nn.init.normal_(self.word_proj.weight, std=text_dim**-0.5)
        self.gamma1, self.gamma2, self.gamma3 = float(gamma1), float(gamma2), float(gamma3)
        self.aggregation = aggregation
        self.image_chunk = image_chunk
        self.embed_dim = embed_dim
        self.loss_fn = GatheredLoss(gather_with_grad=True, rank=rank, world_size=world_size)

    # -- embeddings ----------------------------------------------------------------------------------
    def embed_patches(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, embed_dim)`` L2-normalised float32 patch embeddings from the image encoder's tokens
        ``(B, num_prefix_tokens + N, image_dim)``."""
        return F.normalize(self.patch_proj(image_tokens[:, self.num_prefix_tokens:]).float(), dim=-1)

    def embed_words(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, embed_dim)`` L2-normalised float32 embeddings of every text token (select words with
        :func:`word_mask`)."""
        return F.normalize(self.word_proj(text_tokens).float(), dim=-1)

    # -- heatmaps ------------------------------------------------------------------------------------
    def word_patch_similarity(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
                              ) -> torch.Tensor:
        """Cosine similarity of every word with every patch, ``(B, T, N)`` float32 in [-1, 1].

        ``image_tokens``: the image encoder's ``EncoderOutput.tokens``, ``(B, num_prefix_tokens + N, image_dim)``
        as it returns them (unmasked); ``text_tokens``/``text_mask``: the text encoder's ``tokens`` and
        ``attention_mask``, ``(B, T, text_dim)``/``(B, T)`` (report ``b`` with image ``b``), or with a batch of 1 to
        score one text against every image. Rows of [CLS], [SEP] and padding are 0.
        """
        patches = self.embed_patches(image_tokens)
        words = self.embed_words(text_tokens)
        words = words.expand(len(patches), -1, -1) if len(words) == 1 else words
        mask = word_mask(text_mask).expand(len(words), -1)
        return torch.einsum("btd,bnd->btn", words, patches) * mask[..., None]

    def patch_similarity(self, image: EncoderOutput, text: EncoderOutput) -> torch.Tensor:
        """Similarity of each patch with each text, ``(B, P, N)`` float32 in [-1, 1]: for ``B`` images (the image
        encoder's output, unmasked) and ``P`` texts (the text encoder's output, ``attention_mask`` set), the mean
        over a text's words of :meth:`word_patch_similarity` (0 for a text without words)."""
        if text.attention_mask is None:
            raise ValueError("patch_similarity needs the text encoder's attention_mask (EncoderOutput.attention_mask)")
        patches = self.embed_patches(image.tokens)
        words = self.embed_words(text.tokens)
        mask = word_mask(text.attention_mask).to(words.dtype)
        total = torch.einsum("ptd,bnd,pt->bpn", words, patches, mask)
        return total / mask.sum(dim=1).clamp(min=1)[None, :, None]

    # -- loss ----------------------------------------------------------------------------------------
    def pair_scores(self, patches: torch.Tensor, words: torch.Tensor, words_mask: torch.Tensor) -> torch.Tensor:
        """``Z``, ``(B_images, B_reports)``: each image's patches ``(B_images, N, E)`` against each report's words
        ``(B_reports, T, E)`` (both L2-normalised) with ``words_mask`` ``(B_reports, T)``; see the class docstring."""
        similarity = torch.einsum("ind,jtd->ijtn", patches, words)
        attention = (self.gamma1 * similarity).softmax(dim=-1)
        region = torch.einsum("ijtn,ind->ijtd", attention, patches)
        # cos(c_t, w_t) with |w_t| = 1: (B_images, B_reports, T)
        relevance = torch.einsum("ijtd,jtd->ijt", region, words) / region.norm(dim=-1).clamp(min=1e-8)
        has_words = words_mask.any(dim=1)
        # a report without words: finite logits (no -inf everywhere, whose gradient is NaN), then Z = 0
        keep = words_mask | ~has_words[:, None]
        scores = torch.logsumexp((self.gamma2 * relevance).masked_fill(~keep, float("-inf")), dim=-1)
        if self.aggregation == "mean":
            scores = scores - words_mask.sum(dim=1).clamp(min=1).log()
        return scores.masked_fill(~has_words, 0.0)

    def image_rows(self, patches: torch.Tensor, words: torch.Tensor, words_mask: torch.Tensor) -> torch.Tensor:
        """:meth:`pair_scores` of ``image_chunk`` images at a time; with gradients, each chunk's intermediates are
        recomputed in backward (activation checkpointing), so only ``Z`` is kept between forward and backward."""
        if self.image_chunk is None or len(patches) <= self.image_chunk:
            return self.pair_scores(patches, words, words_mask)
        rows = []
        for chunk in patches.split(self.image_chunk):
            if torch.is_grad_enabled():
                rows.append(checkpoint(self.pair_scores, chunk, words, words_mask, use_reentrant=False))
            else:
                rows.append(self.pair_scores(chunk, words, words_mask))
        return torch.cat(rows)

    def gather_words(self, words: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every rank's word embeddings and masks, padded to the longest report of any rank, and the index of this
        rank's first report; the local ones in one process."""
        if self.world_size == 1:
            return words, mask, 0
        longest = _all_max(words.shape[1], words.device)
        pad = longest - words.shape[1]
        both = torch.cat([words, mask[..., None].to(words.dtype)], dim=-1)  # one gather for both
        gathered, first = self.loss_fn.gather(F.pad(both, (0, 0, 0, pad)))
        return gathered[..., :-1], gathered[..., -1] > 0.5, first

    def forward(self, image: EncoderOutput, text: EncoderOutput | None, batch: dict[str, Any]) -> dict[str, Any]:
        if text is None:
            raise ValueError("the 'local_align' head needs a text encoder and tokenized reports in the batch")
        attention_mask = text.attention_mask if text.attention_mask is not None else batch["attention_mask"]
        patches = self.embed_patches(image.tokens)
        words = self.embed_words(text.tokens)
        with torch.autocast(patches.device.type, enabled=False):
            all_words, all_mask, first = self.gather_words(words, word_mask(attention_mask))
            own_rows = self.image_rows(patches, all_words, all_mask)
            scores, _ = self.loss_fn.gather(own_rows)
            logits = self.gamma3 * scores
            targets = torch.arange(len(logits), device=logits.device)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        with torch.no_grad():
            own = torch.arange(first, first + len(own_rows), device=own_rows.device)
            accuracy = own_rows.argmax(dim=1).eq(own).float().mean()
        return {"loss": loss, "i2t_acc": accuracy, "words_per_report": all_mask.sum(dim=1).float().mean()}


