"""Scores per study from scores per image: a manifest row is a study of one or more views, and a study is scored by
the mean (or max) of its frontal views' outputs (all its views when none is frontal or named), as radiologists read
the frontal film first and MIMIC-CXR/CheXpert evaluations score studies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmvl.data.manifest import is_frontal
from mmvl.errors import ConfigError

AGGREGATES = ("mean", "max")


def study_key(item: Any) -> tuple:
    """The study an item belongs to: its study id, else its manifest row, else its own path."""
    if getattr(item, "study_id", None):
        return ("study", item.study_id)
    if getattr(item, "row", None) is not None:
        return ("row", item.row)
    return ("path", item.path)


def study_groups(items: Sequence[Any], views: str = "frontal") -> list[list[int]]:
    """Indices of ``items`` per study, in the order studies first appear; ``views="frontal"`` keeps a study's
    frontal views where it has any, ``"all"`` every view."""
    if views not in ("frontal", "all"):
        raise ConfigError(f"views must be 'frontal' or 'all', got {views!r}")
    groups: dict[tuple, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(study_key(item), []).append(index)
    if views == "all":
        return list(groups.values())
    chosen = []
    for indices in groups.values():
        frontal = [i for i in indices if is_frontal(getattr(items[i], "view", None))]
        chosen.append(frontal or indices)
    return chosen


def aggregate(values: np.ndarray, groups: Sequence[Sequence[int]], how: str = "mean") -> np.ndarray:
    """``values`` (one row per item) reduced to one row per group by ``how`` (``mean`` or ``max``)."""
    if how not in AGGREGATES:
        raise ConfigError(f"study aggregate must be one of {AGGREGATES}, got {how!r}")
    values = np.asarray(values)
    reduce = np.mean if how == "mean" else np.max
    if not groups:
        return values[:0]
    return np.stack([reduce(values[list(indices)], axis=0) for indices in groups])


def first_of_each(items: Sequence[Any]) -> list[Any]:
    """One item per study: its first frontal view (its first image when none is frontal), for work that reads one
    image per study (report generation)."""
    return [items[indices[0]] for indices in study_groups(items)]
