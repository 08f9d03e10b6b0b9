"""benchmarks/bench_encoders.py runs end to end on tiny encoders and reports every figure (no speed thresholds)."""

from __future__ import annotations

import json
import math

from tests.conftest import load_bench

CASE_FIGURES = ("ms_per_step", "samples_per_s", "peak_mb", "baseline_mb", "state_mb")


def test_bench_encoders_reports_every_figure(tmp_path, capsys, monkeypatch, one_thread):
    bench = load_bench("bench_encoders")
    spawned = []

    def spawn_first_case(case: dict) -> dict:
        """The first case in a fresh interpreter, as the bench runs each; the other three through the same
        ``run_case`` in this process (a child spends ~8 s of CPU on its imports)."""
        if spawned:
            monkeypatch.setenv("MMVL_ATTENTION", case["backend"])  # what spawn_case sets in the child
            return bench.run_case(case)
        spawned.append((case["grad_checkpointing"], case["token_drop"]))
        return spawn_case(case)

    spawn_case = bench.spawn_case
    monkeypatch.setattr(bench, "spawn_case", spawn_first_case)
    out_json = tmp_path / "bench.json"
    # 4 cases of a one-block 3D ViT (checkpointing x token drop) on sdpa.
    report = bench.main(["--only", "3d96", "--backends", "sdpa", "--depth", "1", "--width", "64", "--warmup", "0",
                         "--steps", "2", "--device", "cpu", "--out-json", str(out_json)])
    out = capsys.readouterr().out
    printed = [line for line in out.splitlines() if line.startswith("{")]
    assert len(printed) == 1
    line = json.loads(printed[0])
    assert line == report == json.loads(out_json.read_text(encoding="utf-8"))
    assert line["bench"] == "encoders"
    assert line["config"]["backends"] == ["sdpa"] and line["config"]["amp"] == "none"
    assert "xformers: not available (needs CUDA" in out  # said, not silently dropped
    assert "peak memory with/without gradient checkpointing" in out

    facts = line["models"]["3d96"]
    assert facts["input_shape"] == [1, 1, 96, 96, 96] and facts["tokens"] == 216
    assert facts["patched_at_build"] + facts["patched_by_bench"] == 1  # the one block's SABlock
    rows = {(row["grad_checkpointing"], row["token_drop"]): row for row in line["results"]}
    assert spawned == [(False, 0.0)] and rows[spawned[0]]["case_s"] > 0 and rows[spawned[0]]["load_avg"] >= 0
    assert set(rows) == {(False, 0.0), (False, 0.5), (True, 0.0), (True, 0.5)} and len(line["results"]) == 4
    for key, row in rows.items():
        assert "error" not in row, row.get("stderr_tail")
        assert row["model"] == "3d96" and row["backend"] == row["attention_backend"] == "sdpa"
        assert row["tokens"] == (108 if key[1] else 216)
        for figure in (*CASE_FIGURES, "time_ratio", "peak_ratio"):
            assert math.isfinite(row[figure]) and row[figure] > 0, (key, figure)
        assert row["peak_mb"] >= row["baseline_mb"]
        assert len(row["step_ms"]) == 2 and min(row["step_ms"]) > 0
        assert math.isclose(row["samples_per_s"] * row["ms_per_step"], 1000.0, rel_tol=0.01)
    assert rows[(False, 0.0)]["time_ratio"] == rows[(False, 0.0)]["peak_ratio"] == 1.0
    ratios = line["checkpointing_ratio"]["3d96"]
    assert set(ratios) == {"sdpa/drop0", "sdpa/drop0.5"}
    assert all(r["peak"] > 0 for r in ratios.values())


def test_bench_encoders_case_2d(monkeypatch):
    """One 2D case in this process (the parent runs each in a child): math attention, checkpointing, token drop."""
    bench = load_bench("bench_encoders")
    monkeypatch.setenv("MMVL_ATTENTION", "math")
    case = dict(encoder=bench.encoder_config("2d", 1, 64), spatial=[224, 224], batch=2, device="cpu", amp="none",
                backend="math", grad_checkpointing=True, token_drop=0.5, warmup=0, steps=1, optimizer="adamw")
    result = bench.run_case(case)
    assert result["attention_backend"] == "math"
    assert result["tokens"] == 1 + 98  # class token + half of the 14 x 14 patches
    assert result["patched_at_build"] + result["patched_by_bench"] == 1
    for figure in CASE_FIGURES:
        assert math.isfinite(result[figure]) and result[figure] > 0, figure
    # gradients + AdamW's two moments of every parameter
    assert math.isclose(result["state_mb"], 3 * result["params_m"] * 1e6 * 4 / 2**20, rel_tol=0.02)
