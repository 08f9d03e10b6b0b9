"""benchmarks/bench_labeller.py on a few hand-written Open-I report XMLs: it reads only the even-numbered ones and
reports every figure (no speed thresholds here: tests/evaluation/test_labeller.py checks the labeller)."""

from __future__ import annotations

import json

from tests.conftest import load_bench
from tests.datasets.test_iu_xray import report_xml


def test_bench_labeller_reports_every_figure(tmp_path, capsys):
    folder = tmp_path / "ecgen-radiology"
    folder.mkdir()
    reports = {
        2: ({"FINDINGS": "Stable cardiomegaly. No pleural effusion.", "IMPRESSION": "Cardiomegaly."},
            ["Cardiomegaly/mild"]),
        4: ({"FINDINGS": "Small right pleural effusion. XXXX."}, ["Pleural Effusion/right/small"]),
        6: ({"IMPRESSION": "No acute cardiopulmonary abnormality."}, ["normal"]),
        7: ({"FINDINGS": "Large left pneumothorax."}, ["Pneumothorax/left/large"]),  # odd: never read
    }
    for number, (sections, major) in reports.items():
        (folder / f"{number}.xml").write_text(report_xml(number, sections, major, []))
    record = load_bench("bench_labeller").main(["--reports", str(tmp_path), "--n-reports", "20", "--repeats", "1"])
    out = capsys.readouterr().out
    assert json.loads([line for line in out.splitlines() if line.startswith("{")][0]) == record
    assert record["bench"] == "labeller" and record["n_reports"] == 3  # report 7 is odd
    table = record["table"]
    assert table["Cardiomegaly"] == {"mesh_positive": 1, "precision": 1.0, "recall": 1.0, "f1": 1.0, "positive": 1,
                                     "uncertain": 0, "negative": 0}
    assert table["Pleural Effusion"]["negative"] == 1 and table["Pleural Effusion"]["f1"] == 1.0
    assert table["Pneumothorax"]["mesh_positive"] == 0 and table["No Finding"]["f1"] == 1.0
    assert record["speed"]["n_reports"] == 20 and record["speed"]["reports_per_s"] > 0
    assert "reports/s" in out
