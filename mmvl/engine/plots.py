"""Training curves as PNGs for people to look at: loss, learning rate, validation metrics, throughput and the
heads' own scalars, drawn from a work dir's ``metrics.jsonl`` into ``WORK_DIR/plots/``.

``plot_run`` is called at the end of ``Trainer.fit`` (``train.plots``) and by ``tools/plot_run.py``;
``build_figures`` returns the matplotlib figures themselves, so tests can check what each one shows.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmvl.errors import DataError
from mmvl.utils import atomic_write, get_logger, read_jsonl

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = get_logger(__name__)

# TensorBoard's default scalar smoothing: a debiased exponential moving average over the logged points
SMOOTHING = 0.6
DPI = 110
FIG_WIDTH = 8.0  # inches; 880 px at DPI
PANEL_HEIGHT = 3.2  # inches per stacked panel, plus TITLE_HEIGHT for the figure's title
TITLE_HEIGHT = 0.6
LOG_SCALE_DECADES = 2.0  # a loss spanning more than this many powers of ten is drawn on a log axis

FIGURES = ("loss", "lr", "val", "throughput", "head_scalars")  # file stems, in the order plot_run returns them

# training-record keys that are not curves: the x axis, counters that only ever grow, and AMP's loss scale
NOT_PLOTTED = {"step", "epoch", "skipped_samples", "skipped_steps", "overflow_steps", "loss_scale"}
# training-record keys with a figure of their own; every other one (a head's "clip/logit_scale") goes into
# head_scalars.png
TRAINER_SCALARS = {"loss", "grad_norm", "lr", "samples_per_s", "batch_time", "data_time"}


@dataclass
class Series:
    """One metric's finite values against step (sorted by step; a step logged twice keeps its last value)."""

    key: str
    steps: list[int]
    values: list[float]
    dropped: int = 0  # non-finite values left out


def smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: ``ema = weight * ema + (1 - weight) * value`` from ``ema = 0``, divided by
    ``1 - weight ** n`` (n finite values so far) so the start is not pulled towards zero. A non-finite value
    is passed through and does not move the average."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    smoothed, ema, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        ema = weight * ema + (1.0 - weight) * value
        count += 1
        smoothed.append(ema / (1.0 - weight**count))
    return smoothed


def wants_log_scale(values: Iterable[float], decades: float = LOG_SCALE_DECADES) -> bool:
    """True when every value is positive and the largest is more than ``10 ** decades`` times the smallest."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) <= 0.0:
        return False
    return math.log10(max(finite) / min(finite)) > decades


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a crash mid-append) is left out by ``read_jsonl``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file; a training run writes it into its work dir (tools/train.py "
                              "--work-dir WORK_DIR): check the path")
    try:
        records = read_jsonl(path)
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(path, f"cannot be read as JSON lines ({err}); only the last line may be torn") from None
    records = [r for r in records if isinstance(r, dict)]
    if not records:
        raise DataError(path, "holds no records; the run stopped before its first log "
                              "(train.log_interval) or validation")
    return records


def series(records: Iterable[Mapping[str, Any]], key: str) -> Series:
    """``key`` against ``step`` over ``records``, its non-finite (NaN, inf) and non-numeric values left out."""
    by_step: dict[int, float] = {}
    dropped = 0
    for record in records:
        if key not in record or not isinstance(record.get("step"), int):
            continue
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            dropped += 1
            by_step.pop(record["step"], None)
            continue
        by_step[record["step"]] = float(value)
    steps = sorted(by_step)
    return Series(key, steps, [by_step[s] for s in steps], dropped)


def build_figures(records: Sequence[Mapping[str, Any]], run_name: str,
                  weight: float = SMOOTHING) -> dict[str, Figure]:
    """The figures of a run's records, by file stem (those of :data:`FIGURES` with data); metrics without a
    single finite value are left out and logged."""
    validation = [r for r in records if any(str(key).startswith("val/") for key in r)]
    training = [r for r in records if not any(str(key).startswith("val/") for key in r)]
    train_keys = _numeric_keys(training) - NOT_PLOTTED
    val_keys = sorted((key for key in _numeric_keys(validation) if key.startswith("val/")), key=_natural)
    curves = {key: s for key in sorted(train_keys, key=_natural) if (s := _finite(training, key))}
    val_curves = {key: s for key in val_keys if (s := _finite(validation, key))}

    figures: dict[str, Figure] = {}
    head_losses = [s for key, s in curves.items() if "/" in key and _is_loss(key)]  # "clip/loss", "mae/loss"
    if "loss" in curves or head_losses:
        figures["loss"] = _loss_figure(curves.get("loss"), head_losses, curves.get("grad_norm"), run_name, weight)
    if "lr" in curves:
        fig, (ax,) = _figure(f"{run_name}: learning rate")
        ax.plot(curves["lr"].steps, curves["lr"].values, color="C0", linewidth=1.8, label="lr")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        _finish(ax, "learning rate")
        figures["lr"] = fig
    if val_curves:
        figures["val"] = _val_figure(list(val_curves.values()), run_name)
    if "samples_per_s" in curves:
        figures["throughput"] = _throughput_figure(
            curves["samples_per_s"], [curves[k] for k in ("batch_time", "data_time") if k in curves], run_name, weight)
    scalars = [s for key, s in curves.items() if key not in TRAINER_SCALARS and not ("/" in key and _is_loss(key))]
    if scalars:
        figures["head_scalars"] = _scalars_figure(scalars, run_name, weight)
    return figures


def plot_run(work_dir: str | os.PathLike, out: str | os.PathLike | None = None,
             weight: float = SMOOTHING) -> list[Path]:
    """Draw ``WORK_DIR/metrics.jsonl`` as PNGs in ``out`` (default ``WORK_DIR/plots``), each written atomically;
    returns their paths. Raises :class:`~mmvl.errors.DataError` naming the file when it is missing or empty."""
    work_dir = Path(work_dir)
    records = read_metrics(work_dir / "metrics.jsonl")
    out = work_dir / "plots" if out is None else Path(out)
    # matplotlib is imported here, not at the top: it takes about a second, and training never needs it before
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figures = build_figures(records, work_dir.resolve().name, weight)
    if not figures:
        logger.warning("%s: no metric has a finite value; no plots drawn", work_dir / "metrics.jsonl")
    paths = []
    for stem in FIGURES:
        if stem in figures:
            canvas = FigureCanvasAgg(figures[stem])
            paths.append(atomic_write(out / f"{stem}.png", lambda handle, c=canvas: c.print_png(handle)))
    return paths


def figure_size(panels: int) -> tuple[float, float]:
    """Inches (width, height) of a figure of ``panels`` stacked panels."""
    return FIG_WIDTH, TITLE_HEIGHT + PANEL_HEIGHT * panels


def _natural(key: str) -> list[Any]:
    """Sort key that puts R@5 before R@10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def _is_loss(key: str) -> bool:
    return key.rsplit("/", 1)[-1].endswith("loss")


def _numeric_keys(records: Iterable[Mapping[str, Any]]) -> set[str]:
    return {key for record in records for key, value in record.items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


def _finite(records: Sequence[Mapping[str, Any]], key: str) -> Series | None:
    found = series(records, key)
    if not found.values:
        logger.info("plots: %s left out, none of its %d values is finite", key, found.dropped)
        return None
    if found.dropped:
        logger.info("plots: %s: %d non-finite values left out", key, found.dropped)
    return found


def _figure(title: str, panels: int = 1, columns: int = 1) -> tuple[Figure, list[Axes]]:
    # the Agg canvas directly, not pyplot: no global backend switch and no figure registry that could leak
    # figures when the trainer calls this in-process
    from matplotlib.figure import Figure

    rows = math.ceil(panels / columns)
    fig = Figure(figsize=figure_size(rows), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize="large")
    axes = fig.subplots(rows, columns, sharex=True, squeeze=False).ravel().tolist()
    for unused in axes[panels:]:
        unused.set_visible(False)
    return fig, axes[:panels]


def _finish(ax: Axes, ylabel: str, title: str | None = None, log_y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.tick_params(labelbottom=True)  # shared x axes hide inner tick labels; every panel keeps its steps
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(left=0)  # every figure from the run's start, so validation points sit where they happened
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(True, which="major", alpha=0.3)
    if len(ax.get_legend_handles_labels()[1]) > 3:  # many curves: beside the panel, where it hides none
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize="small", loc="best")


def _raw_and_smoothed(ax: Axes, curve: Series, color: str, weight: float, label: str | None = None) -> None:
    label = label or curve.key
    ax.plot(curve.steps, curve.values, linestyle="none", marker="o", markersize=2.5, alpha=0.35, color=color,
            label=f"{label} (raw)")
    ax.plot(curve.steps, smooth(curve.values, weight), color=color, linewidth=1.8,
            label=f"{label} (EMA {weight:g})")


def _same(a: Series, b: Series) -> bool:
    return a.steps == b.steps and a.values == b.values


def _loss_figure(loss: Series | None, head_losses: list[Series], grad_norm: Series | None, run_name: str,
                 weight: float) -> Figure:
    """The total loss raw and smoothed; each head's loss smoothed (a head loss equal to the total, as with one
    head, is named in the label instead); the gradient norm before clipping below."""
    fig, axes = _figure(f"{run_name}: training loss", panels=2 if grad_norm else 1)
    ax = axes[0]
    shown = [loss] if loss else []
    label = "loss"
    same = [h.key for h in head_losses if loss and _same(h, loss)]
    if same:
        label = f"loss = {' = '.join(same)}"
    if loss:
        _raw_and_smoothed(ax, loss, "C0", weight, label)
    for index, head in enumerate(h for h in head_losses if h.key not in same):
        ax.plot(head.steps, smooth(head.values, weight), color=f"C{index + 1}", linewidth=1.2,
                label=f"{head.key} (EMA {weight:g})")
        shown.append(head)
    log_y = wants_log_scale(v for s in shown for v in s.values)
    _finish(ax, "loss" + (" (log scale)" if log_y else ""), log_y=log_y)
    if grad_norm:
        log_g = wants_log_scale(grad_norm.values)
        _raw_and_smoothed(axes[1], grad_norm, "C3", weight, "grad_norm")
        _finish(axes[1], "gradient norm" + (" (log scale)" if log_g else ""), "gradient norm before clipping",
                log_y=log_g)
    return fig


def _val_figure(curves: list[Series], run_name: str) -> Figure:
    """Validation losses in one panel, metrics within [0, 1] (Recall@K, accuracy, AUROC) in another on a fixed
    0..1 axis, anything else (e.g. a logit scale) in a third; curves identical to one already drawn share its
    line and label."""
    groups: dict[str, list[Series]] = {"losses": [], "metrics in [0, 1]": [], "other metrics": []}
    for curve in curves:
        if _is_loss(curve.key):
            groups["losses"].append(curve)
        elif all(0.0 <= v <= 1.0 for v in curve.values):
            groups["metrics in [0, 1]"].append(curve)
        else:
            groups["other metrics"].append(curve)
    groups = {name: members for name, members in groups.items() if members}
    fig, axes = _figure(f"{run_name}: validation", panels=len(groups))
    for ax, (name, members) in zip(axes, groups.items(), strict=True):
        drawn: list[tuple[Series, list[str]]] = []
        for curve in members:
            twin = next((labels for first, labels in drawn if _same(first, curve)), None)
            if twin is not None:
                twin.append(curve.key)
            else:
                drawn.append((curve, [curve.key]))
        for index, (curve, labels) in enumerate(drawn):
            ax.plot(curve.steps, curve.values, marker="o", markersize=4, linewidth=1.4, color=f"C{index % 10}",
                    linestyle="-" if index < 10 else "--", label="\n= ".join(labels))  # narrow legend
        if name == "metrics in [0, 1]":
            ax.set_ylim(-0.02, 1.02)
        log_y = name == "losses" and wants_log_scale(v for c, _ in drawn for v in c.values)
        ylabel = {"losses": "loss", "metrics in [0, 1]": "metric"}.get(name, "value")
        _finish(ax, ylabel + (" (log scale)" if log_y else ""), f"validation {name}", log_y=log_y)
    return fig


def _throughput_figure(samples_per_s: Series, times: list[Series], run_name: str, weight: float) -> Figure:
    fig, axes = _figure(f"{run_name}: throughput", panels=2 if times else 1)
    _raw_and_smoothed(axes[0], samples_per_s, "C2", weight, "samples/s")
    _finish(axes[0], "samples / s", "training samples per second")
    if times:
        for index, curve in enumerate(times):
            _raw_and_smoothed(axes[1], curve, f"C{index + 4}", weight)
        _finish(axes[1], "seconds", "time per step (batch_time) and waiting for data (data_time)")
    return fig


def _scalars_figure(curves: list[Series], run_name: str, weight: float) -> Figure:
    """One panel per head scalar (logit scale, accuracy, mask ratio...): their ranges differ too much to share."""
    columns = 2 if len(curves) > 3 else 1
    fig, axes = _figure(f"{run_name}: head scalars", panels=len(curves), columns=columns)
    for index, (ax, curve) in enumerate(zip(axes, curves, strict=True)):
        _raw_and_smoothed(ax, curve, f"C{index % 10}", weight)
        _finish(ax, curve.key.rsplit("/", 1)[-1], curve.key)
    return fig
