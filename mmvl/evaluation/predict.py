"""Running a fine-tuned classifier over scans: per-label probabilities and thresholded predictions for files,
folders and manifest rows (:func:`mmvl.predict`, ``tools/predict.py``), and the per-label thresholds chosen on
the training run's validation split that an exported classifier records (``config.json``'s ``classifier``).
Finding and reading the scans is :mod:`mmvl.data.inputs`, as for zero-shot."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mmvl.data.inputs import InputItem, iter_batches, row_items, rows_frame, scan_items, with_reader_options
from mmvl.data.manifest import load_manifest
from mmvl.errors import ConfigError
from mmvl.evaluation.metrics import choose_thresholds, target_matrix

MULTILABEL, MULTICLASS = "multilabel", "multiclass"


def classifier_head(model: nn.Module, source: str = "the model") -> tuple[str, nn.Module]:
    """``(name, head)`` of the model's one classification head (``multilabel_cls`` / ``multiclass_cls``)."""
    found = [(name, head) for name, head in getattr(model, "heads", {}).items()
             if getattr(head, "is_classifier", False)]
    if len(found) != 1:
        raise ConfigError(f"{source}: predict needs a model with one classification head (multilabel_cls or "
                          f"multiclass_cls; configs/finetune/), this one has {len(found)}; for a CLIP model use "
                          "mmvl.zero_shot")
    return found[0]


def task_of(head: nn.Module) -> str:
    return MULTICLASS if hasattr(head, "class_names") else MULTILABEL


def class_names(head: nn.Module) -> list[str]:
    """The output columns: the labels of a multi-label head, the classes (and background) of a multi-class one."""
    return list(getattr(head, "class_names", head.label_names))


@torch.no_grad()
def probabilities(model: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(B, outputs)`` float32 probabilities: a sigmoid per label (multi-label) or a softmax over the classes."""
    logits = head.logits(model.image_encoder(images))
    return logits.softmax(-1) if task_of(head) == MULTICLASS else logits.sigmoid()


def score_items(loaded: Any, items: Sequence[InputItem], batch_size: int = 32, progress: bool = True,
                desc: str = "predict") -> list[dict[str, Any]]:
    """One row per item (``path``, ``study_id``, ``view``, ``error``, ``scores``: the probabilities, None for an
    item that could not be read), in item order."""
    name, head = classifier_head(loaded.model, loaded.source)
    device = next(loaded.model.parameters()).device
    rows = []
    for batch in iter_batches(loaded.preprocess, items, batch_size, device, progress, desc=desc):
        if batch.images is not None:
            values = probabilities(loaded.model, head, batch.images).cpu().numpy()
            for index, scores in zip(batch.loaded, values):
                batch.rows[index]["scores"] = scores
        rows += [{**row, "scores": row.get("scores")} for row in batch.rows]
    return rows


def validation_thresholds(loaded: Any, batch_size: int = 32, progress: bool = False) -> dict[str, Any]:
    """The classifier record of a training work dir: task, output names and, for a multi-label head, the per-label
    threshold maximising F1 on the rows of its validation split (``data.val_split`` of ``data.manifest``, as
    :func:`mmvl.evaluation.metrics.choose_thresholds` chooses them for evaluation; 0.5 with the reason where a label
    has no positive validation row)."""
    name, head = classifier_head(loaded.model, loaded.source)
    record: dict[str, Any] = {"head": name, "task": task_of(head), "labels": class_names(head)}
    if record["task"] == MULTICLASS:
        return {**record, "thresholds": None, "threshold_source": "argmax"}
    data = loaded.config.get("data") or {}
    scores, labels = split_scores(loaded, data.get("val_split"), batch_size, progress)
    targets = target_matrix(labels, head.label_names) if scores is not None else None
    n_val = 0 if scores is None else len(scores)
    thresholds, sources = choose_thresholds(scores, targets, head.label_names)
    return {**record, "thresholds": [float(t) for t in thresholds], "threshold_source": sources,
            "n_val": n_val, "val_split": data.get("val_split")}


def split_scores(loaded: Any, split: str | None, batch_size: int = 32, progress: bool = False,
                 ) -> tuple[np.ndarray | None, list[dict[str, Any] | None]]:
    """``(scores (N, outputs), label dicts)`` of the images of the training manifest's ``split`` rows
    (``data.manifest`` of the model's training config) that could be read; ``(None, [])`` when there are none."""
    data = loaded.config.get("data") or {}
    items: list[InputItem] = []
    if data.get("manifest") and split:
        rows = load_manifest(data["manifest"], root=data.get("root"),
                             allow_outside_root=bool(data.get("allow_outside_root")))
        items = [item for row in rows if row.get("split") == split and not row.get("error")
                 for item in row_items(row)]
    scored = [(row["scores"], item.labels) for row, item in zip(
        score_items(loaded, items, batch_size, progress, split or "split") if items else [], items)
        if row["scores"] is not None]
    if not scored:
        return None, []
    return np.stack([scores for scores, _ in scored]), [labels for _, labels in scored]


def classifier_record(loaded: Any) -> dict[str, Any]:
    """What predictions need beyond the weights: recorded in a zoo entry's ``config.json`` (``classifier``),
    chosen on the validation split for a work dir or checkpoint (:func:`validation_thresholds`)."""
    return dict(loaded.config.get("classifier") or validation_thresholds(loaded))


def with_overrides(recorded: Mapping[str, float], overrides: Mapping[str, float] | None,
                   what: str) -> dict[str, float]:
    """The recorded per-label thresholds with ``overrides`` on top; an override for a label the model does not
    have is refused naming them."""
    unknown = sorted(set(overrides or {}) - set(recorded))
    if unknown:
        raise ConfigError(f"predict: thresholds for {unknown}, which are not labels of this {what} "
                          f"({', '.join(recorded) or 'none'})")
    return {**recorded, **{label: float(value) for label, value in (overrides or {}).items()}}


def predict_scans(
    loaded: Any,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike | None = (),
    manifest: str | os.PathLike | None = None,
    batch_size: int = 32,
    progress: bool = True,
    as_frame: bool = False,
    limit: int | None = None,
    data_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    reader_options: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> Any:
    """Per-scan probabilities and predictions of ``loaded``'s classification head; see :func:`mmvl.predict`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"predict: batch_size must be an integer >= 1, got {batch_size!r}")
    if loaded.preprocess is None:
        raise ConfigError(f"{loaded.source}: this model has no image preprocessing")
    record = classifier_record(loaded)
    labels = record["labels"]
    cut = with_overrides(dict(zip(labels, record["thresholds"] or [])) if record["task"] == MULTILABEL else {},
                         thresholds, "multi-label classifier")
    items = scan_items(loaded, inputs, manifest, data_root, allow_outside_root, limit, what="predict")
    preprocessed = dataclasses.replace(loaded, preprocess=with_reader_options(loaded.preprocess, reader_options))
    rows = []
    for row in score_items(preprocessed, items, batch_size, progress):
        scores = row.pop("scores")
        out = {**row, **{label: float("nan") for label in labels}}
        if scores is not None:
            out.update(zip(labels, scores.astype(float).tolist()))
        if record["task"] == MULTILABEL:
            out.update({f"{label}_pred": "" if scores is None else int(out[label] >= cut[label]) for label in labels})
        else:
            out["prediction"] = "" if scores is None else labels[int(np.argmax(scores))]
        rows.append({key: out[key] for key in ("path", "study_id", "view", *prediction_fields(record), "error")})
    return rows_frame(rows, "predict") if as_frame else rows


def prediction_fields(record: Mapping[str, Any]) -> list[str]:
    """The result columns after ``path, study_id, view``: each label's probability, then its thresholded
    prediction (``<label>_pred``, 1/0) or, for a multi-class head, the ``prediction`` (the most probable class)."""
    labels = list(record["labels"])
    return [*labels, *(f"{label}_pred" for label in labels)] if record["task"] == MULTILABEL else [*labels,
                                                                                                   "prediction"]


__all__ = ["classifier_head", "classifier_record", "predict_scans", "prediction_fields", "probabilities",
           "score_items", "split_scores", "validation_thresholds", "with_overrides"]
