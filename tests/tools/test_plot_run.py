"""tools/plot_run.py: the PNGs of a work dir, their paths printed; exit 2 naming a missing or empty log."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import load_tool


def write_run(work: Path) -> None:
    """A short CLIP run as the trainer logs it (log_interval=5, val_interval=20), one NaN loss."""
    work.mkdir(parents=True)
    lines = []
    for step in range(5, 45, 5):
        loss = math.nan if step == 25 else 2.9 - step / 100
        lines.append({"step": step, "epoch": step // 10, "lr": 1e-3 * (1 + math.cos(math.pi * step / 40)) / 2,
                      "batch_time": 1.2, "samples_per_s": 13.0, "skipped_samples": 0, "skipped_steps": 0,
                      "overflow_steps": 0, "clip/loss": loss, "clip/logit_scale": 14.2, "clip/i2t_acc": 0.06,
                      "loss": loss, "grad_norm": 1.5, "data_time": 0.05})
        if step % 20 == 0:
            lines.append({"step": step, "val/clip/loss": 2.4, "val/loss": 2.4, "val/i2t_R@1": 0.1,
                          "val/i2t_R@5": 0.6, "val/clip/logit_scale": 14.1})
    (work / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_writes_and_prints_the_pngs(tmp_path, capsys):
    work = tmp_path / "run"
    write_run(work)
    assert load_tool("plot_run").main([str(work)]) == 0
    printed = capsys.readouterr().out.split()
    names = ["loss.png", "lr.png", "val.png", "throughput.png", "head_scalars.png"]
    assert printed == [str(work / "plots" / name) for name in names]
    for path in printed:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] == 880

    out = tmp_path / "figures"
    assert load_tool("plot_run").main([str(work), "--out", str(out), "--smoothing", "0.9"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


@pytest.mark.parametrize("content", [None, ""])
def test_missing_or_empty_log_exits_2_naming_it(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert load_tool("plot_run").main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "metrics.jsonl") in err


def test_bad_smoothing_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        load_tool("plot_run").main([str(tmp_path), "--smoothing", "1.5"])
    assert caught.value.code == 2
    assert "--smoothing must be in [0, 1)" in capsys.readouterr().err
