"""Runs that cannot silently go wrong (issue 15): a resume continues the run it resumes or says what differs, a
fresh run never mixes with an earlier one in the same work dir, a failed start leaves nothing half-made, best.pt
is a second name of a checkpoint, and process-wide allocator tuning happens only on request."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmvl.config import Config
from mmvl.engine import trainer as trainer_module
from mmvl.engine.checkpoint import load_checkpoint
from mmvl.engine.trainer import Trainer
from mmvl.errors import CheckpointError, ConfigError
from mmvl.utils import read_jsonl
from tests.engine.test_crash_safety import tinier_config

REPO = Path(__file__).resolve().parents[2]


def lrs(work_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_jsonl(work_dir / "metrics.jsonl") if "lr" in r}


def test_resume_with_another_batch_size_is_refused_with_a_diff(synthetic_cxr, tmp_path, one_thread):
    Trainer(tinier_config(synthetic_cxr), tmp_path / "run").fit()
    with pytest.raises(ConfigError) as err:
        Trainer(tinier_config(synthetic_cxr, "train.batch_size=4"), tmp_path / "run", resume=True)
    message = str(err.value)
    assert "train.batch_size: 8 (checkpoint) -> 4 (now)" in message
    assert "--resume-override train.batch_size=4" in message
    with pytest.raises(ConfigError, match="--resume-override is for --resume only"):
        Trainer(tinier_config(synthetic_cxr), tmp_path / "other", resume_override=["train.max_steps=9"])


def test_resume_override_of_max_steps_rebuilds_the_schedule(synthetic_cxr, tmp_path, one_thread):
    """A finished 4-step cosine run (lr 0 at its end) extended to 8 steps: no added step runs at lr 0 (the old
    scheduler state would keep total_steps=4), the schedule is the 8-step one from the resumed step on, and the
    work dir's config.py records the new total so the next resume compares against it."""
    options = ["train.max_steps=4", "train.ckpt_interval=2", "optim.warmup_steps=1", "optim.lr=0.01"]
    work = tmp_path / "run"
    Trainer(tinier_config(synthetic_cxr, *options), work).fit()
    assert lrs(work)[4] == 0.0
    resumed = Trainer(Config.fromfile(work / "config.py"), work, resume=True,
                      resume_override=["train.max_steps=8"])
    assert resumed.step == 4
    resumed.fit()
    logged = lrs(work)
    assert sorted(logged) == list(range(1, 9))
    assert all(logged[step] > 0 for step in range(5, 8)), logged  # only the last step may reach lr 0
    straight = tmp_path / "straight"
    Trainer(tinier_config(synthetic_cxr, *options, "train.max_steps=8"), straight).fit()
    assert [logged[s] for s in range(5, 9)] == pytest.approx([lrs(straight)[s] for s in range(5, 9)], rel=1e-12)
    assert Config.fromfile(work / "config.py").train.max_steps == 8
    assert "schedule rebuilt for train.max_steps=8" in (work / "train.log").read_text()


def test_run_resumes_from_its_own_config_file_with_cli_options(synthetic_cxr, tmp_path):
    """The resume command the trainer prints (WORK_DIR/config.py) continues a run started with --cfg-options."""
    tool = trainer_cli()
    base = tmp_path / "base.py"
    tinier_config(synthetic_cxr, "train.max_steps=2").dump(base)
    work = tmp_path / "run"
    assert tool.main([str(base), "--work-dir", str(work), "--cfg-options", "train.batch_size=4",
                      "optim.lr=0.002"]) == 0
    assert tool.main([str(work / "config.py"), "--work-dir", str(work), "--resume",
                      "--resume-override", "train.max_steps=3"]) == 0
    assert load_checkpoint(work / "checkpoints" / "last.pt")["config"]["train"]["batch_size"] == 4
    # the original config file, without the run's options, is refused
    assert tool.main([str(base), "--work-dir", str(work), "--resume"]) == 2


def trainer_cli():
    from tests.conftest import load_tool

    return load_tool("train")


def test_fresh_run_into_a_used_work_dir_is_refused(synthetic_cxr, tmp_path, one_thread, capsys):
    work = tmp_path / "run"
    Trainer(tinier_config(synthetic_cxr), work).fit()
    with pytest.raises(ConfigError) as err:
        Trainer(tinier_config(synthetic_cxr), work)
    assert "--resume" in str(err.value) and "another --work-dir" in str(err.value)
    config = tmp_path / "config.py"
    tinier_config(synthetic_cxr).dump(config)
    assert trainer_cli().main([str(config), "--work-dir", str(work)]) == 2
    assert "already holds the checkpoints" in capsys.readouterr().err
    assert len([r for r in read_jsonl(work / "metrics.jsonl") if "loss" in r]) == 3  # untouched


def test_fresh_run_replaces_leftovers_of_a_run_without_checkpoints(synthetic_cxr, tmp_path, one_thread):
    """An earlier run that died before its first checkpoint: its logs and tokenizer are not reused."""
    work = tmp_path / "run"
    (work / "tokenizer").mkdir(parents=True)
    (work / "tokenizer" / "tokenizer.json").write_text("{not a tokenizer")
    (work / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    (work / "cache").mkdir()
    Trainer(tinier_config(synthetic_cxr), work).fit()
    assert [r["loss"] for r in read_jsonl(work / "metrics.jsonl") if "loss" in r][0] != 9.0
    assert json.loads((work / "tokenizer" / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
    assert (work / "cache").is_dir()  # data caches are kept


def test_resume_needs_the_runs_tokenizer(synthetic_cxr, tmp_path, one_thread):
    work = tmp_path / "run"
    Trainer(tinier_config(synthetic_cxr), work).fit()
    for path in (work / "tokenizer").iterdir():
        path.unlink()
    with pytest.raises(CheckpointError, match="tokenizer .* is missing"):
        Trainer(tinier_config(synthetic_cxr), work, resume=True)


def test_failed_start_leaves_no_work_dir(synthetic_cxr, tmp_path):
    work = tmp_path / "new"
    with pytest.raises(ConfigError, match="model.heads is empty"):
        Trainer(tinier_config(synthetic_cxr, "model.heads=[]"), work)
    assert not work.exists()


def test_best_checkpoint_is_a_link_not_a_copy(synthetic_cxr, tmp_path, one_thread):
    work = tmp_path / "run"
    cfg = tinier_config(synthetic_cxr, "train.max_steps=4", "train.val_interval=2", "train.ckpt_interval=4",
                        "train.best_mode=min", "train.best_metric=val/loss")
    trainer = Trainer(cfg, work)
    trainer.fit()
    best = work / "checkpoints" / "best.pt"
    step = load_checkpoint(best)["step"]
    assert step in (2, 4) and load_checkpoint(best)["best_value"] == trainer.best_value
    twin = work / "checkpoints" / f"step_{step:07d}.pt"
    assert os.path.samefile(best, twin) and best.stat().st_nlink >= 2


def test_allocator_tuning_only_on_request(synthetic_cxr, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1) or True)
    Trainer(tinier_config(synthetic_cxr), tmp_path / "a")
    assert calls == []
    Trainer(tinier_config(synthetic_cxr, "train.keep_freed_memory=True"), tmp_path / "b")
    assert calls == [1]


def test_model_typo_fails_before_data_and_tokenizer(synthetic_cxr, tmp_path, monkeypatch, capsys):
    """``model.image_encoder.dpeth=2`` exits 2 naming ``depth`` before the datasets are read or the tokenizer is
    trained (minutes on a real corpus: here a tokenizer that would take 30 s, and a dataset that would fail)."""
    import time

    from mmvl.engine import data as data_module

    def slow_tokenizer(*args, **kwargs):
        time.sleep(30)

    def no_data(*args, **kwargs):
        raise AssertionError("the datasets were built before the config was checked")

    monkeypatch.setattr(data_module, "train_wordpiece_tokenizer", slow_tokenizer)
    monkeypatch.setattr(trainer_module, "build_datasets", no_data)
    config = tmp_path / "config.py"
    tinier_config(synthetic_cxr).dump(config)
    start = time.perf_counter()
    code = trainer_cli().main([str(config), "--work-dir", str(tmp_path / "run"), "--cfg-options",
                               "model.image_encoder.dpeth=2"])
    assert code == 2 and time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "model.image_encoder.dpeth" in err and "'depth'" in err
    assert not (tmp_path / "run").exists()


def test_log_interval_longer_than_the_run_still_logs_the_last_step(synthetic_cxr, tmp_path, one_thread):
    work = tmp_path / "run"
    Trainer(tinier_config(synthetic_cxr, "train.log_interval=1000"), work).fit()
    assert [r["step"] for r in read_jsonl(work / "metrics.jsonl") if "loss" in r] == [3]
