"""--allow-gaps / --reader-option of tools/generate_reports.py (zero_shot.py and evaluate.py: in
tests/test_inference.py): the recorded reader's options overridden at inference, one it does not take refused."""

from __future__ import annotations

import json

from tests.conftest import load_tool
from tests.tools.test_generate_reports import report_work_dir  # noqa: F401  (the fixture)


def test_generate_reports_takes_the_reader_options(report_work_dir, synthetic_cxr, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "reports.jsonl"
    common = [str(report_work_dir), "--manifest", str(synthetic_cxr.parent / "test.jsonl"), "--limit", "2",
              "--method", "greedy", "--max-length", "8", "--out", str(out)]
    assert load_tool("generate_reports").main([*common, "--reader-option", "voi=minmax"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert json.loads(out.with_suffix(".json").read_text())["reader_options"] == {"voi": "minmax"}
    assert load_tool("generate_reports").main([*common, "--allow-gaps"]) == 2  # no such option for a 2D reader
    assert "unknown key 'reader_options.allow_gaps' in transform 'LoadImage'" in capsys.readouterr().err
