"""benchmarks/bench_data.py runs end to end on tiny data and reports every figure (no speed thresholds)."""

from __future__ import annotations

import json
import math

from tests.conftest import load_bench


def test_bench_data_reports_every_figure(tmp_path, capsys):
    bench = load_bench("bench_data")
    out_json = tmp_path / "bench.json"
    report = bench.main([
        "--n", "4", "--size", "64", "--n-large", "3", "--size-large", "96",
        "--n-hospital", "1", "--size-hospital", "32", "--slices-hospital", "8",
        "--n-3d", "4", "--size-3d", "32", "--slices-3d", "8", "--spacing-3d", "8,8,8",
        "--repeats", "1", "--workers", "1", "--out-json", str(out_json), "--work-dir", str(tmp_path / "work"),
    ])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(printed) == 1
    line = json.loads(printed[0])
    assert line == report == json.loads(out_json.read_text(encoding="utf-8"))
    assert line["bench"] == "data"
    assert line["config"]["workers"] == [0, 1]
    assert set(line["collections"]) == set(bench.COLLECTIONS)
    for name, facts in line["collections"].items():
        assert facts["items"] == (3 if name == "cxr_dicom_large" else 4)
        assert facts["output_shape"] == ([1, 224, 224] if name.startswith("cxr") else [1, *facts["volume_size"]])
        for key in ("generate_s", "source_mb", "disk_cache_mb"):
            assert facts[key] > 0, (name, key)
        assert -1.0 <= facts["plain_vs_mmvl_r"] <= 1.0

    # every method at both worker counts (the memory cache fills once, before any loader)
    expected = {(name, method, workers) for name in bench.COLLECTIONS for method in bench.METHODS
                for workers in (0, 1) if not (method == "mmvl_memory_fill" and workers == 1)}
    rows = {(row["data"], row["method"], row["workers"]): row for row in line["results"]}
    assert set(rows) == expected and len(line["results"]) == len(expected)
    for key, row in rows.items():
        for figure in ("items_per_s", "ms_per_item", "speedup_vs_plain"):
            assert math.isfinite(row[figure]) and row[figure] > 0, (key, figure)
        assert len(row["seconds"]) == 1 and row["seconds"][0] > 0
        assert math.isclose(row["items_per_s"] * row["ms_per_item"], 1000.0, rel_tol=0.05)
    assert all(rows[(name, "plain", w)]["speedup_vs_plain"] == 1.0 for name in bench.COLLECTIONS for w in (0, 1))
    # the eval pipelines are deterministic: a filled cache is read without workers, anything else with them
    for (name, method, workers), row in rows.items():
        cached = method in ("mmvl_disk_hit", "mmvl_memory", "mmvl_memory_fill")
        assert row["workers_used"] == (0 if cached else workers), (name, method, workers)

    # hospital-size CT, step by step: every deterministic step of the CT pipeline, per-volume times that add up
    assert set(line["ct_steps"]) == {"dicom", "nifti"}
    for found in line["ct_steps"].values():
        assert found["steps"] == ["LoadVolume", "Orient", "Resample", "IntensityWindow", "CropOrPad", "Normalize"]
        assert found["volumes"] == 1 and all(ms >= 0 for ms in found["ms"]) and found["total_ms"] > 0
        assert math.isclose(sum(found["ms"]), found["total_ms"], abs_tol=0.5)
        assert math.isclose(found["core_hours_per_50k"], found["total_ms"] / 1000 * 50_000 / 3600, abs_tol=0.06)
    assert (tmp_path / "work").is_dir() and not any((tmp_path / "work").iterdir())  # scratch data removed
