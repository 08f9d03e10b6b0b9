"""benchmarks/bench_finetune.py --tiny: every (encoder, mode) case reports its figures; the trainable parameter
counts are those each mode must train (no speed or memory thresholds). The bench runs each case in a fresh
interpreter; here one case does (the child's command line, output and figures), the other five run the same
``run_case`` in this process (each interpreter spends ~8 s of CPU importing torch, timm and peft)."""

from __future__ import annotations

import json
import math

from tests.conftest import load_bench

HEAD = 2 * 32 + 32 * 5 + 5  # LayerNorm(32) + Linear(32 -> 5 labels) of the tiny encoders' head


def test_bench_finetune_tiny_reports_every_mode(tmp_path, capsys, monkeypatch, one_thread):
    bench = load_bench("bench_finetune")
    spawned = []

    def spawn_first_case(case: dict) -> dict:
        if spawned:
            return bench.run_case(case)
        spawned.append((case["name"], case["mode"]))
        return spawn_case(case)

    spawn_case = bench.spawn_case
    monkeypatch.setattr(bench, "spawn_case", spawn_first_case)
    out_json = tmp_path / "finetune.json"
    report = bench.main(["--tiny", "--device", "cpu", "--out-json", str(out_json)])
    out = capsys.readouterr().out
    printed = [line for line in out.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0]) == report == json.loads(out_json.read_text(encoding="utf-8"))
    assert report["bench"] == "finetune" and report["config"]["tiny"] and report["config"]["steps"] == 1
    runs = {(run["encoder"], run["mode"]): run for run in report["runs"]}
    assert spawned == [("vit_b16_2d_224", "linear")] and runs[spawned[0]]["case_s"] > 0  # the child's wall time
    assert set(runs) == {(e, m) for e in ("vit_b16_2d_224", "vit3d_b16_96") for m in ("linear", "lora", "full")}
    for run in runs.values():
        assert "error" not in run, run.get("stderr_tail")
        for figure in ("ms_per_step", "peak_mb", "built_mb", "params", "trainable"):
            assert math.isfinite(run[figure]) and run[figure] > 0, figure
        assert run["peak_mb"] >= run["built_mb"] and len(run["step_ms"]) == 1
    for encoder in ("vit_b16_2d_224", "vit3d_b16_96"):
        linear, lora, full = (runs[encoder, mode] for mode in ("linear", "lora", "full"))
        assert linear["trainable"] == HEAD  # frozen encoder: the head alone
        assert full["trainable"] == full["params"] == linear["params"]
        adapters = lora["params"] - full["params"]
        assert adapters > 0 and lora["trainable"] == adapters + 32 * 5 + 5  # adapters + the head's classifier
        assert f"{encoder:<16}lora" in out
