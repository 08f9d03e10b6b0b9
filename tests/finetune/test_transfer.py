"""tools/transfer.py (issue 19, part 4) on a tiny protocol: 2 modes x 2 label fractions x 1 seed from a pretrained
work dir plus the random-init baseline, a few steps each; table, JSON and PNG written, finished runs not run
again, bad modes and fractions refused (exit 2) naming the value."""

from __future__ import annotations

import json
import math

import pytest

from mmvl.engine.trainer import Trainer
from tests.conftest import REPO, load_tool
from tests.finetune.conftest import TINY_2D, finetune_config

CONFIG = str(REPO / "configs" / "finetune" / "cls_vit_cxr_tiny.py")
STEPS = ["train.max_steps=2", "train.val_interval=2", "train.ckpt_interval=2"]


@pytest.fixture(scope="module")
def pretrained(synthetic_cxr, tmp_path_factory):
    """A tiny work dir with the protocol's image encoder, standing in for a pretrained model."""
    work = tmp_path_factory.mktemp("pretrained") / "work"
    Trainer(finetune_config("cls_vit_cxr_tiny", synthetic_cxr, "model.mode=full", "model.lora=None", *STEPS),
            work).fit()
    return work


def protocol(synthetic_cxr, pretrained, out, *extra):
    return ["tools/transfer.py", CONFIG, "--init-from", str(pretrained), "--out", str(out), "--modes", "linear,lora",
            "--fractions", "0.5,1", "--seeds", "0", "--cfg-options", f"data.manifest={synthetic_cxr}", *TINY_2D,
            *STEPS, *extra][1:]


def test_transfer_writes_table_json_png_and_skips_finished_runs(synthetic_cxr, pretrained, tmp_path, one_thread,
                                                               monkeypatch, capsys):
    tool = load_tool("transfer")
    out = tmp_path / "transfer"
    assert tool.main(protocol(synthetic_cxr, pretrained, out)) == 0
    report = json.loads((out / "transfer.json").read_text(encoding="utf-8"))
    runs = report["runs"]
    assert sorted(run["name"] for run in runs) == sorted(
        [f"pretrained_{m}_f{f}_s0" for m in ("linear", "lora") for f in ("0.5", "1")]
        + ["random_full_f0.5_s0", "random_full_f1_s0"])
    for run in runs:
        assert 0 <= run["value"] <= 1 and run["n_eval"] == 20 and run["steps"] == 2  # 20 test studies
    summary = {(row["mode"], row["fraction"]): row for row in report["summary"]}
    assert set(summary) == {(m, f) for m in ("linear", "lora") for f in (0.5, 1.0)}
    by_name = {run["name"]: run["value"] for run in runs}
    for (mode, fraction), row in summary.items():
        pre, rand = by_name[f"pretrained_{mode}_f{fraction:g}_s0"], by_name[f"random_full_f{fraction:g}_s0"]
        assert math.isclose(row["pretrained"]["mean"], pre) and math.isclose(row["random"]["mean"], rand)
        assert math.isclose(row["difference"]["mean"], pre - rand) and row["difference"]["ci_low"] is None
    table = (out / "transfer.md").read_text(encoding="utf-8")
    assert table.count("\n| linear |") == 2 and table.count("\n| lora |") == 2
    assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the linear 0.5 run and the 1.0 run used nested subsets recorded in their work dirs
    assert (out / "runs" / "pretrained_linear_f0.5_s0" / "checkpoints").is_dir()

    fitted = []
    monkeypatch.setattr(Trainer, "fit", lambda self: fitted.append(self.work_dir) or pytest.fail("rerun trained"))
    assert tool.main(protocol(synthetic_cxr, pretrained, out)) == 0
    assert json.loads((out / "transfer.json").read_text(encoding="utf-8"))["runs"] == runs and not fitted

    monkeypatch.undo()
    (out / "runs" / "random_full_f1_s0" / "transfer_result.json").unlink()
    calls = []
    real_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: calls.append(self.work_dir.name) or real_fit(self))
    assert tool.main(protocol(synthetic_cxr, pretrained, out)) == 0
    assert calls == ["random_full_f1_s0"]  # only the unfinished run, resumed from its checkpoint


@pytest.mark.parametrize("option, value, named", [("--modes", "linear,probe", "'probe'"),
                                                  ("--fractions", "0.1,0", "0 is not"),
                                                  ("--fractions", "0.1,1.5", "1.5 is not"),
                                                  ("--fractions", "0.1,ten", "'ten'")])
def test_transfer_refuses_bad_protocol(tmp_path, capsys, option, value, named):
    argv = [CONFIG, "--init-from", "x", "--out", str(tmp_path / "out"), option, value]
    assert load_tool("transfer").main(argv) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
