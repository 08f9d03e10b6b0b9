"""Running a fine-tuned segmenter over scans: per-label masks written in each scan's own geometry (NIfTI with the
scan's affine for volumes, PNG at the image's size for 2D: the preprocessing's geometry undone as
:mod:`mmvl.evaluation.grounding` undoes it for heatmaps), and the per-label thresholds, Dice-optimal on the
training run's validation split, that an exported segmenter records (``config.json``'s ``segmenter``).

A volume goes through the recorded preprocessing, so the model sees what it was trained on (with ``CropOrPad``:
the centred ROI; scan voxels outside it are outside every mask). ``whole_scan=True`` keeps the whole volume
(``CropOrPad`` pads only) and segments it by sliding windows of the ROI (:meth:`SegmentationHead.predict_logits`).
That needs a model trained on windows at varying positions (random crops): a ViT trained on centred crops only
learnt anatomy at fixed positions of its position embedding, and shifted windows cost it most of its Dice (on one
synthetic CT: cardiomegaly 0.85 in the centred ROI, 0.26 whole-scan).
Finding and reading the scans is :mod:`mmvl.data.inputs`, as for zero-shot and classification.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmvl.data.inputs import scan_items, with_reader_options
from mmvl.data.transforms import Pipeline
from mmvl.errors import ConfigError, DataError
from mmvl.evaluation.grounding import prepare_scan, to_scan
from mmvl.evaluation.overlays import scan_stem, unique_stem
from mmvl.evaluation.plots import file_stem
from mmvl.evaluation.predict import with_overrides
from mmvl.models.heads.segmentation import (
    THRESHOLDS,
    choose_dice_thresholds,
    dice_counts,
    dice_from_counts,
    segmentation_head,
)


def has_segmenter(model: nn.Module) -> bool:
    return any(getattr(head, "is_segmenter", False) for head in getattr(model, "heads", {}).values())


@torch.no_grad()
def split_counts(loaded: Any, split: str | None, batch_size: int = 4) -> tuple[np.ndarray | None, int]:
    """Voxel counts :func:`~mmvl.models.heads.segmentation.dice_counts` ``(N, L, T, 3)`` of the segmenter on the
    ``split`` rows of its training manifest, read with its eval preprocessing and their masks; ``(None, 0)``
    without such rows."""
    from torch.utils.data import DataLoader

    from mmvl.data.datasets import ManifestDataset
    from mmvl.data.loader import Collate
    from mmvl.errors import ManifestError

    name, head = segmentation_head(loaded.model, loaded.source)
    data = loaded.config.get("data") or {}
    if not data.get("manifest") or not split or not os.path.isfile(data["manifest"]):
        return None, 0
    try:
        dataset = ManifestDataset(data["manifest"], loaded.preprocess.spec, split=split, on_error="skip",
                                  require_report=False, root=data.get("root"), label_names=[],
                                  allow_outside_root=bool(data.get("allow_outside_root")),
                                  mask_labels=head.label_names)
    except ManifestError:
        return None, 0
    device = next(loaded.model.parameters()).device
    counts = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=Collate()):
        if "image" not in batch:
            continue
        images = batch["image"].to(device)
        logits = head.predict_logits(loaded.model.image_encoder, images)
        counts.append(dice_counts(logits.sigmoid(), batch["masks"].to(device), head.thresholds).cpu())
    if not counts:
        return None, 0
    stats = torch.cat(counts).numpy()
    return stats, len(stats)


def validation_thresholds(loaded: Any, batch_size: int = 4) -> dict[str, Any]:
    """The segmenter record of a training work dir: labels and each label's Dice-optimal threshold on the rows of
    its validation split (``data.val_split`` of ``data.manifest``), with the Dice it gives."""
    name, head = segmentation_head(loaded.model, loaded.source)
    split = (loaded.config.get("data") or {}).get("val_split")
    stats, n_val = split_counts(loaded, split, batch_size)
    thresholds, sources = choose_dice_thresholds(stats, head.label_names)
    dice = [None] * len(thresholds)
    if stats is not None:
        table = dice_from_counts(stats)  # thresholds are among THRESHOLDS (0.5 where chosen by default)
        index = [THRESHOLDS.index(t) for t in thresholds]
        dice = [None if np.isnan(table[k, i]) else float(table[k, i]) for k, i in enumerate(index)]
    return {"head": name, "task": "segmentation", "labels": list(head.label_names),
            "thresholds": [float(t) for t in thresholds], "threshold_source": sources, "val_dice": dice,
            "n_val": n_val, "val_split": split}


def segmenter_record(loaded: Any) -> dict[str, Any]:
    """What mask predictions need beyond the weights: recorded in a zoo entry's ``config.json`` (``segmenter``),
    chosen on the validation split for a work dir or checkpoint (:func:`validation_thresholds`)."""
    return dict(loaded.config.get("segmenter") or validation_thresholds(loaded))


def whole_scan_pipeline(preprocess: Pipeline) -> Pipeline:
    """The eval preprocessing with its ``CropOrPad`` padding only (``crop=False``): a volume larger than the ROI
    is kept whole, for sliding windows; a smaller one gets exactly the training input."""
    if preprocess.kind != "3d":
        return preprocess
    return Pipeline([{**step, "crop": False} if step.get("type") == "CropOrPad" else step for step in preprocess.spec])


def write_mask(mask: np.ndarray, path: Path, affine: np.ndarray | None) -> Path:
    """A 0/1 mask as NIfTI (uint8, with ``affine``) or, in 2D, an 8-bit PNG (0/255)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is not None:
        import nibabel as nib

        nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.asarray(affine, dtype=np.float64)), str(path))
    else:
        from PIL import Image

        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def mask_fields(labels: Sequence[str]) -> list[str]:
    """The result columns after ``path, study_id, view``: each label's mask file, then its size in voxels."""
    return [*(f"{label}_mask" for label in labels), *(f"{label}_voxels" for label in labels)]


def predict_masks(
    loaded: Any,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike | None = (),
    manifest: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    progress: bool = True,
    as_frame: bool = False,
    limit: int | None = None,
    data_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    reader_options: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, float] | None = None,
    whole_scan: bool = False,
) -> Any:
    """Masks of ``loaded``'s segmentation head for every scan, written under ``mask_dir`` as
    ``<scan>_<label>.nii.gz`` (volumes, the scan's affine and voxel grid) or ``<scan>_<label>.png`` (2D, the
    image's rows and columns); see :func:`mmvl.predict`. One row per scan: ``path``, ``study_id``, ``view``,
    ``<label>_mask`` (the file), ``<label>_voxels`` (its size) and ``error``."""
    from tqdm.auto import tqdm

    from mmvl.data.inputs import rows_frame

    if mask_dir is None:
        raise ConfigError("predict: a segmentation model writes mask files; give mask_dir (tools/predict.py "
                          "--mask-dir)")
    if loaded.preprocess is None:
        raise ConfigError(f"{loaded.source}: this model has no image preprocessing")
    name, head = segmentation_head(loaded.model, loaded.source)
    record = segmenter_record(loaded)
    labels = list(record["labels"])
    cut = with_overrides(dict(zip(labels, record["thresholds"])), thresholds, "segmenter")
    items = scan_items(loaded, inputs, manifest, data_root, allow_outside_root, limit, what="predict")
    pipeline = with_reader_options(loaded.preprocess, reader_options)
    pipeline = whole_scan_pipeline(pipeline) if whole_scan else pipeline
    device = next(loaded.model.parameters()).device
    out_dir, used, rows = Path(mask_dir), set(), []
    for item in tqdm(items, desc="segment", unit="scan", disable=not progress):
        row = {"path": item.path, "study_id": item.study_id or "", "view": item.view or "",
               **{field: "" for field in mask_fields(labels)}, "error": item.error or ""}
        if not row["error"]:
            try:
                scan = prepare_scan(pipeline, item.path, **item.fields)
            except DataError as err:
                row["error"] = err.problem
        if not row["error"]:
            logits = head.predict_logits(loaded.model.image_encoder, scan.image[None].to(device))
            on_scan = to_scan(logits[0].sigmoid(), scan.geometry)  # (L, *scan shape)
            stem = unique_stem(scan_stem(item), used)
            is_3d = scan.geometry.kind == "3d"
            for index, label in enumerate(labels):
                mask = on_scan[index] >= cut[label]
                path = out_dir / f"{stem}_{file_stem(label)}{'.nii.gz' if is_3d else '.png'}"
                write_mask(mask, path, scan.geometry.scan_affine if is_3d else None)
                row[f"{label}_mask"], row[f"{label}_voxels"] = str(path), int(mask.sum())
        rows.append(row)
    return rows_frame(rows, "predict") if as_frame else rows


def segmenter_check(adapted: nn.Module, merged: nn.Module, images: torch.Tensor) -> float:
    """Largest difference of the exported (merged) segmenter's probabilities from the trained model's on
    ``images``."""
    name, head = segmentation_head(adapted)
    with torch.no_grad():
        expected = head.predict_logits(adapted.image_encoder, images).sigmoid()
        got = merged.heads[name].predict_logits(merged.image_encoder, images).sigmoid()
    return float((expected - got).abs().max())


__all__ = ["has_segmenter", "mask_fields", "predict_masks", "segmenter_check", "segmenter_record",
           "split_counts", "validation_thresholds", "whole_scan_pipeline", "write_mask"]
