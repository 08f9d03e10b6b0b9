"""benchmarks/bench_train.py runs mmvl's and open_clip's training steps end to end on a tiny CLIP model and
reports every figure (no speed or memory thresholds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import load_bench

SIDE_FIGURES = ("samples_per_s", "images_per_s", "ms_per_step", "peak_mb", "built_mb", "imports_mb", "params",
                "decay_tensors", "text_tokens", "flops_per_step", "tflops_per_s")


def test_bench_train_reports_every_figure(tmp_path, capsys):
    bench = load_bench("bench_train")
    out_json = tmp_path / "train.json"
    report = bench.main(["--quick", "--device", "cpu", "--flops", "--work-dir", str(tmp_path), "--out-json",
                         str(out_json)])
    out = capsys.readouterr().out
    printed = [line for line in out.splitlines() if line.startswith("{")]
    assert len(printed) == 1
    line = json.loads(printed[0])
    assert line == report == json.loads(out_json.read_text(encoding="utf-8"))
    assert line["bench"] == "train" and line["config"]["quick"] and line["config"]["amp"] == "none"
    assert line["config"]["repeats"] == 1 and line["config"]["steps"] == 2 and line["config"]["threads"] == 1

    runs = line["runs"]
    assert [run["side"] for run in runs] == ["mmvl", "open_clip"]  # alternating, mmvl first
    for run in runs:
        assert "error" not in run, run.get("stderr_tail")
        assert len(run["step_ms"]) == 2 and min(run["step_ms"]) > 0 and run["case_s"] > 0
        assert math.isclose(run["samples_per_s"] * run["ms_per_step"], 4 * 1000.0, rel_tol=0.01)  # batch 4
    assert runs[0]["same_batch"]  # mmvl's own loader gave the batch open_clip was handed
    assert runs[0]["driver"] == "mmvl.engine.trainer.Trainer.train_step"
    assert runs[1]["driver"] == "open_clip_train.train.train_one_epoch"

    summary = line["summary"]
    sides = summary["sides"]
    assert set(sides) == {"mmvl", "open_clip"}
    for side, facts in sides.items():
        for figure in SIDE_FIGURES:
            assert math.isfinite(facts[figure]) and facts[figure] > 0, (side, figure)
        assert facts["step_mb"] == pytest.approx(facts["peak_mb"] - facts["built_mb"], abs=0.11)
        assert facts["step_mb"] >= 0 and facts["page_faults_per_step"] >= 0
        assert facts["optimizer"] == "for-loop"  # AdamW's default on CPU tensors
        assert facts["attention"] == "sdpa" and facts["mfu"] is None  # no peak FLOP/s for a CPU
    assert summary["speed_ratio"] > 0 and summary["memory_ratio"] > 0
    assert summary["params_equal"] and sides["mmvl"]["params"] == sides["open_clip"]["params"]
    assert sides["mmvl"]["decay_tensors"] == sides["open_clip"]["decay_tensors"]  # the same weight-decay groups
    # The same work, but for the (B, E) x (E, B) product of mmvl's logged batch retrieval accuracy (i2t_acc).
    assert sides["mmvl"]["flops_per_step"] - sides["open_clip"]["flops_per_step"] == 2 * 4 * 32 * 4
    # The same network, weights, batch, optimizer and schedule: the same losses at the first and the last step.
    for key in ("loss_first", "loss_last"):
        assert sides["mmvl"][key] == pytest.approx(sides["open_clip"][key], rel=1e-5), key
    assert "mmvl / open_clip: speed" in out and "(equal)" in out and "TFLOP/s" in out
    assert list(tmp_path.iterdir()) == [out_json]  # the scratch data and runs were removed


def test_flops_and_mfu_figures():
    """The CUDA-only figures, from their parts: FLOP counting, the peak table, MFU in the summary and table."""
    bench = load_bench("bench_train")
    layer = torch.nn.Linear(8, 4, bias=False)
    inputs = torch.randn(2, 8)
    # forward 2*B*in*out, backward the weight gradient (the input needs none): 2 x 2*2*8*4
    assert bench.count_flops(lambda: layer(inputs).sum().backward()) == 256

    assert bench.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert bench.peak_flops("NVIDIA H200", None) == 989e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert bench.peak_flops("NVIDIA L4", None) is None
    assert bench.peak_flops("NVIDIA L4", 121.0) == 121e12

    def run(side: str, ms: float) -> dict:
        return {"side": side, "samples_per_s": 256000 / ms, "ms_per_step": ms, "peak_mb": 1000.0, "built_mb": 100.0,
                "imports_mb": 0.0, "page_faults_per_step": 0.0, "params": 10, "optimizer": "foreach",
                "decay_tensors": 2, "loss_first": 1.0, "loss_last": 0.5, "driver": side, "attention": "sdpa",
                "text_tokens": 8, "torch_threads": 16, "flops_per_step": 10**12}

    summary = bench.summarize([run("mmvl", 100.0), run("open_clip", 125.0)], 989e12)
    assert summary["speed_ratio"] == 1.25 and summary["memory_ratio"] == 1.0
    assert summary["sides"]["mmvl"]["tflops_per_s"] == 10.0 and summary["sides"]["open_clip"]["tflops_per_s"] == 8.0
    assert summary["sides"]["mmvl"]["mfu"] == pytest.approx(10e12 / 989e12, abs=1e-4)
    config = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "amp": "bf16", "batch_size": 256, "repeats": 1,
              "steps": 1, "warmup": 0, "load_avg_start": 0.0,
              "model": dict(width=192, depth=12, patch_size=16, image_size=224, text_width=256, text_depth=4,
                            max_length=64, embed_dim=256)}
    table = bench.format_table({"config": config, "summary": summary, "runs": []})
    assert "MFU" in table and "1.0%" in table and "speed 1.25x" in table
