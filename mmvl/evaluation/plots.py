"""Figures for classification results: a ROC curve per label and a reliability diagram with a histogram of the
predicted probabilities. Drawn on matplotlib ``Figure`` objects with the Agg canvas, so no display is needed and
pyplot's global state (and the user's chosen backend) is left alone."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from mmvl.evaluation.metrics import UNKNOWN

CALIBRATION_BINS = 10


def _figure(width: float, height: float, rows: int = 1, height_ratios: Sequence[float] | None = None) -> tuple:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, gridspec_kw={"height_ratios": height_ratios} if height_ratios else None)
    return figure, axes


def file_stem(label: str) -> str:
    """A label as a file name part: ``"pleural effusion"`` -> ``"pleural_effusion"``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "label"


def _ci_text(entry: Mapping[str, Any], key: str, confidence: float) -> str:
    ci = entry.get(f"{key}_ci")
    return f" ({100 * confidence:g}% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


def plot_roc_curves(scores: np.ndarray, targets: np.ndarray, label_names: Sequence[str],
                    metrics: Mapping[str, Any], out_dir: str | os.PathLike, title: str = "") -> list[Path]:
    """``roc_<label>.png`` for every label that ``metrics`` (from ``classification_metrics``) evaluated: the ROC
    curve over the rows with a known label, its AUROC and interval in the legend, and the chance diagonal."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    confidence = metrics["bootstrap"]["confidence"]
    written = []
    for j, label in enumerate(label_names):
        entry = metrics["labels"][label]
        if "auroc" not in entry:
            continue
        known = targets[:, j] != UNKNOWN
        fpr, tpr, _ = roc_curve(targets[known, j], scores[known, j])
        figure, ax = _figure(4.5, 4.5)
        ax.plot(fpr, tpr, lw=2, label=f"AUROC {entry['auroc']:.3f}{_ci_text(entry, 'auroc', confidence)}")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title=f"{title + ': ' if title else ''}{label} (n={entry['n']}, {entry['n_positive']} positive)")
        ax.title.set_fontsize(9)
        ax.legend(loc="lower right", fontsize=8)
        path = out_dir / f"roc_{file_stem(label)}.png"
        figure.savefig(path, dpi=100)
        written.append(path)
    return written


def plot_calibration(scores: np.ndarray, targets: np.ndarray, label_names: Sequence[str],
                     out_dir: str | os.PathLike, title: str = "") -> Path:
    """``calibration.png``: fraction positive against mean predicted probability in 10 equal-width bins, per
    label and pooled over all known label-rows (empty bins left out), above a histogram of the probabilities."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure, (ax, hist) = _figure(5.5, 6.5, rows=2, height_ratios=(3, 1))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    known = targets != UNKNOWN
    for j, label in enumerate(label_names):
        y = targets[known[:, j], j]
        if len(np.unique(y)) == 2:  # calibration_curve needs both classes
            positive, predicted = calibration_curve(y, scores[known[:, j], j], n_bins=CALIBRATION_BINS)
            ax.plot(predicted, positive, marker="o", ms=3, lw=1, alpha=0.7, label=label)
    pooled_y, pooled_scores = targets[known], scores[known]
    if len(np.unique(pooled_y)) == 2:
        positive, predicted = calibration_curve(pooled_y, pooled_scores, n_bins=CALIBRATION_BINS)
        ax.plot(predicted, positive, marker="s", color="black", lw=2, label="all labels")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="fraction positive",
           title=f"{title + ': ' if title else ''}reliability ({CALIBRATION_BINS} bins)")
    ax.legend(loc="upper left", fontsize=7)
    hist.hist(pooled_scores, bins=np.linspace(0, 1, CALIBRATION_BINS + 1), color="tab:blue", rwidth=0.9)
    hist.set(xlim=(0, 1), xlabel="predicted probability", ylabel="label-rows")
    path = out_dir / "calibration.png"
    figure.savefig(path, dpi=100)
    return path
