"""Several models' grounding side by side on the same scans (``tools/evaluate.py A=MODEL B=MODEL --task
grounding``): the paired difference of each model from the first (the baseline) in the grounding metrics and in
zero-shot AUROC, with study bootstrap intervals, and the one table that shows them beside each model's own numbers
and the centre prior's.

Paired means the same (image, label) targets, or the same studies, for both models, and the same resamples of the
studies for both: an interval of a difference is then narrower than the two models' own intervals suggest, since
what the two models share (which studies are hard) cancels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmvl.evaluation.grounding_metrics import METRICS, summarise
from mmvl.evaluation.metrics import UNKNOWN, bootstrap_units, one_class_reason, percentile_interval, resample_units

TABLE_METRICS = ("pointing", "cnr")
METRIC_NAMES = {"pointing": "pointing game", "iou": "IoU", "dice": "Dice", "cnr": "CNR",
                "auroc": "zero-shot AUROC"}


def _target_key(record: Mapping[str, Any]) -> tuple[str, str]:
    return str(record["path"]), str(record["label"])


def paired_grounding(baseline: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
                     n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Per label and metric (:data:`~mmvl.evaluation.grounding_metrics.METRICS`): the mean of ``records``' score
    minus ``baseline``'s over the (image, label) targets both scored (``grounding_records`` of two models on the
    same rows), with a percentile bootstrap interval resampling studies: :func:`summarise` with the baseline in the
    centre prior's place, so the pairing and the resampling are the single-model ones."""
    by_target = {_target_key(record): record for record in baseline}
    pairs = [{"label": record["label"], "study_id": record["study_id"], "model": record["model"],
              "centre_prior": by_target[_target_key(record)]["model"]}
             for record in records if _target_key(record) in by_target]
    summary = summarise(pairs, n_bootstrap, seed, confidence)
    out: dict[str, Any] = {}
    for label, entry in summary["labels"].items():
        out[label] = {"n_images": entry["n_images"], "n_studies": entry["n_studies"]}
        for metric in METRICS:
            out[label][metric] = {key: entry[metric][key] for key in ("difference", "difference_ci")
                                  if key in entry[metric]}
    return out


def _auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(targets, scores))


def _auroc_difference(baseline_scores: np.ndarray, scores: np.ndarray, targets: np.ndarray, known: np.ndarray,
                      index: np.ndarray) -> float:
    """AUROC of ``scores`` minus ``baseline_scores`` (one label's columns) on the known rows of ``index``; NaN
    where they hold one class."""
    index = index[known[index]]
    y = targets[index]
    if not len(y) or y.min() == y.max():
        return float("nan")
    return _auroc(scores[index], y) - _auroc(baseline_scores[index], y)


def paired_auroc_difference(baseline_scores: Any, scores: Any, targets: Any, labels: Sequence[str],
                            study_ids: Sequence[Any] | None = None, n_bootstrap: int = 1000, seed: int = 0,
                            confidence: float = 0.95) -> dict[str, Any]:
    """Per label: AUROC of ``scores`` minus AUROC of ``baseline_scores`` (both ``(N, L)`` over the same studies in
    the same order, ``targets`` 1, 0 or -1 unknown) with a percentile bootstrap interval, the same resampled
    studies scored for both models (rows sharing a study id drawn together, as ``classification_metrics`` does).
    A label with one known class has ``skipped``; a resample that draws one class is left out of the interval
    (``n_resamples`` counts the rest)."""
    baseline_scores, scores = np.asarray(baseline_scores, np.float64), np.asarray(scores, np.float64)
    targets = np.asarray(targets)
    if baseline_scores.shape != scores.shape or scores.shape != targets.shape or scores.shape[1] != len(labels):
        raise ValueError(f"paired_auroc_difference: scores {baseline_scores.shape} and {scores.shape}, targets "
                         f"{targets.shape} for {len(labels)} labels")
    unit_rows, unit_starts = bootstrap_units(study_ids, len(targets))
    rng = np.random.default_rng(seed)
    resamples = [resample_units(rng, unit_rows, unit_starts) for _ in range(n_bootstrap)]
    out: dict[str, Any] = {}
    for j, label in enumerate(labels):
        known = targets[:, j] != UNKNOWN
        reason = "no rows with a known label" if not known.any() else one_class_reason(targets[known, j])
        if reason:
            out[label] = {"skipped": reason}
            continue
        columns = (baseline_scores[:, j], scores[:, j], targets[:, j], known)
        entry: dict[str, Any] = {"difference": _auroc_difference(*columns, np.arange(len(targets))),
                                 "n": int(known.sum())}
        if n_bootstrap:
            differences = np.array([_auroc_difference(*columns, index) for index in resamples])
            interval = percentile_interval(differences, confidence)
            entry["difference_ci"], entry["n_resamples"] = interval["ci"], interval["n_resamples"]
        out[label] = entry
    return out


def align_studies(baseline_ids: Sequence[Any], ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into the baseline's and the other model's per-study arrays of the studies both scored, in the
    baseline's order."""
    where = {study: index for index, study in enumerate(ids)}
    both = [(index, where[study]) for index, study in enumerate(baseline_ids) if study in where]
    return (np.array([a for a, _ in both], dtype=np.int64), np.array([b for _, b in both], dtype=np.int64))


def _cell(value: float | None, ci: Sequence[float] | None = None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    # rounded first, and -0.0 + 0.0 is 0.0: no "-0.000" for a difference of -1e-17
    value, ci = round(value, 3) + 0.0, None if ci is None else [round(bound, 3) + 0.0 for bound in ci]
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return text + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f" [{ci[0]:.3f}, {ci[1]:.3f}]") if ci else text


def comparison_table(names: Sequence[str], grounding: Mapping[str, Mapping[str, Any]],
                     differences: Mapping[str, Mapping[str, Any]], zero_shot: Mapping[str, Mapping[str, Any] | None],
                     auroc_differences: Mapping[str, Mapping[str, Any]],
                     metrics: Sequence[str] = TABLE_METRICS) -> str:
    """A Markdown table, a row per label and metric: n, the centre prior, each model, and each later model minus
    the first (``names[0]``), every value with its interval. ``grounding[name]``: the single-model grounding
    metrics (``labels`` of :func:`summarise`); ``differences[name]``: :func:`paired_grounding`;
    ``zero_shot[name]``: ``classification_metrics`` (or None: no zero-shot row); ``auroc_differences[name]``:
    :func:`paired_auroc_difference`."""
    baseline = names[0]
    header = ["finding", "metric", "n", "centre prior", *names, *(f"{name} - {baseline}" for name in names[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    labels = list(grounding[baseline]["labels"])
    for label in labels:
        first = True
        entry = grounding[baseline]["labels"][label]
        for metric in metrics:
            values = entry[metric]
            row = [label if first else "", METRIC_NAMES[metric], str(entry["n_images"]),
                   _cell(values["centre_prior"], values.get("centre_prior_ci"))]
            for name in names:
                other = grounding[name]["labels"].get(label)
                row.append(_cell(other[metric]["model"], other[metric].get("model_ci")) if other else "-")
            for name in names[1:]:
                paired = differences[name].get(label)
                row.append(_cell(paired[metric]["difference"], paired[metric].get("difference_ci"), signed=True)
                           if paired else "-")
            lines.append("| " + " | ".join(row) + " |")
            first = False
        scored = zero_shot.get(baseline)
        if scored and label in scored["labels"] and "skipped" not in scored["labels"][label]:
            base_entry = scored["labels"][label]
            row = ["", METRIC_NAMES["auroc"], f"{base_entry['n']} ({base_entry['n_positive']} pos.)", "-"]
            for name in names:
                own = (zero_shot.get(name) or {"labels": {}})["labels"].get(label) or {}
                row.append(_cell(own.get("auroc"), own.get("auroc_ci")))
            for name in names[1:]:
                paired = auroc_differences.get(name, {}).get(label) or {}
                row.append(_cell(paired.get("difference"), paired.get("difference_ci"), signed=True))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
