"""Contrastive heads: projections to a shared image-text space with CLIP's InfoNCE, SigLIP's sigmoid loss or
MedCLIP-style label-aware soft targets; the losses themselves, for one process and across ranks, are
:mod:`mmvl.models.losses`."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.models.losses import ClipLoss, GatheredLoss, GatheringHead, SigLipLoss
from mmvl.registry import HEADS


class JointEmbeddingHead(GatheringHead, nn.Module):
    """What every contrastive head shares: linear projections of the pooled image and text features to
    ``embed_dim``, L2-normalised, and a learnable logit scale ``exp(logit_scale)`` clamped to
    ``max_logit_scale`` inside ``scale()`` (so no trainer hook is needed).

    ``is_contrastive`` tells ``VisionLanguageModel.contrastive_head`` (and with it retrieval validation,
    ``encode_image``/``encode_text`` and zero-shot classification) to use ``project_image``,
    ``project_text`` and ``scale()`` of this head. Subclasses set ``loss_fn``, the loss that knows the ranks.
    """

    is_contrastive = True
    loss_fn: GatheredLoss

    def __init__(self, image_dim: int, text_dim: int | None, embed_dim: int, init_logit_scale: float,
                 max_logit_scale: float):
        super().__init__()
        if text_dim is None:
            raise ConfigError(f"model.heads: the '{type(self).__name__}' head needs a text encoder; "
                              "add model.text_encoder (e.g. dict(type='bert', ...))")
        if not 0 < init_logit_scale <= max_logit_scale:
            raise ConfigError(f"model.heads: init_logit_scale {init_logit_scale} must lie in "
                              f"(0, max_logit_scale={max_logit_scale}]")
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=image_dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text_dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.max_log_scale = math.log(max_logit_scale)
        self.embed_dim = embed_dim

    def project_image(self, image: EncoderOutput) -> torch.Tensor:
        return F.normalize(self.image_proj(image.pooled), dim=-1)

    def project_text(self, text: EncoderOutput) -> torch.Tensor:
        return F.normalize(self.text_proj(text.pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def embed(self, image: EncoderOutput, text: EncoderOutput | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both embeddings in float32 (the loss runs outside autocast precision)."""
        if text is None:
            raise ValueError(f"the '{type(self).__name__}' head needs a text encoder and tokenized reports in "
                             "the batch")
        return self.project_image(image).float(), self.project_text(text).float()

    def forward(self, image: EncoderOutput, text: EncoderOutput | None, batch: dict[str, Any]) -> dict[str, Any]:
        image_emb, text_emb = self.embed(image, text)
        return self.loss_from_embeddings(image_emb, text_emb, batch)

    def loss_from_embeddings(self, image_emb: torch.Tensor, text_emb: torch.Tensor, batch: dict[str, Any]
                             ) -> dict[str, Any]:
        """The loss (and logged values) of embeddings from :meth:`embed`: what gradient caching needs, as it
        computes the embeddings of a large batch in chunks, then the loss of the whole batch at once."""
        raise NotImplementedError

    @staticmethod
    @torch.no_grad()
    def retrieval_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Fraction of images whose own report is the most similar one in the (local) batch."""
        target = torch.arange(len(image_emb), device=image_emb.device)
        return (image_emb @ text_emb.T).argmax(-1).eq(target).float().mean()


@HEADS.register("clip", "contrastive")
class ContrastiveHead(JointEmbeddingHead):
    """Symmetric InfoNCE with a learnable temperature (CLIP, Radford et al. 2021), by
    :class:`~mmvl.models.losses.ClipLoss`.

    ``loss = (CE(t * X Y^T, I) + CE(t * Y X^T, I)) / 2`` for L2-normalised image and text embeddings ``X``,
    ``Y`` of a batch and ``t = scale()``. The scale starts at 1/0.07 and is clamped to ``max_logit_scale``
    (100 in CLIP).

    In a ``torchrun`` run the negatives come from every rank: embeddings are all-gathered with gradients
    (``gather_with_grad``, as open_clip), ranks may hold different batch sizes (after unreadable samples),
    and with ``local_loss`` each rank computes only its own rows' terms against all columns (less memory;
    the same gradients once DDP averages them). ``rank``/``world_size`` are set by the trainer.
    """

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
        super().__init__(image_dim, text_dim, embed_dim, init_logit_scale, max_logit_scale)
        self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                world_size=world_size)

    def loss_from_embeddings(self, image_emb: torch.Tensor, text_emb: torch.Tensor, batch: dict[str, Any]
                             ) -> dict[str, Any]:
        scale = self.scale()
        loss = self.loss_fn(image_emb, text_emb, scale)
        return {"loss": loss, "logit_scale": scale.detach(), "i2t_acc": self.retrieval_accuracy(image_emb, text_emb)}


@HEADS.register("siglip", "sigmoid")
class SigLipHead(JointEmbeddingHead):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023): :class:`~mmvl.models.losses.SigLipLoss`.

    ``loss = -1/B * sum_ij log sigmoid(z_ij * (t * x_i . y_j + b))`` with ``z_ij = 1`` for a matching pair
    and -1 otherwise, learnable ``t = exp(logit_scale)`` (starts at 10, clamped to ``max_logit_scale``) and
    learnable bias ``b`` (starts at -10, the paper's values: with B-1 negatives per row the positives are rare,
    so the loss starts near its prior instead of pushing every pair apart). No softmax over the batch:
    each pair is its own binary problem. In a ``torchrun`` run each rank scores its images against every
    rank's texts (gathered with gradients), normalised by its own image count, as open_clip's distributed
    SigLIP loss does.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        embed_dim: int = 512,
        init_logit_scale: float = 10.0,
        init_logit_bias: float = -10.0,
        max_logit_scale: float = 100.0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(image_dim, text_dim, embed_dim, init_logit_scale, max_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.loss_fn = SigLipLoss(rank=rank, world_size=world_size)

    def loss_from_embeddings(self, image_emb: torch.Tensor, text_emb: torch.Tensor, batch: dict[str, Any]
                             ) -> dict[str, Any]:
        scale = self.scale()
        loss = self.loss_fn(image_emb, text_emb, scale, self.logit_bias)
        return {"loss": loss, "logit_scale": scale.detach(), "logit_bias": self.logit_bias.detach(),
                "i2t_acc": self.retrieval_accuracy(image_emb, text_emb)}


def label_similarity(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of finding vectors, ``(B, B)``, and which rows carry labels, ``(B,)`` bool.

    ``labels`` is ``(B, L)`` with 1 (present), 0 (absent) and -1 (unknown). Row ``i``'s finding vector is
    ``v_i = [1(l_i == 1), n_i]``: its present findings plus a "no finding" entry ``n_i = 1`` when none is
    present (as MedCLIP's label set includes "No Finding"), so two normal studies match each other and
    not a study with findings. Unknown counts as not present. A row is labelled when at least one of its
    labels is known; pairs that involve an unlabelled row get similarity ``1(i == j)``.
    """
    known = labels >= 0
    labelled = known.any(dim=1)
    present = (labels == 1).float()
    no_finding = (present.sum(dim=1, keepdim=True) == 0).float()
    vectors = F.normalize(torch.cat([present, no_finding], dim=1), dim=1)
    similarity = vectors @ vectors.T
    both = labelled[:, None] & labelled[None, :]
    identity = torch.eye(len(labels), dtype=similarity.dtype, device=similarity.device)
    return torch.where(both, similarity, identity), labelled


def label_aware_targets(labels: torch.Tensor, soft_target_weight: float = 0.5,
                        label_temperature: float | None = None) -> torch.Tensor:
    """``(B, B)`` soft targets (rows sum to 1) for image ``i`` over texts ``j``; see :class:`LabelAwareContrastiveHead`.

    ``T = (1 - w) I + w N(S)`` on labelled rows and ``T_i = e_i`` on unlabelled ones, with ``S`` from
    :func:`label_similarity`, ``N(S)_ij = S_ij / sum_k S_ik`` or, with ``label_temperature`` ``tau``,
    ``N(S)_ij = softmax_j(S_ij / tau)``. ``S`` is symmetric, so the same matrix is the target of text ``j``
    over images ``i``.
    """
    similarity, labelled = label_similarity(labels.float())
    if label_temperature is None:
        normalised = similarity / similarity.sum(dim=1, keepdim=True)  # S_ii = 1 > 0: never divides by zero
    else:
        normalised = (similarity / label_temperature).softmax(dim=1)
    identity = torch.eye(len(labels), dtype=similarity.dtype, device=similarity.device)
    targets = (1.0 - soft_target_weight) * identity + soft_target_weight * normalised
    return torch.where(labelled[:, None], targets, identity)


@HEADS.register("clip_soft", "label_aware")
class LabelAwareContrastiveHead(ContrastiveHead):
    """InfoNCE whose targets come from label overlap, so studies sharing findings are not pushed apart
    (MedCLIP's semantic matching loss, Wang et al. 2022, "MedCLIP: Contrastive Learning from Unpaired Medical
    Images and Text", EMNLP).

    With ``batch["labels"]`` ``(B, L)`` (1 present, 0 absent, -1 unknown) and logits ``A = t * X Y^T``::

        v_i    = [1(l_i == 1), 1(no finding present in l_i)]         finding vector with a "no finding" entry
        S_ij   = v_i . v_j / (|v_i| |v_j|)                              if rows i and j both have a known label
               = 1(i == j)                                              otherwise
        N_ij   = S_ij / sum_k S_ik            (default)   or   softmax_j(S_ij / tau)   (label_temperature=tau)
        T_ij   = (1 - w) 1(i == j) + w N_ij   for a labelled row i;   T_ij = 1(i == j) for an unlabelled row
        loss   = 1/2 * [ -1/B sum_i sum_j T_ij log softmax_j(A_ij)  +  -1/B sum_j sum_i T_ji log softmax_i(A_ij) ]

    ``w = soft_target_weight`` mixes in the identity (w = 0 is plain InfoNCE; MedCLIP's own loss is w = 1,
    tau = 1). Identical label vectors get equal targets; studies with disjoint findings (and a normal study
    against an abnormal one) get none, i.e. stay negatives. A batch without ``labels``, rows whose labels are all
    unknown, and (with the default normalisation) batches whose label vectors are pairwise disjoint give exactly
    the CLIP loss. In a ``torchrun`` run the logits span every rank's batch (:class:`~mmvl.models.losses.ClipLoss`,
    with ``local_loss`` rows for this rank only) and the labels are all-gathered to match.
    """

    def __init__(self, image_dim: int, text_dim: int, soft_target_weight: float = 0.5,
                 label_temperature: float | None = None, **kwargs: Any):
        super().__init__(image_dim, text_dim, **kwargs)
        if not 0.0 <= soft_target_weight <= 1.0:
            raise ConfigError(f"model.heads: soft_target_weight must lie in [0, 1], got {soft_target_weight}")
        if label_temperature is not None and label_temperature <= 0:
            raise ConfigError(f"model.heads: label_temperature must be positive or None, got {label_temperature}")
        self.soft_target_weight = float(soft_target_weight)
        self.label_temperature = label_temperature

    def loss_from_embeddings(self, image_emb: torch.Tensor, text_emb: torch.Tensor, batch: dict[str, Any]
                             ) -> dict[str, Any]:
        labels = batch.get("labels")
        if labels is None:
            return super().loss_from_embeddings(image_emb, text_emb, batch)
        scale = self.scale()
        all_labels, _ = self.loss_fn.gather(labels.float(), with_grad=False)
        targets = label_aware_targets(all_labels, self.soft_target_weight, self.label_temperature)
        soft_mass = 1.0 - targets.diagonal().mean()  # target mass on other studies' reports
        loss = self.loss_fn(image_emb, text_emb, scale, targets)
        return {"loss": loss, "logit_scale": scale.detach(), "soft_target_mass": soft_mass,
                "i2t_acc": self.retrieval_accuracy(image_emb, text_emb)}
