"""benchmarks/bench_ddp.py trains a tiny CLIP model through tools/train.py under torchrun with 1 and 2 processes
(gloo, CPU) and reports every figure (no speed thresholds)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import load_bench

WORLD_FIGURES = ("samples_per_s", "samples_per_s_per_process", "images_per_s", "efficiency", "ms_per_step",
                 "trainer_samples_per_s", "trainer_batch_ms", "data_ms", "peak_rss_mb_max", "tflops_per_s_per_process")


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_bench_ddp_reports_every_figure(tmp_path, capsys):
    bench = load_bench("bench_ddp")
    out_json = tmp_path / "ddp.json"
    report = bench.main(["--quick", "--device", "cpu", "--flops", "--timeout", "120", "--work-dir", str(tmp_path),
                         "--out-json", str(out_json), "--independent"])
    out = capsys.readouterr().out
    printed = [line for line in out.splitlines() if line.startswith("{")]
    assert len(printed) == 1
    line = json.loads(printed[0])
    assert line == report == json.loads(out_json.read_text(encoding="utf-8"))
    config = line["config"]
    assert line["bench"] == "ddp" and config["quick"] and config["world_sizes"] == [1, 2]
    assert config["backend"] == "gloo" and config["strategy"] == "ddp" and config["threads"] == 1
    assert config["batch_size"] == 4 and config["steps"] == 2 and config["warmup"] == 1
    for key in ("params", "train_rows", "flops_per_sample", "cpu_count"):
        assert _positive(config[key]), key
    assert config["load_avg_start"] >= 0 and config["load_avg_end"] >= 0

    runs = line["runs"]
    assert [(run["world"], run["independent"]) for run in runs] == [(1, False), (2, False), (2, True)]
    assert "2 ind." in line["summary"] and "\n   2 ind." in out  # 2 processes alone at once: the contention row
    for run in runs:
        assert "error" not in run, run.get("stderr_tail")
        world = run["world_size"]
        assert run["finished"] and run["torch_threads"] == [1] * world
        assert run["global_batch"] == 4 * world
        assert len(run["step_ms"]) == 2 and all(ms > 0 for ms in run["step_ms"])
        assert len(run["peak_rss_mb"]) == world and all(_positive(mb) for mb in run["peak_rss_mb"])
        for key in ("cpu_util", "cpu_ms_per_step"):
            assert len(run[key]) == world and all(_positive(value) for value in run[key]), key
        assert all(peak >= built > 0 for peak, built in zip(run["peak_rss_mb"], run["built_rss_mb"]))
        # samples/s and ms/step come from the same window: global batch x 1000 / ms
        assert run["samples_per_s"] * run["ms_per_step"] == pytest.approx(4 * world * 1000, rel=0.01)
        assert math.isfinite(run["loss_first"]) and math.isfinite(run["loss_last"])

    summary = line["summary"]
    assert set(summary) == {"1", "2", "2 ind."}
    for key, facts in summary.items():
        world = key.split()[0]
        for figure in WORLD_FIGURES:
            assert _positive(facts[figure]), (world, figure)
        for key in ("peak_rss_mb_per_process", "cpu_util_per_process", "cpu_ms_per_step_per_process"):
            assert len(facts[key]) == int(world) and all(_positive(value) for value in facts[key]), (world, key)
        assert facts["samples_per_s_per_process"] == pytest.approx(facts["samples_per_s"] / int(world), rel=1e-3)
        assert facts["mfu"] is None  # no peak FLOP/s for a CPU
    assert summary["2 ind."]["efficiency"] == pytest.approx(
        summary["2 ind."]["samples_per_s"] / (2 * summary["1"]["samples_per_s"]), abs=1e-3)
    independent = next(run for run in runs if run["independent"])
    assert "N ind.:" in out and independent["finished"] and len(independent["peak_rss_mb"]) == 2
    assert summary["1"]["efficiency"] == 1.0
    assert summary["2"]["efficiency"] == pytest.approx(  # rounded to 3 decimals
        summary["2"]["samples_per_s"] / (2 * summary["1"]["samples_per_s"]), abs=1e-3)

    assert "samples/s" in out and "effic." in out and "peak RSS MB/proc" in out and "load average" in out
    assert "CPU ms/step/proc" in out
    assert "compete with whatever else runs" in out  # 2 processes x 1 thread on a 2-core machine, or fewer cores
    assert list(tmp_path.iterdir()) == [out_json]  # the scratch data and runs were removed


def test_summary_efficiency_and_mfu():
    """The CUDA-only figures from their parts: efficiency against 1 process, TFLOP/s per process and MFU."""
    bench = load_bench("bench_ddp")

    def run(world: int, samples_per_s: float) -> dict:
        return {"world": world, "world_size": world, "samples_per_s": samples_per_s, "ms_per_step": 1.0,
                "trainer_samples_per_s": samples_per_s, "trainer_batch_ms": 1.0, "data_ms": 0.1,
                "peak_rss_mb": [100.0] * world, "cpu_util": [0.9] * world, "cpu_ms_per_step": [0.9] * world}

    runs = [run(1, 100.0), run(4, 360.0), run(1, 120.0), run(4, 400.0)]
    summary = bench.summarize(runs, [1, 4], flops_per_sample=1e12, peak=989e12)
    assert summary["1"]["samples_per_s"] == 110.0 and summary["4"]["samples_per_s"] == 380.0  # medians
    assert summary["4"]["efficiency"] == pytest.approx(380 / 440, abs=1e-3)
    assert summary["4"]["samples_per_s_per_process"] == 95.0
    assert summary["4"]["tflops_per_s_per_process"] == 95.0  # 1 TFLOP per sample x 95 samples/s
    assert summary["4"]["mfu"] == pytest.approx(95e12 / 989e12, abs=1e-4)
    no_baseline = bench.summarize(runs[1:2], [4], flops_per_sample=None, peak=None)
    assert no_baseline["4"]["efficiency"] is None and "mfu" not in no_baseline["4"]
