"""benchmarks/gpu_check.py: the GPU check's orchestration, per-part budgets and report, run as ``--dry-run`` on a
CPU (tiny sizes, this interpreter); a part past its budget is killed, recorded as timed out, and the report is
still written; the CT batch search."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import load_bench

FINAL = ("ok", "failed", "skipped", "timed_out")


@pytest.fixture(scope="module")
def check():
    return load_bench("gpu_check")


@pytest.fixture(scope="module")
def dry_run(check, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report")
    return out, check.main(["--dry-run", "--out", str(out)])


@pytest.mark.slow  # about a minute of CPU: seven parts, each a few fresh interpreters
def test_dry_run_reports_every_field_and_part(check, dry_run):
    out, report = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "report.json", "summary.md"]  # $OUT keeps 8 files
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == json.loads(json.dumps(report))
    assert set(check.REPORT_FIELDS) <= set(report) and report["mode"] == "dry-run" and report["finished"]
    assert set(check.DEVICE_FIELDS) <= set(report["device"]) and report["device"]["cuda"] is False
    assert set(check.VERSION_FIELDS) <= set(report["versions"]) and report["versions"]["torch"] == torch.__version__
    assert set(check.XFORMERS_FIELDS) <= set(report["xformers"]) and report["xformers"]["mmvl_backend"] == "sdpa"
    assert report["elapsed_s"] < report["total_budget_s"]
    assert list(report["parts"]) == list(check.PARTS)
    summary = (out / "summary.md").read_text(encoding="utf-8")
    for name, part in report["parts"].items():
        assert set(check.PART_FIELDS) <= set(part), name
        assert part["status"] == "ok", (name, part["error"], part["log_tail"])
        assert 0 < part["elapsed_s"] <= part["budget_s"] + check.KILL_GRACE_S * 2, name
        assert f"| {name} | ok |" in summary
    install = report["install"]
    assert install["mode"] == "reused" and install["pins_met"] and "torch" in install["requirements"]
    assert install["pins"]["torch"]["pinned"] == "2.13.0"


@pytest.mark.slow
def test_dry_run_figures(dry_run):
    _, report = dry_run
    parts = {name: part["result"] for name, part in report["parts"].items()}
    tests = parts["gpu_tests"]
    assert tests["counts"]["skipped"] >= 30 and tests["counts"]["passed"] == tests["counts"]["failed"] == 0
    assert set(tests["outcomes"].values()) == {"skipped"} and len(tests["outcomes"]) == tests["counts"]["skipped"]

    train = parts["train"]
    assert train["batch"] == 4 and set(train["sides"]) == {"mmvl", "open_clip"} and train["speed_ratio"] > 0
    assert all(side["samples_per_s"] > 0 and side["tflops_per_s"] > 0 for side in train["sides"].values())

    encoders = parts["encoders"]
    assert encoders["backends"] == ["sdpa", "math"] and "xformers" in encoders["unavailable"]
    assert len(encoders["results"]) == 8  # 2 backends x checkpointing off/on x token drop 0/0.5
    assert all(row["ms_per_step"] > 0 and row["peak_mb"] > 0 for row in encoders["results"])
    dropped = [row["tokens"] for row in encoders["results"] if row["token_drop"]]
    kept = [row["tokens"] for row in encoders["results"] if not row["token_drop"]]
    assert max(dropped) < min(kept)

    ct = parts["ct_batch"]  # a CPU never runs out of memory: the dry run refuses batches above 6
    assert ct["largest_batch"] == {"no_checkpointing": 6, "checkpointing": 6} and ct["simulated_capacity"] == 6
    assert ct["searches"]["checkpointing"]["tried"] == [2, 4, 8, 6, 7]
    assert ct["searches"]["checkpointing"]["tokens"] == 8  # the tiny CT model's 8-voxel patches on 16^3

    data = parts["data"]
    assert data["samples"] == 24 and data["loader_samples_per_s"] > 0
    assert data["train_step_samples_per_s"] == train["sides"]["mmvl"]["samples_per_s"]
    assert data["loader_over_step"] > 0 and isinstance(data["feeds_the_step"], bool)

    run = parts["torchrun"]
    assert run["nproc"] == 1 and run["backend"] == "gloo" and run["gather"]["ok"]
    assert "step_0000002.pt" in run["first_run"]["checkpoints"]
    assert run["resumed_run"]["resumed"] and run["resumed_run"]["done"]
    assert "step_0000004.pt" in run["resumed_run"]["checkpoints"]


def test_a_part_past_its_budget_is_timed_out_and_the_report_written(check, tmp_path):
    report = check.main(["--dry-run", "--out", str(tmp_path), "--parts", "data", "--budget", "data=0.3"])
    data = report["parts"]["data"]
    assert data["status"] == "timed_out" and "budget of 0 s" in data["error"]
    assert data["elapsed_s"] < 0.3 + 2 * check.KILL_GRACE_S + 2
    for name, part in report["parts"].items():
        if name != "data":
            assert part["status"] == "skipped" and part["reason"] == "not selected (--parts)"
    on_disk = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert on_disk["parts"]["data"]["status"] == "timed_out" and on_disk["finished"]
    assert "| data | timed_out |" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert report["device"]["cuda"] is False  # probed in this process when setup does not run

    spent = check.main(["--dry-run", "--out", str(tmp_path / "spent"), "--parts", "data", "--total-budget", "6"])
    assert spent["parts"]["data"]["status"] == "skipped" and "total budget" in spent["parts"]["data"]["reason"]


def test_largest_batch_search(check):
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= 37

    found = check.largest_fitting(fits, start=16, cap=4096, time_left=lambda: 1.0, resolution=0)
    assert found["largest"] == 37 and found["smallest_failing"] == 38 and found["complete"]
    assert calls[:3] == [16, 32, 64]
    found = check.largest_fitting(fits, start=64, cap=4096, time_left=lambda: 1.0, resolution=0)
    assert found["largest"] == 37 and found["tried"][0] == 64  # even the start failed: searched below it
    found = check.largest_fitting(lambda b: True, start=16, cap=100, time_left=lambda: 1.0)
    assert found["largest"] == 100 and found["smallest_failing"] is None and found["complete"]
    ticks = iter([1.0, 1.0, 0.0, 0.0])  # time for two probes only
    found = check.largest_fitting(fits, start=16, cap=4096, time_left=lambda: next(ticks, 0.0))
    assert found["largest"] == 32 and not found["complete"]
