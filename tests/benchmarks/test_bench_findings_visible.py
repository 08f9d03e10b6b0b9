"""benchmarks/bench_findings_visible.py on a small synthetic CT set at the CT demo's preprocessing: a finding the
volumes show (emphysema's low-attenuation bullae) is separated, a label of coin flips is not by any of the three
probes (no leak between the folds)."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import REPO, load_bench, load_script


def test_probes_see_emphysema_and_not_coin_flips(tmp_path, capsys):
    manifest = load_script("synthetic_ct").generate_ct(tmp_path / "ct", n=40, size=32, slices=16, formats=("nifti",),
                                                       progress=False)["nifti"]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    flips = np.random.default_rng(0).permutation([1] * 20 + [0] * 20)
    for row, flip in zip(rows, flips):
        row["labels"]["coin flip"] = int(flip)
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    record = load_bench("bench_findings_visible").main(
        ["--config", str(REPO / "configs" / "demo" / "ct_clip_tiny.py"), "--manifest", str(manifest)])
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-1]) == record
    assert record["n"] == 40 and record["input_shape"] == [1, 48, 48, 48]  # the demo's 48^3 at 8 mm
    table = record["table"]
    assert set(table) == {"lung nodule", "pleural effusion", "emphysema", "cardiomegaly", "consolidation",
                          "coin flip"}
    assert table["emphysema"]["histogram_auroc"] > 0.9, table  # 0.99 measured
    for probe in ("voxel_auroc", "histogram_auroc", "surroundings_auroc"):
        assert table["coin flip"][probe] < 0.85, table
    assert record["neighbourhood"] == 7
