"""Supervised classification heads on the pooled image feature: multi-label (one sigmoid per finding, BCE) and
multi-class (softmax, cross-entropy), for fine-tuning pretrained encoders on labelled studies.

Both read ``batch["labels"]`` ``(B, L)`` (1 present, 0 absent, -1 unknown), the manifest's labels in the
dataset's order; ``bind_labels(dataset_label_names)`` picks the head's ``label_names`` out of them. In eval mode
``forward`` also returns ``scores`` (probabilities), and ``evaluate(scores, targets)`` gives the validation
metrics (scikit-learn AUROC and F1, :mod:`mmvl.evaluation.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.registry import HEADS

IGNORE = -100  # cross-entropy's ignore_index: rows without exactly one class


class ClassificationHead(nn.Module):
    """LayerNorm on the pooled feature (timm's ``fc_norm``), dropout and a linear ``classifier`` (the
    ``output_layer`` that the ``lora`` mode trains), zero-initialised as in timm's fine-tuning (the first step
    starts from uniform scores)."""

    is_classifier = True

    def __init__(self, image_dim: int, n_outputs: int, label_names: Sequence[str], dropout: float = 0.0):
        super().__init__()
        if not label_names or any(not isinstance(name, str) for name in label_names):
            raise ConfigError(f"model.heads: label_names must be a non-empty list of label names, got {label_names!r}")
        if len(set(label_names)) != len(label_names):
            raise ConfigError(f"model.heads: label_names repeats a name: {list(label_names)}")
        self.label_names = list(label_names)
        self.norm = nn.LayerNorm(image_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(image_dim, n_outputs)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.register_buffer("label_index", torch.arange(len(label_names)), persistent=False)

    @property
    def output_layer(self) -> nn.Module:
        return self.classifier

    def bind_labels(self, dataset_label_names: Sequence[str]) -> None:
        """Where each of the head's labels sits among the dataset's (``batch["labels"]`` columns)."""
        dataset_label_names = list(dataset_label_names)
        missing = [name for name in self.label_names if name not in dataset_label_names]
        if missing:
            raise ConfigError(f"model.heads: label_names {missing} are not in the manifest's labels "
                              f"({', '.join(dataset_label_names) or 'none'})")
        index = torch.tensor([dataset_label_names.index(name) for name in self.label_names])
        self.label_index = index.to(self.label_index.device)

    def logits(self, image: EncoderOutput) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(image.pooled))).float()

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        if "labels" not in batch:
            raise ValueError(f"the '{type(self).__name__}' head needs labels in the batch (manifest 'labels')")
        return batch["labels"].index_select(1, self.label_index.to(batch["labels"].device))


@HEADS.register("multilabel_cls")
class MultiLabelClassificationHead(ClassificationHead):
    """One logit per label, binary cross-entropy over the known labels (unknown ones, -1, are left out).

    ``pos_weight``: one float, or one per label, multiplying the positives' loss (BCE's ``pos_weight``; e.g.
    negatives / positives per label for rare findings). Validation (``evaluate``): per-label AUROC and F1 at 0.5,
    and their macro means (``macro_auroc``: the best-checkpoint metric of the fine-tuning configs).
    """

    def __init__(self, image_dim: int, label_names: Sequence[str], text_dim: int | None = None,
                 pos_weight: float | Sequence[float] | None = None, dropout: float = 0.0):
        super().__init__(image_dim, len(label_names), label_names, dropout)
        weight = None
        if pos_weight is not None:
            weight = torch.as_tensor(pos_weight, dtype=torch.float32).flatten()
            if weight.numel() == 1:
                weight = weight.expand(len(self.label_names)).clone()
            if weight.numel() != len(self.label_names) or (weight <= 0).any():
                raise ConfigError(f"model.heads: pos_weight must be one positive number or one per label "
                                  f"({len(self.label_names)}), got {pos_weight!r}")
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, image: EncoderOutput, text: EncoderOutput | None, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.logits(image)
        targets = self.targets(batch)
        known = targets >= 0
        losses = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0), pos_weight=self.pos_weight,
                                                    reduction="none")
        loss = (losses * known).sum() / known.sum().clamp(min=1)
        out = {"loss": loss}
        if not self.training:
            out["scores"] = logits.sigmoid().detach()
        return out

    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        from mmvl.evaluation.metrics import classification_metrics

        result = classification_metrics(scores, targets, self.label_names, n_bootstrap=0)
        metrics = {}
        for name, entry in result["labels"].items():
            if "auroc" in entry:
                metrics[f"auroc/{name}"], metrics[f"f1/{name}"] = entry["auroc"], entry["f1"]
        for average in ("macro", "micro"):
            for metric in ("auroc", "f1"):
                value = result[average][metric]
                metrics[f"{average}_{metric}"] = float("nan") if value is None else value
        return metrics


@HEADS.register("multiclass_cls")
class MultiClassClassificationHead(ClassificationHead):
    """One of ``label_names`` per study, softmax cross-entropy.

    A row's class is its one positive label among ``label_names``; with ``background`` (e.g. ``"no finding"``),
    a row whose labels are all known and negative is that extra, last class. Rows with several positives, or
    unknown labels and no positive, have no class and are left out of the loss (``ignored`` logs their
    fraction). Validation: accuracy and macro one-vs-rest AUROC over the classes present.
    """

    def __init__(self, image_dim: int, label_names: Sequence[str], text_dim: int | None = None,
                 background: str | None = None, label_smoothing: float = 0.0, dropout: float = 0.0):
        classes = list(label_names) + ([background] if background else [])
        super().__init__(image_dim, len(classes), label_names, dropout)
        if len(classes) < 2:
            raise ConfigError("model.heads: multiclass_cls needs at least two classes (label_names, or one and "
                              "background=...)")
        self.class_names, self.background = classes, background
        self.label_smoothing = float(label_smoothing)

    def class_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` class index per row of the head's label columns ``(B, L)`` (:meth:`targets`), :data:`IGNORE`
        where the row has no single class."""
        positives = (labels == 1).sum(1)
        target = torch.where(positives == 1, (labels == 1).float().argmax(1), torch.full_like(positives, IGNORE))
        if self.background:
            negative = (labels == 0).all(1)
            target = torch.where(negative, torch.full_like(target, len(self.label_names)), target)
        return target

    def forward(self, image: EncoderOutput, text: EncoderOutput | None, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.logits(image)
        target = self.class_targets(self.targets(batch))
        valid = target != IGNORE
        if valid.any():
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=self.label_smoothing)
        else:
            loss = logits.sum() * 0.0
        out = {"loss": loss, "ignored": 1.0 - valid.float().mean()}
        if not self.training:
            out["scores"] = logits.softmax(-1).detach()
        return out

    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """``scores``: class probabilities ``(N, classes)``; ``targets``: the head's label columns ``(N, L)``."""
        from sklearn.metrics import roc_auc_score

        target = self.class_targets(torch.as_tensor(targets)).numpy()
        valid = target != IGNORE
        probabilities, target = scores[valid], target[valid]
        metrics = {"accuracy": float((probabilities.argmax(1) == target).mean()) if len(target) else float("nan")}
        aurocs = []
        for k, name in enumerate(self.class_names):
            positive = target == k
            if 0 < positive.sum() < len(target):
                metrics[f"auroc/{name}"] = float(roc_auc_score(positive, probabilities[:, k]))
                aurocs.append(metrics[f"auroc/{name}"])
        metrics["macro_auroc"] = float(np.mean(aurocs)) if aurocs else float("nan")
        return metrics


__all__ = ["ClassificationHead", "MultiClassClassificationHead", "MultiLabelClassificationHead"]
