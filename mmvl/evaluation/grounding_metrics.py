"""How well heatmaps find the findings: pointing game, IoU and Dice of the thresholded map, and contrast-to-noise
ratio, per label with study-level bootstrap intervals, against a centre-prior baseline (``tools/evaluate.py --task
grounding``).

Targets come from manifest rows: ``masks`` (``{label: path}``, a PNG on the image's pixel grid or a NIfTI in the
volume's geometry, as ``datasets/synthetic.py`` and ``synthetic_ct.py`` write them; a list of paths, one per image,
for rows of several images) and/or ``boxes`` (``{label: [[x, y, width, height], ...]}`` in pixels of the image as
stored, x along the columns from the left edge, y along the rows from the top: MS-CXR's layout, see
``datasets/ms_cxr.md``), with optional ``phrases`` (``{label: "the annotated phrase"}``: the map is then of that
phrase, as in MS-CXR's phrase grounding; else of the label's positive prompts).

Definitions (``map`` and ``target`` on the scan's grid, ``target`` the finding's pixels/voxels):

- pointing game (Zhang et al. 2016, without tolerance): 1 if the map's maximum lies in the target, else 0; where
  several pixels share the maximum, the fraction of them in the target (the expected hit of a random tie-break, so
  the centre prior of an even-sided image, whose four central pixels tie, scores the same in every voxel order);
- IoU and Dice of the thresholded map: the map rescaled to [0, 1] per scan (min-max) and kept where it is
  ``>= threshold`` (0.5 by default); a constant map keeps nothing (IoU = Dice = 0);
- CNR as BioViL reports it (Boecking et al. 2022): ``|mean_in - mean_out| / sqrt(var_in + var_out)`` of the raw map
  inside and outside the target (population variances); 0 where both variances are 0.

The centre prior is a Gaussian centred in the scan (standard deviation a quarter of each side, in voxels), scored in
the same way: a finding that usually sits mid-image is found by it without looking at the image at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmvl.data.masks import read_mask as read_on_grid
from mmvl.data.masks import row_mask_paths
from mmvl.errors import DataError
from mmvl.evaluation.metrics import bootstrap_units, percentile_interval, resample_units

METRICS = ("pointing", "iou", "dice", "cnr")
DEFAULT_THRESHOLD = 0.5
CENTRE_SIGMA = 0.25  # of each side


# ---------------------------------------------------------------------------------------------------------
# One map against one target
# ---------------------------------------------------------------------------------------------------------
def pointing_hit(heatmap: np.ndarray, target: np.ndarray) -> float:
    """1.0 if the map's maximum lies in ``target``, else 0.0; with tied maxima, the fraction of them in ``target``."""
    return float(target[heatmap == np.max(heatmap)].mean())


def thresholded(heatmap: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """The map rescaled to [0, 1] (min-max) and kept where ``>= threshold``; a constant map keeps nothing."""
    low, high = float(np.min(heatmap)), float(np.max(heatmap))
    if not high > low:
        return np.zeros(heatmap.shape, dtype=bool)
    return (heatmap - low) / (high - low) >= threshold


def overlap(predicted: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """``(IoU, Dice)`` of two boolean masks; both empty counts as no overlap (0, 0)."""
    both = float(np.logical_and(predicted, target).sum())
    either = float(np.logical_or(predicted, target).sum())
    total = float(predicted.sum() + target.sum())
    return (both / either if either else 0.0), (2 * both / total if total else 0.0)


def contrast_to_noise(heatmap: np.ndarray, target: np.ndarray) -> float:
    """BioViL's CNR: ``|mean_in - mean_out| / sqrt(var_in + var_out)``; NaN when the target is empty or everything."""
    inside, outside = heatmap[target], heatmap[~target]
    if not inside.size or not outside.size:
        return float("nan")
    spread = math.sqrt(float(inside.var()) + float(outside.var()))
    difference = abs(float(inside.mean()) - float(outside.mean()))
    return difference / spread if spread > 0 else 0.0


def grounding_scores(heatmap: np.ndarray, target: np.ndarray, threshold: float = DEFAULT_THRESHOLD
                     ) -> dict[str, float]:
    """Pointing game, IoU, Dice and CNR of one map against one boolean target of the same shape."""
    heatmap, target = np.asarray(heatmap, dtype=np.float64), np.asarray(target, dtype=bool)
    if heatmap.shape != target.shape:
        raise ValueError(f"grounding_scores: map {heatmap.shape} and target {target.shape} differ in shape")
    if not target.any():
        raise ValueError("grounding_scores: the target is empty")
    iou, dice = overlap(thresholded(heatmap, threshold), target)
    return {"pointing": pointing_hit(heatmap, target), "iou": iou, "dice": dice,
            "cnr": contrast_to_noise(heatmap, target)}


def centre_prior(shape: Sequence[int], sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """A Gaussian centred in a grid of ``shape``, its standard deviation ``sigma`` times each side."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (sigma * n)) ** 2) for n in shape]
    prior = axes[0]
    for axis in axes[1:]:
        prior = np.multiply.outer(prior, axis)
    return prior


# ---------------------------------------------------------------------------------------------------------
# Targets from manifest rows
# ---------------------------------------------------------------------------------------------------------
def boxes_mask(boxes: Sequence[Sequence[float]], shape: Sequence[int]) -> np.ndarray:
    """Pixels covered by ``[x, y, width, height]`` boxes (MS-CXR: pixels of the stored image, origin top-left): a
    pixel is inside when its centre is."""
    rows, columns = shape
    mask = np.zeros((rows, columns), dtype=bool)
    centres_y, centres_x = np.arange(rows) + 0.5, np.arange(columns) + 0.5
    for box in boxes:
        if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"a box is [x, y, width, height] with a positive size, got {list(box)}")
        x, y, width, height = (float(v) for v in box)
        in_rows = (centres_y >= y) & (centres_y <= y + height)
        in_columns = (centres_x >= x) & (centres_x <= x + width)
        mask |= np.outer(in_rows, in_columns)
    return mask


def read_mask(path: str | os.PathLike, geometry: Any) -> np.ndarray:
    """A mask file on the scan's grid (:func:`mmvl.data.masks.read_mask`: a PNG/TIFF of the image's rows and
    columns, or a NIfTI resampled, nearest, onto the volume through both affines)."""
    return read_on_grid(path, geometry.scan_shape, geometry.scan_affine if geometry.kind != "2d" else None)


def row_targets(row: Mapping[str, Any], image_index: int, manifest_dir: str | os.PathLike
                ) -> dict[str, dict[str, Any]]:
    """``{label: {"masks": [path], "boxes": [[x, y, w, h]], "phrase": str | None}}`` of one image of a manifest
    row (``masks`` paths relative to the manifest's folder)."""
    targets: dict[str, dict[str, Any]] = {}
    n_images = len(row["image"])
    for key in ("masks", "boxes"):
        value = row.get(key) or {}
        if not isinstance(value, Mapping):
            raise DataError(None, f"row {row.get('line')}: '{key}' must map labels to "
                                  f"{'mask paths' if key == 'masks' else 'boxes [x, y, w, h]'}, got {value!r:.80}")
        if key == "masks":  # one path (or None) per label for this image, resolved as the datasets resolve them
            for label, path in zip(value, row_mask_paths(row, list(value), manifest_dir, image_index)):
                if path:
                    targets.setdefault(label, {"masks": [], "boxes": []})["masks"].append(path)
            continue
        for label, entry in value.items():
            boxes = entry[image_index] if n_images > 1 else entry
            if boxes:
                targets.setdefault(label, {"masks": [], "boxes": []})["boxes"].extend(boxes)
    phrases = row.get("phrases") or {}
    for label, target in targets.items():
        target["phrase"] = phrases.get(label) or None
    return targets


def target_mask(target: Mapping[str, Any], geometry: Any) -> np.ndarray:
    """The union of a target's masks and boxes on the scan's grid."""
    mask = np.zeros(geometry.scan_shape, dtype=bool)
    for path in target["masks"]:
        mask |= read_mask(path, geometry)
    if target["boxes"]:
        if geometry.kind != "2d":
            raise DataError(None, "boxes are for 2D images; give a volume's targets as NIfTI masks")
        mask |= boxes_mask(target["boxes"], geometry.scan_shape)
    return mask


# ---------------------------------------------------------------------------------------------------------
# Per label, with intervals
# ---------------------------------------------------------------------------------------------------------
def summarise(records: Sequence[Mapping[str, Any]], n_bootstrap: int = 1000, seed: int = 0,
              confidence: float = 0.95) -> dict[str, Any]:
    """Per label: each metric's mean over the label's images for the model and the centre prior, their paired
    difference, and percentile bootstrap intervals resampling studies (all images of a study drawn together).

    ``records``: one per (image, label) with ``label``, ``study_id`` and ``model``/``centre_prior`` score dicts
    (:func:`grounding_scores`). A CNR that is NaN (target covering the whole scan) is left out of its mean."""
    labels = list(dict.fromkeys(record["label"] for record in records))
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for label in labels:
        rows = [record for record in records if record["label"] == label]
        values = np.array([[[record[side][metric] for metric in METRICS] for side in ("model", "centre_prior")]
                           for record in rows], dtype=np.float64)  # (N, 2, M)
        unit_rows, unit_starts = bootstrap_units([record.get("study_id") or None for record in rows], len(rows))

        def means(sample: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore"):
                model, prior = np.nanmean(sample[:, 0], axis=0), np.nanmean(sample[:, 1], axis=0)
                both = ~np.isnan(sample[:, 0]) & ~np.isnan(sample[:, 1])
                difference = np.array([np.mean(sample[both[:, m], 0, m] - sample[both[:, m], 1, m])
                                       if both[:, m].any() else np.nan for m in range(len(METRICS))])
            return np.stack([model, prior, difference])  # (3, M)

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample whose CNRs are all NaN
            point = means(values)
            draws = np.stack([means(values[resample_units(rng, unit_rows, unit_starts)]) for _ in range(n_bootstrap)]) \
                if n_bootstrap else None
        entry: dict[str, Any] = {"n_images": len(rows), "n_studies": int(len(unit_starts) - 1)}
        for m, metric in enumerate(METRICS):
            result: dict[str, Any] = {}
            for s, side in enumerate(("model", "centre_prior", "difference")):
                result[side] = None if np.isnan(point[s, m]) else float(point[s, m])
                if draws is not None:
                    result[f"{side}_ci"] = percentile_interval(draws[:, s, m], confidence)["ci"]
            entry[metric] = result
        out[label] = entry
    return {"labels": out, "bootstrap": {"n_resamples": n_bootstrap, "seed": seed, "confidence": confidence,
                                         "unit": "study", "method": "percentile"}}


def definitions(threshold: float) -> dict[str, str]:
    """What each number is, for the JSON."""
    return {
        "pointing": "1 if the map's maximum lies in the finding (no tolerance; tied maxima: the fraction inside), "
                    "mean over images",
        "iou": f"IoU of the map min-max rescaled per scan and thresholded at >= {threshold} with the finding",
        "dice": f"Dice of the same thresholded map (>= {threshold} after per-scan min-max rescaling)",
        "cnr": "BioViL's contrast-to-noise ratio |mean_in - mean_out| / sqrt(var_in + var_out) of the raw map",
        "centre_prior": f"a Gaussian centred in the scan, standard deviation {CENTRE_SIGMA} of each side",
        "difference": "model minus centre prior on the same images (paired)",
        "geometry": "maps and targets compared on the scan's own pixel/voxel grid (preprocessing undone)",
    }


# ---------------------------------------------------------------------------------------------------------
# A model over manifest rows
# ---------------------------------------------------------------------------------------------------------
def evaluate_grounding(loaded: Any, rows: Sequence[Mapping[str, Any]], manifest_dir: str | os.PathLike,
                       prompts: Mapping[str, Mapping[str, Sequence[str]]], method: str = "similarity",
                       threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8, device: Any = None,
                       n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95,
                       progress: bool = True) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Grounding metrics of ``loaded`` on the targets of ``rows`` (manifest rows, :func:`row_targets`) for the labels
    of ``prompts`` (a label's map is of its positive prompts, or of the row's phrase for it). Returns the
    :func:`summarise` result (with ``n_targets``) and the images or targets that could not be scored, with reasons."""
    records, failed = grounding_records(loaded, rows, manifest_dir, prompts, method, threshold, batch_size, device,
                                        progress)
    return summarise_records(records, n_bootstrap, seed, confidence), failed


def summarise_records(records: Sequence[Mapping[str, Any]], n_bootstrap: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> dict[str, Any]:
    """:func:`summarise` of :func:`grounding_records` with their count, ``n_targets``."""
    summary = summarise(records, n_bootstrap, seed, confidence)
    summary["n_targets"] = len(records)
    return summary


def grounding_records(loaded: Any, rows: Sequence[Mapping[str, Any]], manifest_dir: str | os.PathLike,
                      prompts: Mapping[str, Mapping[str, Sequence[str]]], method: str = "similarity",
                      threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8, device: Any = None,
                      progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """One record per scored (image, label) of ``rows`` (``label``, ``study_id``, ``path``, ``text`` and the
    ``model`` and ``centre_prior`` :func:`grounding_scores`), in row order within each group of images mapped for
    the same texts, and the images or targets that could not be scored, with reasons (see
    :func:`evaluate_grounding`)."""
    from tqdm.auto import tqdm

    from mmvl.data.inputs import row_items
    from mmvl.evaluation.grounding import build_texts, iter_heatmaps

    jobs: dict[tuple[str, ...], list[tuple[Any, dict[str, tuple[str, dict]]]]] = {}
    failed: list[dict[str, str]] = []
    for row in rows:
        for index, item in enumerate(row_items(row)):
            try:
                targets = row_targets(row, index, manifest_dir)
            except DataError as err:
                failed.append({"path": item.path, "study_id": item.study_id or "", "reason": err.problem})
                continue
            wanted = {}
            for label, target in targets.items():
                if label in prompts or target["phrase"]:
                    text = f"phrase: {target['phrase']}" if target["phrase"] else label
                    wanted[label] = (text, target)
            if wanted:
                jobs.setdefault(tuple(sorted({text for text, _ in wanted.values()})), []).append((item, wanted))
    records: list[dict[str, Any]] = []
    disable = not progress or os.environ.get("MMVL_NO_PROGRESS") == "1"
    bar = tqdm(total=sum(len(group) for group in jobs.values()), desc="grounding", unit="scan", disable=disable)
    for names, group in jobs.items():
        texts = build_texts(loaded.model, {name: [name[len("phrase: "):]] if name.startswith("phrase: ")
                                           else list(prompts[name]["positive"]) for name in names})
        items = [item for item, _ in group]
        for (item, wanted), result in zip(group, iter_heatmaps(loaded, items, texts, method, batch_size, device)):
            bar.update(1)
            if result.error:
                failed.append({"path": item.path, "study_id": item.study_id or "", "reason": result.error})
                continue
            prior = centre_prior(result.geometry.scan_shape)
            for label, (text, target) in wanted.items():
                try:
                    mask = target_mask(target, result.geometry)
                    if not mask.any():
                        raise DataError(None, f"the target of '{label}' covers no pixel of the image")
                except (DataError, ValueError) as err:
                    failed.append({"path": item.path, "study_id": item.study_id or "", "label": label,
                                   "reason": getattr(err, "problem", str(err))})
                    continue
                records.append({"label": label, "study_id": item.study_id or item.path, "path": item.path,
                                "text": text, "model": grounding_scores(result.maps[text], mask, threshold),
                                "centre_prior": grounding_scores(prior, mask, threshold)})
    bar.close()
    return records, failed
