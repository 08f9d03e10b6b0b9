"""The transfer protocol's numbers (``tools/transfer.py``): per mode and label fraction, the mean of a metric over
seeds with its 95% t-interval, the paired difference pretrained - random init (same fraction, same seed) with
its interval, as a Markdown table and a plot of the metric against the label fraction."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PRETRAINED, RANDOM = "pretrained", "random"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample standard deviation and the Student-t interval of the mean over ``values`` (seeds); no
    interval from a single value."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    out: dict[str, Any] = {"n": int(x.size), "mean": float(x.mean()) if x.size else None, "std": None,
                           "ci_low": None, "ci_high": None}
    if x.size >= 2:
        std = float(x.std(ddof=1))
        half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1)) * std / math.sqrt(x.size)
        out.update(std=std, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def summarize(runs: Sequence[Mapping[str, Any]], modes: Sequence[str], fractions: Sequence[float],
              baseline_mode: str = "full") -> list[dict[str, Any]]:
    """One row per (mode, fraction): ``pretrained`` and ``random`` (the random-init baseline, trained in
    ``baseline_mode``) as :func:`mean_ci` of the runs' ``value``, and ``difference``: :func:`mean_ci` of
    pretrained - random paired by seed (seeds run in both only)."""
    def values(init: str, mode: str, fraction: float) -> dict[int, float]:
        return {run["seed"]: run["value"] for run in runs if run["init"] == init and run["mode"] == mode
                and math.isclose(run["fraction"], fraction) and run.get("value") is not None}

    rows = []
    for mode in modes:
        for fraction in fractions:
            pretrained, random = values(PRETRAINED, mode, fraction), values(RANDOM, baseline_mode, fraction)
            paired = sorted(set(pretrained) & set(random))
            rows.append({"mode": mode, "fraction": fraction, "seeds": sorted(pretrained),
                         PRETRAINED: mean_ci(list(pretrained.values())), RANDOM: mean_ci(list(random.values())),
                         "difference": mean_ci([pretrained[s] - random[s] for s in paired]), "paired_seeds": paired})
    return rows


def _cell(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "-"
    if stat["ci_low"] is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]"


def markdown_table(rows: Sequence[Mapping[str, Any]], metric: str, baseline_mode: str = "full") -> str:
    """The summary as a Markdown table: mean [95% CI] over seeds."""
    lines = [f"| mode | label fraction | seeds | pretrained {metric} | random init ({baseline_mode}) | "
             "pretrained - random (paired) |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['fraction']:g} | {len(row['seeds'])} | {_cell(row[PRETRAINED])} | "
                     f"{_cell(row[RANDOM])} | {_cell(row['difference'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, metric: str, title: str = "",
         baseline_mode: str = "full") -> None:
    """The metric against the label fraction (log axis), one line per mode from the pretrained model and one for
    random init, mean over seeds with the 95% interval as error bars; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    series = [(mode, PRETRAINED, f"pretrained, {mode}") for mode in dict.fromkeys(r["mode"] for r in rows)]
    series.append((rows[0]["mode"] if rows else baseline_mode, RANDOM, f"random init, {baseline_mode}"))
    for mode, init, label in series:
        points = [(r["fraction"], r[init]) for r in rows if r["mode"] == mode and r[init]["mean"] is not None]
        if not points:
            continue
        x = [f for f, _ in points]
        y = [s["mean"] for _, s in points]
        err = np.array([[s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]] if s["ci_low"] is not None else [0, 0]
                        for _, s in points]).T
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, linestyle="--" if init == RANDOM else "-")
    ax.set_xscale("log")
    fractions = sorted({r["fraction"] for r in rows})
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.set_xlabel("label fraction of the training split")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs label fraction (mean, 95% CI over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["PRETRAINED", "RANDOM", "markdown_table", "mean_ci", "plot", "summarize"]
