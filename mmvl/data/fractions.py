"""Label fractions (``data.label_fraction``): seeded, nested, study-level subsets of a training split for
label-efficiency comparisons (ConVIRT's 1% / 10%, BenchX's 1/10/100% splits).

One seeded permutation of the labelled studies decides every fraction: a fraction takes its first
``round(fraction * N)`` studies, then, label by label, the next study of the permutation holding a positive
where the draw holds none. So a smaller fraction's studies are always among a larger one's (nested), the
subset depends on the seed only (the same for every mode and training seed: comparisons are paired), and
every label with a positive in the split has one in the subset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def study_key(row: Mapping[str, Any]) -> str:
    """A manifest row's study: its ``study_id``, else its first image path."""
    study = row.get("study_id")
    if study not in (None, ""):
        return str(study)
    image = row["image"]
    return str(image[0] if isinstance(image, list | tuple) else image)


def study_labels(rows: Sequence[Mapping[str, Any]], label_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per labelled study, its labels ``(L,)``: 1 if any of its rows is positive, else 0 if one is negative,
    else -1 (unknown). Studies without any known label are left out."""
    studies: dict[str, np.ndarray] = {}
    for row in rows:
        labels = row.get("labels") or {}
        values = np.array([labels.get(name) if labels.get(name) in (0, 1) else -1 for name in label_names])
        key = study_key(row)
        studies[key] = np.maximum(studies[key], values) if key in studies else values
    return {key: values for key, values in studies.items() if (values >= 0).any()}


def label_fraction_subset(rows: Sequence[Mapping[str, Any]], label_names: Sequence[str], fraction: float,
                          seed: int = 0) -> dict[str, Any]:
    """The studies of ``fraction`` of the labelled studies in ``rows`` (see the module docstring).

    Returns ``{"fraction", "seed", "n_studies", "n_drawn", "study_ids" (permutation order), "added" (label ->
    study added for its positive), "missing" (labels with no positive in the split), "positives" (label ->
    positive studies in the subset)}``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"data.label_fraction must be in (0, 1], got {fraction!r}")
    studies = study_labels(rows, label_names)
    keys = sorted(studies)
    if not keys:
        raise ValueError("data.label_fraction: the training split has no study with a known label")
    order = [keys[i] for i in np.random.default_rng(int(seed)).permutation(len(keys))]
    n_drawn = min(len(order), max(1, round(fraction * len(order))))
    chosen = list(order[:n_drawn])
    added: dict[str, str] = {}
    missing: list[str] = []
    for j, name in enumerate(label_names):
        if any(studies[key][j] == 1 for key in chosen):
            continue
        extra = next((key for key in order[n_drawn:] if studies[key][j] == 1 and key not in chosen), None)
        if extra is None:
            missing.append(name)
        else:
            chosen.append(extra)
            added[name] = extra
    positives = {name: int(sum(studies[key][j] == 1 for key in chosen)) for j, name in enumerate(label_names)}
    return {"fraction": float(fraction), "seed": int(seed), "n_studies": len(keys), "n_drawn": n_drawn,
            "study_ids": chosen, "added": added, "missing": missing, "positives": positives}


__all__ = ["label_fraction_subset", "study_key", "study_labels"]
