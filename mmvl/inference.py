"""Running a trained model over new scans: ``mmvl.zero_shot``, zero-shot classification of files, folders and
manifest rows by a work dir, checkpoint or zoo entry, ``mmvl.predict``, a fine-tuned classifier's probabilities
and predictions, and ``mmvl.grounding``, where in each scan a phrase is.
Finding and preprocessing the scans is :mod:`mmvl.data.inputs`; loading the model, :mod:`mmvl.loading`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mmvl.errors import ConfigError
from mmvl.loading import LoadedModel, load_model

PathLike = str | os.PathLike


def _check_model(model: Any, what: str) -> None:
    if model is None or not isinstance(model, (str, os.PathLike, LoadedModel)):
        raise ConfigError(f"{what}: model must be a work dir, checkpoint, zoo entry (folder or name) or a loaded "
                          f"model (mmvl.zoo.load_pretrained), got {type(model).__name__}")


def zero_shot(
    model: Any,
    inputs: Sequence[PathLike] | PathLike | None = (),
    labels: Sequence[str] | str | None = None,
    preset: str | Mapping[str, Any] | None = None,
    mode: str = "pairwise",
    manifest: PathLike | None = None,
    batch_size: int = 32,
    device: Any = None,
    progress: bool = True,
    as_frame: bool = False,
    limit: int | None = None,
    data_root: PathLike | None = None,
    allow_outside_root: bool = False,
    reader_options: Mapping[str, Any] | None = None,
) -> Any:
    """Zero-shot probabilities of ``labels`` for every scan in ``inputs`` (files or folders) and/or ``manifest``.

    ``model``: a training work dir, a checkpoint file, a zoo entry (folder or name) or a loaded model
    (``mmvl.zoo.load_pretrained``). ``inputs``: files or folders, searched recursively
    (:func:`mmvl.data.inputs.find_inputs`: a DICOMDIR is read, every file seen is a scan or an error row).
    ``labels``: names, or one comma-separated string; default: those of the zoo entry's ``prompts.json``.
    ``preset``: ``chexzero``, ``ctclip``, ``ctrate``, ``ensemble``, a prompt dict or a JSON/YAML prompt file (see
    ``mmvl.evaluation.zero_shot.load_prompt_file``); default: the entry's recorded prompts, else ``chexzero``.
    ``mode``: ``pairwise`` (per label, softmax over its positive and negative prompts) or ``multiclass`` (softmax
    across two or more labels). Returns one dict per scan (``path``, ``study_id``, one probability per label,
    ``error`` naming why a scan could not be read, empty otherwise; probabilities are NaN then), in input order
    (``limit``: only the first N scans); ``as_frame=True`` gives a pandas DataFrame. ``manifest`` images must lie
    inside ``data_root`` (default: the training config's ``data.root``, else the manifest's folder) unless
    ``allow_outside_root``. ``reader_options`` override the recorded reader's options, e.g.
    ``{"allow_gaps": True}`` to interpolate the missing slices of a gapped DICOM series.
    """
    _check_model(model, "zero_shot")
    return load_model(model, device).zero_shot(
        inputs, labels, preset, mode=mode, manifest=manifest, batch_size=batch_size, progress=progress,
        as_frame=as_frame, limit=limit, data_root=data_root, allow_outside_root=allow_outside_root,
        reader_options=reader_options)


def grounding(
    model: Any,
    inputs: Sequence[PathLike] | PathLike | None = (),
    phrases: str | Sequence[str] | Mapping[str, Any] = (),
    method: str = "similarity",
    manifest: PathLike | None = None,
    batch_size: int = 8,
    device: Any = None,
    limit: int | None = None,
    data_root: PathLike | None = None,
    allow_outside_root: bool = False,
    reader_options: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Grounding heatmaps: for every scan in ``inputs`` (files or folders, found as :func:`zero_shot` finds them)
    and/or ``manifest``, a map per phrase of where the phrase is, in the scan's geometry.

    ``model``: as for :func:`zero_shot`. ``phrases``: a phrase (``"right pleural effusion"``), a list of them, or
    ``{name: prompts}`` with a label's prompts (a list of positive prompts, or ``{"positive": [...], "negative":
    [...]}``, e.g. from ``mmvl.evaluation.zero_shot.build_prompts``; with negatives each scan also gets the pairwise
    zero-shot probability). ``method``: ``"similarity"`` (each patch token projected into the joint space, cosine
    with the text embedding; a head with ``patch_similarity(image, text)``, such as a local-alignment head, is
    preferred) or ``"gradcam"`` (Grad-CAM on the image-text similarity). See :mod:`mmvl.evaluation.grounding`.

    Returns one :class:`mmvl.evaluation.grounding.ScanHeatmaps` per scan, in input order: ``maps[name]`` (2D:
    ``(rows, columns)`` of the image as read; 3D: ``(X, Y, Z)`` of the volume as read, whose RAS affine is
    ``.affine``), ``similarity``, ``probability``, ``scan`` (the image as read) and ``error`` for scans that could
    not be read.
    """
    from mmvl.data.inputs import with_reader_options
    from mmvl.evaluation.grounding import build_texts, grounding_items, iter_heatmaps

    _check_model(model, "grounding")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"grounding: batch_size must be an integer >= 1, got {batch_size!r}")
    loaded = load_model(model, device)
    if loaded.preprocess is None:
        raise ConfigError(f"{loaded.source}: this model has no image preprocessing (a text-only model)")
    loaded = dataclasses.replace(loaded, preprocess=with_reader_options(loaded.preprocess, reader_options))
    items = grounding_items(loaded, inputs, manifest, data_root, allow_outside_root, limit)
    texts = build_texts(loaded.model, phrases)
    return list(iter_heatmaps(loaded, items, texts, method=method, batch_size=batch_size))


def predict(
    model: Any,
    inputs: Sequence[PathLike] | PathLike | None = (),
    manifest: PathLike | None = None,
    batch_size: int = 32,
    device: Any = None,
    progress: bool = True,
    as_frame: bool = False,
    limit: int | None = None,
    data_root: PathLike | None = None,
    allow_outside_root: bool = False,
    reader_options: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, float] | None = None,
    mask_dir: PathLike | None = None,
    whole_scan: bool = False,
) -> Any:
    """A fine-tuned classifier's per-label probabilities and predictions, or a fine-tuned segmenter's masks, for
    every scan in ``inputs`` (files or folders, found as :func:`zero_shot` finds them) and/or ``manifest`` rows.

    ``model``: a fine-tuning work dir or checkpoint (``configs/finetune/``), its zoo entry (``tools/export.py``,
    folder or name) or a loaded one. Returns one dict per scan, in input order: ``path``, ``study_id``, ``view``,
    each label's probability, then for a multi-label head ``<label>_pred`` (1 when the probability reaches the
    label's threshold: the F1-optimal one on the run's validation split, recorded in the entry's ``config.json``;
    ``thresholds`` overrides some) or for a multi-class head ``prediction`` (the most probable class), and
    ``error`` (why a scan could not be read; its probabilities are NaN). The other arguments are
    :func:`zero_shot`'s.

    A segmenter (``configs/finetune/seg_*``) writes one mask per label and scan under ``mask_dir``, in the scan's
    geometry: ``<scan>_<label>.nii.gz`` with the scan's affine and voxel grid for volumes (the recorded
    preprocessing's ROI; ``whole_scan=True``: the whole volume by sliding windows of the ROI, for models trained
    on random crops), ``<scan>_<label>.png`` at the image's size for 2D (the resize and pad undone), thresholded
    at each label's Dice-optimal threshold on the run's validation split (``thresholds`` overrides some); its rows
    give ``<label>_mask`` (the file) and ``<label>_voxels``.
    """
    from mmvl.evaluation.predict import predict_scans
    from mmvl.evaluation.segment import has_segmenter, predict_masks

    _check_model(model, "predict")
    loaded = load_model(model, device)
    if has_segmenter(loaded.model):
        return predict_masks(loaded, inputs, manifest, mask_dir=mask_dir, progress=progress, as_frame=as_frame,
                             limit=limit, data_root=data_root, allow_outside_root=allow_outside_root,
                             reader_options=reader_options, thresholds=thresholds, whole_scan=whole_scan)
    return predict_scans(loaded, inputs, manifest, batch_size=batch_size, progress=progress,
                         as_frame=as_frame, limit=limit, data_root=data_root, allow_outside_root=allow_outside_root,
                         reader_options=reader_options, thresholds=thresholds)
