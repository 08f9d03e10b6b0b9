"""Crash safety of training (issue 9): SIGKILL at a random step then ``--resume`` gives the weights of an
uninterrupted run, bitwise; a damaged newest checkpoint falls back to the previous one; SIGTERM/SIGINT end with
a checkpoint and exit status 0; the last K checkpoints are kept, each with a SHA-256; non-finite losses and
gradients skip the step and are counted, too many in a row stop with a clear error; fp16 overflows lower the
loss scale instead of counting as bad steps."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmvl.engine.checkpoint import (
    checksum_path,
    load_checkpoint,
    load_newest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_checkpoints,
    verify_checksum,
)
from mmvl.engine.trainer import Trainer
from mmvl.errors import CheckpointError, TrainingError
from mmvl.utils import read_jsonl
from tests.conftest import tiny_clip_config
from tests.engine.test_contrastive_variants import TINIER

REPO = Path(__file__).resolve().parents[2]


def tinier_config(manifest: Path, *options: str, keep_checkpoints: int | None = None):
    cfg = tiny_clip_config(manifest, *TINIER, "train.val_interval=1000", *options)
    if keep_checkpoints is not None:  # not in the base schedule config, so not a --cfg-options key
        cfg.train["keep_checkpoints"] = keep_checkpoints
    return cfg


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def assert_same_training_state(a: dict, b: dict) -> None:
    """Model, optimizer moments, scheduler and scaler of two checkpoints are bitwise equal."""
    assert_same_tensors(a["model"], b["model"], "model")
    for param, state in a["optimizer"]["state"].items():
        assert_same_tensors(state, b["optimizer"]["state"][param], f"optimizer state of parameter {param}")
    assert a["scheduler"] == b["scheduler"] and a["scaler"] == b["scaler"]
    assert (a["step"], a["epoch"], a["position"]) == (b["step"], b["epoch"], b["position"])


# -- checkpoint files ------------------------------------------------------------------------------------------
def test_checksum_rotation_and_fallback_on_small_states(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path / f"step_{step:07d}.pt", {"step": step, "w": torch.full((3,), float(step))})
    digest, name = checksum_path(tmp_path / "step_0000004.pt").read_text().split()
    assert name == "step_0000004.pt" and len(digest) == 64  # sha256sum format
    assert verify_checksum(tmp_path / "step_0000004.pt") is True
    assert [p.name for p in prune_checkpoints(tmp_path, keep=2)] == ["step_0000002.pt", "step_0000001.pt"]
    assert [step for step, _ in step_checkpoints(tmp_path)] == [4, 3]
    assert not checksum_path(tmp_path / "step_0000001.pt").exists()

    # same length, one byte changed: it may still unpickle, but the checksum refuses it
    newest = tmp_path / "step_0000004.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert verify_checksum(newest) is False
    path, state = load_newest_checkpoint(tmp_path)
    assert path.name == "step_0000003.pt" and state["step"] == 3
    assert (tmp_path / "step_0000004.pt.corrupt").is_file() and not newest.exists()  # set aside, not deleted

    (tmp_path / "step_0000003.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*step_0000003.pt: its SHA-256 differs"):
        load_newest_checkpoint(tmp_path)


def test_truncated_newest_checkpoint_resumes_from_previous_with_warning(synthetic_cxr, tmp_path, one_thread):
    options = ["train.max_steps=6", "train.ckpt_interval=2"]
    straight = Trainer(tinier_config(synthetic_cxr, *options, keep_checkpoints=2), tmp_path / "run")
    straight.fit()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert [step for step, _ in step_checkpoints(ckpt_dir)] == [6, 4]  # the last 2 kept
    assert os.path.samefile(ckpt_dir / "last.pt", ckpt_dir / "step_0000006.pt")
    assert all(verify_checksum(ckpt_dir / name) for name in ("last.pt", "step_0000006.pt", "step_0000004.pt"))

    newest = ckpt_dir / "step_0000006.pt"
    with open(newest, "r+b") as handle:  # a disk that filled up, a copy cut short
        handle.truncate(newest.stat().st_size // 2)
    torch.manual_seed(99)  # resume must restore every RNG itself
    resumed = Trainer(tinier_config(synthetic_cxr, *options, keep_checkpoints=2), tmp_path / "run", resume=True)
    assert resumed.step == 4 and resumed.last_checkpoint == ckpt_dir / "step_0000004.pt"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "WARNING checkpoint" in log and "step_0000006.pt is unusable" in log and "falling back" in log
    assert (ckpt_dir / "step_0000006.pt.corrupt").is_file()
    assert os.path.samefile(ckpt_dir / "last.pt", ckpt_dir / "step_0000004.pt")  # no longer the damaged one
    resumed.fit()
    assert_same_tensors(straight.model.state_dict(), resumed.model.state_dict(), "model")
    assert [step for step, _ in step_checkpoints(ckpt_dir)] == [6, 4]
    assert verify_checksum(ckpt_dir / "last.pt")
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_drops_a_torn_log_line(synthetic_cxr, tmp_path, one_thread):
    options = ["train.max_steps=2", "train.ckpt_interval=1"]
    Trainer(tinier_config(synthetic_cxr, *options), tmp_path / "run").fit()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"step": 3, "loss": 0.12')  # SIGKILL in the middle of an append
    (tmp_path / "run" / "checkpoints" / ".step_0000003.pt.abc.tmp").write_bytes(b"partial")
    trainer = Trainer(tinier_config(synthetic_cxr, *options), tmp_path / "run", resume=True,
                      resume_override=["train.max_steps=3"])
    assert not any((tmp_path / "run" / "checkpoints").glob(".*.tmp"))  # stale temp file removed
    trainer.fit()
    assert [r["step"] for r in read_jsonl(metrics) if "loss" in r] == [1, 2, 3]


# -- signals ---------------------------------------------------------------------------------------------------
def run_train(config: Path, work_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MMVL_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "train.py"), str(config), "--work-dir",
                             str(work_dir), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def logged_step(work_dir: Path) -> int:
    path = work_dir / "metrics.jsonl"
    steps = [r["step"] for r in read_jsonl(path) if "loss" in r] if path.is_file() else []
    return max(steps, default=0)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended early ({process.returncode}): {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training made no progress")
        time.sleep(0.01)


def test_sigkill_at_a_random_step_then_resume_gives_identical_weights(synthetic_cxr, tmp_path):
    max_steps = 12
    cfg = tinier_config(synthetic_cxr, f"train.max_steps={max_steps}", "train.ckpt_interval=3",
                        "train.deterministic=True", "model.image_encoder.drop_rate=0.1",
                        "model.image_encoder.token_drop=0.25", keep_checkpoints=2)  # dropout and token drop draw RNG
    config = tmp_path / "config.py"
    cfg.dump(config)
    kill_at = random.randint(4, max_steps - 1)  # after the first checkpoint (step 3), before the end
    straight = run_train(config, tmp_path / "straight")  # the uninterrupted run, alongside
    killed = run_train(config, tmp_path / "killed")
    wait_for(lambda: logged_step(tmp_path / "killed") >= kill_at
             and step_checkpoints(tmp_path / "killed" / "checkpoints"), killed)
    killed.send_signal(signal.SIGKILL)  # wherever it is: mid-step, mid-log-line, mid-checkpoint write
    killed.wait()
    reached = logged_step(tmp_path / "killed")
    assert killed.returncode == -signal.SIGKILL and reached < max_steps, f"kill_at={kill_at}"

    resumed = run_train(config, tmp_path / "killed", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"done: {max_steps} steps" in out and "resumed from" in err
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == max_steps
    assert_same_training_state(a, b)
    losses = [{k: r[k] for k in r if "loss" in k or k in ("step", "lr")}
              for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    again = [{k: r[k] for k in r if "loss" in k or k in ("step", "lr")}
             for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "loss" in r]
    assert again == losses, f"kill_at={kill_at}, reached {reached}"  # every step once, same loss, same lr
    assert len(step_checkpoints(tmp_path / "killed" / "checkpoints")) == 2


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_writes_a_checkpoint_and_exits_with_status_0(synthetic_cxr, tmp_path, workers):
    config = tmp_path / "config.py"
    tinier_config(synthetic_cxr, "train.max_steps=100000", "train.ckpt_interval=100000",
                  f"train.num_workers={workers}").dump(config)
    work = tmp_path / "run"
    process = run_train(config, work)
    wait_for(lambda: logged_step(work) >= 2, process)
    # What a cluster scheduler sends before pre-empting the job, to every process of it: loader workers too.
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    step = logged_step(work)  # the step in progress was finished and logged
    checkpoint = work / "checkpoints" / f"step_{step:07d}.pt"
    assert f"stopped by SIGTERM at step {step} of 100000; checkpoint {checkpoint}" in out
    # the printed command resumes with the run's own config (the options it was started with included)
    assert f"continue with: python tools/train.py {work / 'config.py'} --work-dir {work} --resume" in out
    assert "SIGTERM received" in err
    assert verify_checksum(checkpoint) and os.path.samefile(checkpoint, work / "checkpoints" / "last.pt")
    assert load_checkpoint(checkpoint)["step"] == step


def test_sigint_ends_the_step_and_checkpoints_in_process(synthetic_cxr, tmp_path, one_thread):
    trainer = Trainer(tinier_config(synthetic_cxr, "train.max_steps=50", "train.ckpt_interval=50"), tmp_path / "run")
    step = trainer.train_step

    def interrupted_at_step_3(batches):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the third step
        return step(batches)

    trainer.train_step = interrupted_at_step_3
    previous = signal.getsignal(signal.SIGINT)
    trainer.fit()
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored after fit()
    assert trainer.stop_signal == "SIGINT" and trainer.step == 3
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3


def test_a_repeated_sigterm_still_checkpoints_but_a_second_sigint_stops_at_once(synthetic_cxr, tmp_path, one_thread):
    """SLURM signals every process and torchrun forwards its own SIGTERM: two SIGTERMs must still checkpoint.
    Ctrl-C twice means "now"."""
    trainer = Trainer(tinier_config(synthetic_cxr, "train.max_steps=50", "train.ckpt_interval=50"), tmp_path / "term")
    step = trainer.train_step

    def twice(batches, sig=signal.SIGTERM):
        if trainer.step == 2:
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)
        return step(batches)

    trainer.train_step = twice
    trainer.fit()
    assert trainer.stop_signal == "SIGTERM" and trainer.step == 3
    assert load_checkpoint(tmp_path / "term" / "checkpoints" / "last.pt")["step"] == 3

    trainer = Trainer(tinier_config(synthetic_cxr, "train.max_steps=50", "train.ckpt_interval=50"), tmp_path / "int")
    step = trainer.train_step
    trainer.train_step = lambda batches: twice(batches, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        trainer.fit()
    assert not (tmp_path / "int" / "checkpoints" / "last.pt").exists()


# -- numerical guards ------------------------------------------------------------------------------------------
def test_nan_batch_and_inf_gradient_are_skipped_logged_and_counted(synthetic_cxr, tmp_path, one_thread):
    trainer = Trainer(tinier_config(synthetic_cxr, "train.max_steps=3"), tmp_path / "run")
    forward, calls, ids = trainer.model.forward, [], {}
    param = next(p for p in trainer.model.parameters() if p.requires_grad)

    def injected(batch):
        if not trainer.model.training:  # the validation at the last step
            return forward(batch)
        calls.append(1)
        if len(calls) in (2, 4):
            ids[len(calls)] = [m["study_id"] for m in batch["meta"]]
        if len(calls) == 2:  # a corrupt scan: NaN pixels give a NaN loss
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        if len(calls) == 4:  # finite loss, infinite gradient
            param.register_hook(lambda grad: None if len(calls) != 4 else grad * float("inf"))
        return forward(batch)

    trainer.model.forward = injected
    trainer.fit()
    assert trainer.step == 3 and len(calls) == 5 and trainer.skipped_steps == 2 and trainer.bad_steps == 0
    records = read_jsonl(tmp_path / "run" / "bad_steps.jsonl")
    assert [(r["step"], r["reason"], r["samples"], r["consecutive"]) for r in records] == [
        (2, "non-finite loss", ids[2], 1), (3, "non-finite gradient norm", ids[4], 1)]
    assert [r["skipped_steps"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [0, 1, 2]
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["skipped_steps"] == 2


def test_consecutive_nan_batches_stop_naming_step_samples_and_last_good_checkpoint(synthetic_cxr, tmp_path,
                                                                                     one_thread):
    trainer = Trainer(tinier_config(synthetic_cxr, "train.max_steps=10", "train.ckpt_interval=2",
                                    "train.max_bad_steps=3"), tmp_path / "run")
    forward, calls = trainer.model.forward, []

    def nan_from_the_third_batch(batch):
        calls.append([m["study_id"] for m in batch["meta"]])
        out = forward(batch)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) >= 3 else out

    trainer.model.forward = nan_from_the_third_batch
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    message = str(info.value)
    assert message.startswith("3 consecutive bad steps ending at step 2 (non-finite loss)")
    assert f"last samples {calls[-1]}" in message and f"last good checkpoint: {checkpoint}" in message
    assert "bad_steps.jsonl" in message
    assert [r["consecutive"] for r in read_jsonl(tmp_path / "run" / "bad_steps.jsonl")] == [1, 2, 3]


def test_fp16_overflow_lowers_the_loss_scale_without_counting_a_bad_step(synthetic_cxr, tmp_path, one_thread):
    trainer = Trainer(tinier_config(synthetic_cxr, "train.max_steps=3", "train.amp=fp16", "train.max_bad_steps=1"),
                      tmp_path / "run")
    assert trainer.scaler.is_enabled()
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    overflow = [True]

    def overflow_once(grad):  # an fp16 gradient that overflowed at the current loss scale
        if overflow:
            overflow.clear()
            return grad * float("inf")
        return grad

    param.register_hook(overflow_once)
    trainer.fit()  # max_bad_steps=1: a bad step would have stopped the run
    assert trainer.step == 3 and trainer.skipped_steps == 0 and trainer.overflow_steps >= 1
    scales = [r["loss_scale"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert scales[0] <= 65536 / 2  # GradScaler's initial scale, halved by the overflow
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["scaler"]["scale"] == scales[-1] and state["overflow_steps"] == trainer.overflow_steps


class _Payload:
    """Unpickling this runs code: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs_it(tmp_path):
    """weights_only=True everywhere: a pickled payload with a valid checksum is a CheckpointError and does not run,
    in load_checkpoint (which every loader goes through, zoo included) and in --resume's search."""
    from mmvl.engine.checkpoint import load_newest_checkpoint, save_checkpoint

    marker = tmp_path / "ran"
    ckpt_dir = tmp_path / "work" / "checkpoints"
    path = save_checkpoint(ckpt_dir / "step_1.pt", {"model": {}, "step": 1, "x": _Payload(marker)})
    assert verify_checksum(path) is True
    with pytest.raises(CheckpointError, match="step_1.pt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_newest_checkpoint(ckpt_dir)
    assert not marker.exists()
    torch.load(ckpt_dir / "step_1.pt.corrupt", weights_only=False)  # the same file, unpickled unsafely: runs
    assert marker.read_text() == "pwned"
