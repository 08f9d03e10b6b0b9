"""Classification metrics for trained models: per-label AUROC and F1 at a threshold chosen on a validation split,
macro and micro averages, study-level bootstrap intervals, and linear probes on frozen image features.

Pure numpy and scikit-learn, no model code: inputs are ``(N, L)`` score and target arrays, so zero-shot
probabilities, linear probes and any other classifier are scored alike. Targets are 1 (present), 0 (absent) or -1
(unknown, e.g. CheXpert's uncertain or unmentioned); unknown entries are left out label by label.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

UNKNOWN = -1
DEFAULT_THRESHOLD = 0.5
PROBE_FRACTIONS = (0.01, 0.1, 1.0)
# Inverse regularisation strengths tried per label on the validation split (CLIP's linear probes sweep C likewise).
PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0)


def target_matrix(label_dicts: Sequence[Mapping[str, Any] | None], label_names: Sequence[str]) -> np.ndarray:
    """``(N, L)`` int array from manifest label dicts: 1 and 0 as given, -1 for -1, missing, None or NaN."""
    out = np.full((len(label_dicts), len(label_names)), UNKNOWN, dtype=np.int64)
    for i, labels in enumerate(label_dicts):
        for j, name in enumerate(label_names):
            value = (labels or {}).get(name)
            if value is not None and value == value and value in (0, 1):
                out[i, j] = int(value)
    return out


def _check_targets(targets: Any, n_labels: int, what: str) -> np.ndarray:
    targets = np.asarray(targets)
    if targets.ndim == 1:
        targets = targets.reshape(-1, 1)
    if targets.ndim != 2 or targets.shape[1] != n_labels:
        raise ValueError(f"{what}: targets {targets.shape} must be (N, {n_labels})")
    if not np.isin(targets, (UNKNOWN, 0, 1)).all():
        raise ValueError(f"{what}: targets must be 1, 0 or -1 (unknown), got {sorted(set(np.unique(targets)))}")
    return targets.astype(np.int64)


def _check(scores: Any, targets: Any, n_labels: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    targets = _check_targets(targets, n_labels, what)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.shape != targets.shape:
        raise ValueError(f"{what}: scores {scores.shape} and targets {targets.shape} must both be (N, {n_labels})")
    if not np.isfinite(scores[targets != UNKNOWN]).all():
        raise ValueError(f"{what}: scores must be finite where the target is known")
    return scores, targets


def one_class_reason(targets: np.ndarray) -> str | None:
    """Why AUROC is undefined for these known 0/1 targets, or None when both classes occur."""
    positives = int(targets.sum())
    if positives == 0 or positives == len(targets):
        return (f"only one class among the {len(targets)} rows with a known label "
                f"({positives} positive, {len(targets) - positives} negative)")
    return None


def best_f1_threshold(scores: np.ndarray, targets: np.ndarray) -> float:
    """The score threshold (predict present when ``score >= threshold``) maximising F1 on these rows; the
    lowest such threshold on ties. Targets must hold at least one positive."""
    precision, recall, thresholds = precision_recall_curve(targets, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(thresholds[int(np.argmax(f1))])


def choose_thresholds(val_scores: np.ndarray | None, val_targets: np.ndarray | None,
                      label_names: Sequence[str]) -> tuple[list[float], list[str]]:
    """Per label, the threshold maximising F1 on the validation rows with a known label, and where it came from:
    ``"val"``, or ``"default 0.5: <why>"`` when there are no validation rows or none of them is positive."""
    thresholds, sources = [], []
    for j in range(len(label_names)):
        if val_scores is None or len(val_scores) == 0:
            thresholds.append(DEFAULT_THRESHOLD)
            sources.append(f"default {DEFAULT_THRESHOLD}: no validation rows")
            continue
        known = val_targets[:, j] != UNKNOWN
        targets = val_targets[known, j]
        if targets.sum() == 0:
            thresholds.append(DEFAULT_THRESHOLD)
            sources.append(f"default {DEFAULT_THRESHOLD}: no positive validation rows "
                           f"({len(targets)} with a known label)")
            continue
        thresholds.append(best_f1_threshold(val_scores[known, j], targets))
        sources.append("val")
    return thresholds, sources


def _f1(scores: np.ndarray, targets: np.ndarray, threshold: float | np.ndarray) -> float:
    return float(f1_score(targets, (scores >= threshold).astype(np.int64), zero_division=0.0))


def _point_metrics(scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray,
                   evaluated: Sequence[int]) -> dict[str, Any]:
    """AUROC and F1 per evaluated label, their means (macro) and the micro values over all known label-rows.
    NaN where a label (or every label, for micro) has one class in these rows."""
    auroc, f1 = np.full(scores.shape[1], np.nan), np.full(scores.shape[1], np.nan)
    for j in evaluated:
        known = targets[:, j] != UNKNOWN
        y = targets[known, j]
        if 0 < y.sum() < len(y):
            auroc[j] = roc_auc_score(y, scores[known, j])
            f1[j] = _f1(scores[known, j], y, thresholds[j])
    known = targets != UNKNOWN
    flat_targets = targets[known]
    flat_scores = scores[known]
    flat_thresholds = np.broadcast_to(thresholds, scores.shape)[known]
    both = 0 < flat_targets.sum() < len(flat_targets)
    picked = list(evaluated)
    return {
        "auroc": auroc, "f1": f1,
        "macro_auroc": float(auroc[picked].mean()) if picked else np.nan,  # NaN if any label is undefined
        "macro_f1": float(f1[picked].mean()) if picked else np.nan,
        "micro_auroc": float(roc_auc_score(flat_targets, flat_scores)) if both else np.nan,
        "micro_f1": _f1(flat_scores, flat_targets, flat_thresholds) if both else np.nan,
    }


def percentile_interval(samples: np.ndarray, confidence: float) -> dict[str, Any]:
    """Percentile bootstrap interval over the resamples where the value is defined."""
    valid = samples[np.isfinite(samples)]
    if len(valid) == 0:
        return {"ci": None, "n_resamples": 0}
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(valid, [tail, 100 - tail])
    return {"ci": [float(low), float(high)], "n_resamples": int(len(valid))}


def bootstrap_units(study_ids: Sequence[Any] | None, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The resampling units of ``n_rows`` rows: ``(rows, starts)``, where unit ``u`` holds the row indices
    ``rows[starts[u]:starts[u + 1]]``. Rows sharing a study id form one unit (in order of first appearance); a row
    without one (None, "" or NaN), or every row when ``study_ids`` is None, is a unit of its own."""
    if study_ids is None:
        return np.arange(n_rows), np.arange(n_rows + 1)
    if len(study_ids) != n_rows:
        raise ValueError(f"study_ids: {len(study_ids)} ids for {n_rows} rows; give one per row (None where unknown)")
    unit_of: dict[Any, int] = {}
    codes = np.empty(n_rows, dtype=np.int64)
    for i, study in enumerate(study_ids):
        missing = study is None or study == "" or (isinstance(study, float) and math.isnan(study))
        codes[i] = len(unit_of) if missing else unit_of.setdefault(study, len(unit_of))
        if missing:
            unit_of[("row", i)] = codes[i]  # a unit of its own, never matched by a real id
    rows = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(unit_of)))])
    return rows, starts


def resample_units(rng: np.random.Generator, rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Row indices of one bootstrap resample: as many units as there are, drawn with replacement, each with all
    its rows."""
    n_units = len(starts) - 1
    drawn = rng.integers(0, n_units, n_units)
    sizes = starts[drawn + 1] - starts[drawn]
    # position of each output row inside its unit, added to the unit's start
    offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return rows[np.repeat(starts[drawn], sizes) + offsets]


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def classification_metrics(
    scores: Any,
    targets: Any,
    label_names: Sequence[str],
    val_scores: Any = None,
    val_targets: Any = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    study_ids: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Per-label AUROC and F1 with bootstrap intervals, and their macro and micro averages.

    ``scores``/``targets``: ``(N, L)`` (targets 1, 0 or -1 unknown, masked per label). A label whose known rows
    hold one class only is skipped (``skipped`` gives the reason) and left out of the macro averages; the micro
    values pool every known label-row of every label. F1 uses, per label, the threshold that maximises F1 on
    ``val_scores``/``val_targets`` (default 0.5 where there are no validation rows or no positive one; each label's
    ``threshold_source`` says which). Intervals: ``n_bootstrap`` resamples with replacement, seeded, percentile
    method, of the studies when ``study_ids`` (one per row) is given: all rows of a study are drawn together, so
    several images of one study do not narrow the interval; a row without a study id is a unit of its own.
    Without ``study_ids`` each row is a unit. ``bootstrap`` reports the ``unit`` ("study" or "row") and
    ``n_units``. A resample where a value is undefined (one class drawn) is left out of that value's interval,
    and ``n_resamples`` counts the rest. Undefined values are None.
    """
    label_names = list(label_names)
    scores, targets = _check(scores, targets, len(label_names), "classification_metrics")
    if val_scores is not None:
        val_scores, val_targets = _check(val_scores, val_targets, len(label_names), "classification_metrics (val)")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not len(scores):
        raise ValueError("classification_metrics: no rows to evaluate")
    threshold_list, sources = choose_thresholds(val_scores, val_targets, label_names)
    thresholds = np.asarray(threshold_list)

    per_label: dict[str, dict[str, Any]] = {}
    evaluated = []
    for j, name in enumerate(label_names):
        known = targets[:, j] != UNKNOWN
        y = targets[known, j]
        entry = {"n": int(known.sum()), "n_positive": int(y.sum()), "n_unknown": int((~known).sum()),
                 "threshold": float(thresholds[j]), "threshold_source": sources[j]}
        reason = "no rows with a known label" if not len(y) else one_class_reason(y)
        if reason:
            entry["skipped"] = reason
        else:
            evaluated.append(j)
        per_label[name] = entry

    unit_rows, unit_starts = bootstrap_units(study_ids, len(scores))
    point = _point_metrics(scores, targets, thresholds, evaluated)
    rng = np.random.default_rng(seed)
    draws: dict[str, list] = {key: [] for key in point}
    for _ in range(n_bootstrap):
        index = resample_units(rng, unit_rows, unit_starts)
        for key, value in _point_metrics(scores[index], targets[index], thresholds, evaluated).items():
            draws[key].append(value)
    samples = {key: np.asarray(values, dtype=np.float64) for key, values in draws.items()}

    for j in evaluated:
        entry = per_label[label_names[j]]
        for metric in ("auroc", "f1"):
            entry[metric] = float(point[metric][j])
            if n_bootstrap:
                interval = percentile_interval(samples[metric][:, j], confidence)
                entry[f"{metric}_ci"], entry[f"{metric}_n_resamples"] = interval["ci"], interval["n_resamples"]
    averages: dict[str, dict[str, Any]] = {}
    for average in ("macro", "micro"):
        entry = {}
        for metric in ("auroc", "f1"):
            key = f"{average}_{metric}"
            entry[metric] = _number(point[key])
            if n_bootstrap:
                interval = percentile_interval(samples[key], confidence)
                entry[f"{metric}_ci"], entry[f"{metric}_n_resamples"] = interval["ci"], interval["n_resamples"]
        averages[average] = entry
    averages["macro"]["labels"] = [label_names[j] for j in evaluated]
    known = targets != UNKNOWN
    averages["micro"].update(n_label_rows=int(known.sum()), n_positive=int(targets[known].sum()))
    return {
        "labels": per_label,
        **averages,
        "n_rows": int(len(scores)),
        "n_val_rows": 0 if val_scores is None else int(len(val_scores)),
        "threshold_source": "val" if all(source == "val" for source in sources) else (
            "default" if not any(source == "val" for source in sources) else "val, default for some labels"),
        "bootstrap": {"n_resamples": n_bootstrap, "seed": seed, "confidence": confidence,
                      "unit": "row" if study_ids is None else "study", "n_units": int(len(unit_starts) - 1),
                      "method": "percentile"},
    }


# ---------------------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------------------


def sample_training_rows(targets: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Indices of ``fraction`` of the labelled rows (at least one known label), drawn by a seeded permutation so
    that smaller fractions are subsets of larger ones. Where the draw lacks a positive (or negative) of a label,
    the next row of the permutation that has one is added; what was added, and what could not be, is reported."""
    if not 0 < fraction <= 1:
        raise ValueError(f"probe fractions must be in (0, 1], got {fraction}")
    labelled = np.flatnonzero((targets != UNKNOWN).any(axis=1))
    order = np.random.default_rng(seed).permutation(labelled)
    n_take = min(len(order), max(1, round(fraction * len(order))))
    chosen = list(order[:n_take])
    added: dict[int, list[str]] = {}
    missing: dict[int, list[str]] = {}
    for j in range(targets.shape[1]):
        for value, name in ((1, "positive"), (0, "negative")):
            if (targets[chosen, j] == value).any():
                continue
            extra = next((i for i in order[n_take:] if targets[i, j] == value and i not in chosen), None)
            if extra is None:
                missing.setdefault(j, []).append(name)
            else:
                chosen.append(extra)
                added.setdefault(j, []).append(name)
    return np.asarray(chosen, dtype=np.int64), {"n_labelled": int(len(labelled)), "n_drawn": int(n_take),
                                                 "n_added": len(chosen) - n_take, "added": added, "missing": missing}


def _fit_probe(features: np.ndarray, targets: np.ndarray, c: float) -> Any:
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    return probe.fit(features, targets)


def linear_probe(
    train_features: Any,
    train_targets: Any,
    test_features: Any,
    test_targets: Any,
    label_names: Sequence[str],
    val_features: Any = None,
    val_targets: Any = None,
    fractions: Sequence[float] = PROBE_FRACTIONS,
    seed: int = 0,
    n_bootstrap: int = 1000,
    c_grid: Sequence[float] = PROBE_C_GRID,
    test_study_ids: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """One logistic regression per label (standardised features, scikit-learn lbfgs) trained on ``fractions`` of
    the training rows (see :func:`sample_training_rows`) and scored on the test rows with
    :func:`classification_metrics`. ``C`` is chosen per label from ``c_grid`` by validation AUROC where the
    validation rows hold both classes, else 1.0. A label whose training sample has one class gets no probe
    (``not_trained``). ``test_study_ids`` (one per test row) makes the bootstrap resample studies. Returns
    ``{"fractions": {"0.01": {...}, ...}}``; each entry also holds ``test_scores``, an ``(N, L)`` array (NaN for
    labels without a probe) for plots."""
    label_names = list(label_names)
    train_features = np.asarray(train_features, dtype=np.float64)
    test_features = np.asarray(test_features, dtype=np.float64)
    train_targets = _check_targets(train_targets, len(label_names), "linear_probe (train)")
    test_targets = _check_targets(test_targets, len(label_names), "linear_probe (test)")
    has_val = val_features is not None and len(val_features) > 0
    if has_val:
        val_features = np.asarray(val_features, dtype=np.float64)
        val_targets = _check_targets(val_targets, len(label_names), "linear_probe (val)")
    out: dict[str, Any] = {"fractions": {}, "c_grid": list(c_grid), "classifier":
                           "StandardScaler + LogisticRegression (lbfgs, L2), one per label"}
    for fraction in fractions:
        rows, sampling = sample_training_rows(train_targets, fraction, seed)
        trained, not_trained, chosen_c = [], {}, {}
        test_scores = np.full((len(test_features), len(label_names)), np.nan)
        val_scores = np.full((len(val_features), len(label_names)), np.nan) if has_val else None
        counts = {}
        for j, name in enumerate(label_names):
            known = rows[train_targets[rows, j] != UNKNOWN]
            y = train_targets[known, j]
            counts[name] = {"n": int(len(y)), "n_positive": int(y.sum())}
            reason = "no training rows with a known label" if not len(y) else one_class_reason(y)
            if reason:
                not_trained[name] = reason
                continue
            c, c_source = 1.0, "default 1.0: no validation rows"
            probe = None
            if has_val:
                val_known = val_targets[:, j] != UNKNOWN
                val_reason = one_class_reason(val_targets[val_known, j])
                if val_reason:
                    c_source = f"default 1.0: validation {val_reason}"
                else:  # the C with the best validation AUROC; the first (strongest regularisation) on ties
                    probes = [_fit_probe(train_features[known], y, c) for c in c_grid]
                    aurocs = [roc_auc_score(val_targets[val_known, j], p.predict_proba(val_features[val_known])[:, 1])
                              for p in probes]
                    best = int(np.argmax(aurocs))
                    c, c_source, probe = float(c_grid[best]), "val AUROC", probes[best]
            probe = probe or _fit_probe(train_features[known], y, c)
            test_scores[:, j] = probe.predict_proba(test_features)[:, 1]
            if has_val:
                val_scores[:, j] = probe.predict_proba(val_features)[:, 1]
            chosen_c[name] = {"C": c, "source": c_source}
            trained.append(j)
        entry: dict[str, Any] = {
            "fraction": fraction, "n_train_rows": int(len(rows)),
            "sampling": {**{k: v for k, v in sampling.items() if k not in ("added", "missing")},
                         "added": {label_names[j]: v for j, v in sampling["added"].items()},
                         "missing": {label_names[j]: v for j, v in sampling["missing"].items()}},
            "train_counts": counts, "C": chosen_c, "not_trained": not_trained,
        }
        if trained:
            names = [label_names[j] for j in trained]
            entry["metrics"] = classification_metrics(
                test_scores[:, trained], test_targets[:, trained], names,
                val_scores[:, trained] if has_val else None, val_targets[:, trained] if has_val else None,
                n_bootstrap=n_bootstrap, seed=seed, study_ids=test_study_ids)
        entry["test_scores"] = test_scores  # (N, L) array, NaN for labels without a probe; not JSON
        out["fractions"][f"{fraction:g}"] = entry
    return out
