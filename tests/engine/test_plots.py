"""mmvl.engine.plots: the PNGs a run leaves in WORK_DIR/plots, and what each figure actually shows."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmvl.engine.plots import (
    DPI,
    FIGURES,
    build_figures,
    figure_size,
    plot_run,
    read_metrics,
    smooth,
    wants_log_scale,
)
from mmvl.errors import DataError, MMVLError

STEPS = 300
WARMUP, PEAK_LR = 20, 1e-3
NAN_STEP = 150  # the loss (and grad norm) logged as NaN there, as after an overflow
VAL_STEPS = (150, 300)


def warmup_cosine(step: int) -> float:
    if step <= WARMUP:
        return PEAK_LR * step / WARMUP
    return 0.5 * PEAK_LR * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def run_records(seed: int = 0) -> list[dict]:
    """What the trainer logs with train.log_interval=1 for two heads (CLIP and MAE), validated twice: a noisy
    loss decaying from ~10 to ~0.035 (over two decades), a warmup-cosine learning rate."""
    rng = np.random.default_rng(seed)
    records = []
    for step in range(1, STEPS + 1):
        loss = (10 * math.exp(-step / 50) + 0.01) * float(np.exp(rng.normal(0, 0.15)))
        record = {"step": step, "epoch": step // 100, "lr": warmup_cosine(step), "batch_time": 0.2,
                  "samples_per_s": 160 + float(rng.normal(0, 5)), "skipped_samples": 0, "skipped_steps": 0,
                  "overflow_steps": 0, "clip/loss": 0.7 * loss, "clip/logit_scale": 14.3 + step / 100,
                  "clip/i2t_acc": min(1.0, step / STEPS), "clip/broken": math.nan, "mae/loss": 0.3 * loss,
                  "mae/mask_ratio": 0.75, "loss": loss, "grad_norm": 5 * math.exp(-step / 80) + 0.1,
                  "data_time": 0.01}
        if step == NAN_STEP:
            record["loss"] = record["grad_norm"] = math.nan
        records.append(record)
        if step in VAL_STEPS:
            recall = step / STEPS
            records.append({"step": step, "val/clip/loss": 2.0 - recall, "val/mae/loss": 0.5 - recall / 10,
                            "val/loss": 2.5 - 1.1 * recall, "val/clip/logit_scale": 14.3 + step / 100,
                            "val/i2t_R@1": 0.2 * recall, "val/i2t_R@5": 0.5 * recall, "val/i2t_R@10": 0.7 * recall,
                            "val/t2i_R@1": 0.25 * recall, "val/t2i_R@5": 0.55 * recall,
                            "val/t2i_R@10": 0.75 * recall})
    return records


def write_metrics(work: Path, records: list[dict], tail: str = "") -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)  # json writes NaN as NaN, as torch logs
    return path


def lines_by_label(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()}


def hand_ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased EMA, written out step by step."""
    out, ema = [], 0.0
    for n, value in enumerate(values, 1):
        ema = weight * ema + (1 - weight) * value
        out.append(ema / (1 - weight**n))
    return out


def test_smooth_is_tensorboards_debiased_ema():
    assert smooth([1.0, 2.0, 3.0], 0.6) == pytest.approx([1.0, 1.04 / 0.64, 1.824 / 0.784])
    assert smooth([5.0, 5.0, 5.0], 0.9) == pytest.approx([5.0, 5.0, 5.0])  # no pull towards the zero start
    assert smooth([1.0, 4.0], 0.0) == [1.0, 4.0]
    out = smooth([1.0, math.nan, 3.0], 0.6)  # NaN passes through and does not move the average
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx(1.44 / 0.64)
    with pytest.raises(ValueError, match="smoothing weight"):
        smooth([1.0], 1.0)


def test_log_scale_only_beyond_two_decades():
    assert wants_log_scale([10.0, 0.05])  # 2.3 decades
    assert not wants_log_scale([10.0, 0.2])  # 1.7
    assert not wants_log_scale([10.0, 0.0, 0.001])  # zero cannot be drawn on a log axis
    assert wants_log_scale([10.0, math.nan, 0.01])
    assert not wants_log_scale([])


def test_plot_run_writes_the_pngs(tmp_path):
    work = tmp_path / "cxr_clip_run"
    write_metrics(work, run_records())
    paths = plot_run(work)
    assert paths == [work / "plots" / f"{stem}.png" for stem in FIGURES]
    rows = {"loss": 2, "lr": 1, "val": 3, "throughput": 2, "head_scalars": 3}
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = figure_size(rows[path.stem])
            assert image.size == (round(width * DPI), round(height * DPI)), path.name
            image.verify()
    assert sorted(p.name for p in (work / "plots").iterdir()) == sorted(p.name for p in paths)  # no temp files left

    other = plot_run(work, out=tmp_path / "elsewhere")
    assert [p.parent for p in other] == [tmp_path / "elsewhere"] * len(FIGURES)


def test_loss_figure_raw_points_smoothed_line_and_log_axis():
    records = run_records()
    fig = build_figures(records, "cxr_clip_run")["loss"]
    loss_ax, grad_ax = fig.axes
    assert fig.get_suptitle() == "cxr_clip_run: training loss"
    assert loss_ax.get_xlabel() == "step" and loss_ax.get_ylabel().startswith("loss")
    assert loss_ax.get_yscale() == "log"  # ~10 down to ~0.035
    lines = lines_by_label(loss_ax)
    raw, smoothed = lines["loss (raw)"], lines["loss (EMA 0.6)"]
    finite = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
    assert list(raw.get_xdata()) == [r["step"] for r in finite]  # the NaN step is left out
    assert NAN_STEP not in raw.get_xdata() and len(finite) == STEPS - 1
    assert list(raw.get_ydata()) == [r["loss"] for r in finite]
    assert np.allclose(smoothed.get_ydata(), hand_ema([r["loss"] for r in finite], 0.6))
    # two heads: each head's smoothed loss is drawn too
    assert {"clip/loss (EMA 0.6)", "mae/loss (EMA 0.6)"} <= set(lines)
    assert loss_ax.get_legend() is not None
    assert grad_ax.get_title() == "gradient norm before clipping"
    assert grad_ax.get_yscale() == "linear"  # 5.1 to 0.15: under two decades

    # the axis is decided over every curve of the panel, head losses included
    short = [{"step": s, "loss": 2.7 + 0.1 * math.sin(s), "clip/loss": 2.0} for s in range(1, STEPS + 1)]
    short_fig = build_figures(short, "run", weight=0.9)["loss"]
    assert short_fig.axes[0].get_yscale() == "linear"
    assert "loss (EMA 0.9)" in lines_by_label(short_fig.axes[0])


def test_one_head_loss_equal_to_the_total_is_named_not_drawn_twice():
    records = [{"step": s, "loss": 3.0 / s, "clip/loss": 3.0 / s} for s in range(1, 11)]
    labels = set(lines_by_label(build_figures(records, "run")["loss"].axes[0]))
    assert labels == {"loss = clip/loss (raw)", "loss = clip/loss (EMA 0.6)"}


def test_lr_and_throughput_figures():
    records = run_records()
    figures = build_figures(records, "run")
    (lr_ax,) = figures["lr"].axes
    lr = lines_by_label(lr_ax)["lr"]
    assert list(lr.get_ydata()) == [warmup_cosine(s) for s in range(1, STEPS + 1)]
    assert lr.get_xdata()[int(np.argmax(lr.get_ydata()))] == WARMUP  # peak at the end of the warmup
    assert lr_ax.get_ylabel() == "learning rate"
    samples_ax, time_ax = figures["throughput"].axes
    assert samples_ax.get_ylabel() == "samples / s"
    assert {"batch_time (raw)", "data_time (EMA 0.6)"} <= set(lines_by_label(time_ax))


def test_val_figure_losses_and_unit_interval_metrics_in_separate_panels():
    records = run_records()
    fig = build_figures(records, "run")["val"]
    losses, unit, other = fig.axes
    assert losses.get_title() == "validation losses"
    assert set(lines_by_label(losses)) == {"val/clip/loss", "val/mae/loss", "val/loss"}
    assert unit.get_title() == "validation metrics in [0, 1]"
    assert unit.get_ylim() == (-0.02, 1.02)
    recall = lines_by_label(unit)
    assert list(recall) == ["val/i2t_R@1", "val/i2t_R@5", "val/i2t_R@10",  # R@5 before R@10
                            "val/t2i_R@1", "val/t2i_R@5", "val/t2i_R@10"]
    assert list(recall["val/i2t_R@5"].get_xdata()) == list(VAL_STEPS)
    assert list(recall["val/i2t_R@5"].get_ydata()) == [0.5 * s / STEPS for s in VAL_STEPS]
    assert set(lines_by_label(other)) == {"val/clip/logit_scale"}  # ~14: neither a loss nor in [0, 1]


def test_head_scalars_and_non_finite_metrics(caplog):
    caplog.set_level(logging.INFO, logger="mmvl")
    fig = build_figures(run_records(), "run")["head_scalars"]
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["clip/i2t_acc", "clip/logit_scale", "mae/mask_ratio"]  # clip/broken: NaN everywhere
    assert "clip/broken left out, none of its 300 values is finite" in caplog.text
    assert "loss: 1 non-finite values left out" in caplog.text

    many = [{"step": s, **{f"head{i}/scalar": s * (i + 1) for i in range(5)}} for s in range(1, 6)]
    fig = build_figures(many, "run")["head_scalars"]  # more than 3: two columns, the sixth cell hidden
    assert [ax.get_visible() for ax in fig.axes] == [True] * 5 + [False]
    assert tuple(fig.get_size_inches()) == figure_size(3)


def test_a_torn_last_line_is_skipped(tmp_path):
    records = run_records()
    write_metrics(tmp_path, records, tail='{"step": 301, "loss": 0.0')  # the crash cut the last append
    read = read_metrics(tmp_path / "metrics.jsonl")
    assert len(read) == len(records) and read[-1]["step"] == STEPS
    assert len(plot_run(tmp_path)) == len(FIGURES)


def test_only_non_finite_values_draw_nothing_and_do_not_crash(tmp_path):
    write_metrics(tmp_path, [{"step": s, "loss": math.nan} for s in range(1, 4)])
    assert plot_run(tmp_path) == []


@pytest.mark.parametrize("content", [None, "", "\n\n", '{"step": 1, "lo'])
def test_missing_or_empty_metrics_file_is_an_error_naming_it(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(DataError) as caught:
        plot_run(tmp_path)
    assert isinstance(caught.value, MMVLError)
    assert str(tmp_path / "metrics.jsonl") in str(caught.value)
    assert not (tmp_path / "plots").exists()


def test_a_damaged_middle_line_is_an_error_naming_the_file(tmp_path):
    path = write_metrics(tmp_path, run_records()[:5], tail="")
    path.write_text(path.read_text().replace('"step": 3,', '"step": 3', 1))
    with pytest.raises(DataError, match="metrics.jsonl: cannot be read as JSON lines"):
        plot_run(tmp_path)
