"""benchmarks/bench_soak.py runs a short soak on tiny data and reports every figure (no memory thresholds)."""

from __future__ import annotations

import json

from tests.conftest import load_bench


def test_bench_soak_reports_every_figure(tmp_path, capsys, one_thread):
    bench = load_bench("bench_soak")
    out_json = tmp_path / "soak.json"
    report = bench.main(["--steps", "12", "--every", "4", "--warmup", "4", "--n", "40", "--ckpt-interval", "6",
                         "--val-interval", "12", "--work-dir", str(tmp_path), "--out-json", str(out_json)])
    out = capsys.readouterr().out
    printed = [line for line in out.splitlines() if line.startswith("{")]
    assert len(printed) == 1
    line = json.loads(printed[0])
    assert line == report == json.loads(out_json.read_text(encoding="utf-8"))
    assert line["bench"] == "soak" and line["steps"] == 12 and line["config"]["steps"] == 12
    assert [step for step, _ in line["rss_mb"]] == [1, 4, 8, 12]  # first step, then every 4
    rss = [mb for _, mb in line["rss_mb"]]
    assert all(mb > 0 for mb in rss)
    assert line["rss_max_mb"] == max(rss) and line["rss_end_mb"] == rss[-1] and line["rss_start_mb"] == rss[1]
    assert line["seconds"] > 0 and line["ms_per_step"] > 0
    assert isinstance(line["slope_mb_per_1000_steps"], float)
    assert "MB per 1,000 steps" in out
    assert list(tmp_path.iterdir()) == [out_json]  # the scratch data and run were removed

    points = [(0, 10.0), (1000, 12.0), (2000, 14.0)]
    assert bench.slope_per_1000(points) == 2.0 and bench.slope_per_1000(points[:1]) == 0.0
