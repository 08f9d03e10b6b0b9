from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from mmvl.config import Config
from mmvl.data.tokenizer import load_tokenizer
from mmvl.engine.checkpoint import load_checkpoint
from mmvl.engine.trainer import Trainer
from mmvl.errors import CheckpointError, ConfigError, ManifestError
from tests.conftest import tiny_clip_config as tiny_config

REPO = Path(__file__).resolve().parents[2]


def read_metrics(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_identical_weights(synthetic_cxr, tmp_path):
    options = ["train.max_steps=6", "train.batch_size=16", "train.val_interval=100", "train.ckpt_interval=3",
               "optim.warmup_steps=2"]
    straight = Trainer(tiny_config(synthetic_cxr, *options), tmp_path / "straight")
    straight.fit()

    # The same run killed right after its step-3 checkpoint, then resumed.
    class Killed(Exception):
        pass

    class KilledAfterFirstCheckpoint(Trainer):
        def save_checkpoint(self):
            path = super().save_checkpoint()
            raise Killed(path)

    with pytest.raises(Killed):
        KilledAfterFirstCheckpoint(tiny_config(synthetic_cxr, *options), tmp_path / "resumed").fit()
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 3
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it from the checkpoint
    resumed = Trainer(tiny_config(synthetic_cxr, *options), tmp_path / "resumed", resume=True)
    assert resumed.step == 3
    resumed.fit()

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [m["step"] for m in read_metrics(tmp_path / "resumed") if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # metrics after the checkpoint are not duplicated


@pytest.mark.slow
def test_tiny_clip_learns(synthetic_cxr, tiny_clip):
    work, metrics = tiny_clip  # 300 steps of the tiny config, batch 32
    records = read_metrics(work)
    losses = [m["loss"] for m in records if "loss" in m]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)  # the contrastive loss falls from log(batch size)
    n_val = sum(1 for line in synthetic_cxr.read_text().splitlines() if '"split": "val"' in line)
    chance = 5 / n_val
    assert metrics["val/i2t_R@5"] >= 2 * chance, (metrics, chance)
    for name in ("config.py", "preprocess.json", "tokenizer/tokenizer.json", "checkpoints/last.pt",
                 "checkpoints/best.pt", "train.log", "plots/loss.png", "plots/lr.png", "plots/val.png"):
        assert (work / name).is_file(), name
    assert any((work / "tensorboard").iterdir())
    record = records[-2]
    assert {"lr", "samples_per_s", "clip/logit_scale", "data_time", "batch_time"} <= set(record)


def test_config_dumped_to_work_dir_reproduces_the_run(synthetic_cxr, tmp_path):
    cfg = tiny_config(synthetic_cxr, "train.max_steps=1", "train.batch_size=8", "train.val_interval=100")
    trainer = Trainer(cfg, tmp_path / "a")
    again = Config.fromfile(tmp_path / "a" / "config.py")
    assert again.to_dict() == trainer.cfg.to_dict()
    # the config keeps the tokenizer recipe; the model was built from the vocabulary trained into the work dir
    assert again.model.text_encoder.tokenizer == dict(type="wordpiece", vocab_size=1000, min_frequency=2)
    assert len(trainer.model.tokenizer) == len(load_tokenizer(tmp_path / "a" / "tokenizer"))


def test_clear_errors(synthetic_cxr, tmp_path):
    with pytest.raises(ManifestError, match="manifest not found. Prepare MIMIC-CXR"):
        Trainer(Config.fromfile(REPO / "configs" / "cxr_clip.py"), tmp_path / "x")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.max_step' in train\. Did you mean 'max_steps'"):
        cfg = tiny_config(synthetic_cxr)
        cfg.train["max_step"] = 3
        Trainer(cfg, tmp_path / "y")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(tiny_config(synthetic_cxr, "train.batch_size=8"), tmp_path / "z", resume=True)


def test_bf16_autocast_and_accumulation_step(synthetic_cxr, tmp_path):
    cfg = tiny_config(synthetic_cxr, "train.max_steps=2", "train.batch_size=8", "train.accum_steps=2",
                      "train.amp=bf16", "train.val_interval=2")
    trainer = Trainer(cfg, tmp_path / "bf16")
    metrics = trainer.fit()
    records = [m for m in read_metrics(tmp_path / "bf16") if "loss" in m]
    assert [round(m["samples_per_s"] * m["batch_time"]) for m in records] == [16, 16]  # 2 micro-batches of 8
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in records) and "val/i2t_R@5" in metrics


def test_non_finite_loss_skips_then_stops(synthetic_cxr, tmp_path, monkeypatch):
    from mmvl.errors import TrainingError

    trainer = Trainer(tiny_config(synthetic_cxr, "train.max_steps=5", "train.batch_size=8",
                                  "train.max_bad_steps=3", "train.val_interval=100"), tmp_path / "nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda batch: {**forward(batch), "loss": torch.tensor(float("nan"))})
    with pytest.raises(TrainingError, match=r"3 consecutive bad steps ending at step 0 \(non-finite loss\)"):
        trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update from a bad step


def _manifest_with_bad_rows(synthetic_cxr: Path, tmp_path: Path, n_corrupt: int) -> Path:
    """The synthetic set with ``n_corrupt`` training images overwritten by garbage (copies), one empty report
    and one report in Latin-1."""
    from mmvl.data.manifest import load_manifest

    lines = []
    corrupt = 0
    for row in load_manifest(synthetic_cxr):
        record = {key: row[key] for key in ("image", "report", "labels", "split", "study_id")}
        if row["split"] == "train" and corrupt < n_corrupt:
            bad = tmp_path / f"corrupt{corrupt}.dcm"
            bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 20)
            record["image"], corrupt = [str(bad)], corrupt + 1
        lines.append(json.dumps(record).encode())
    lines.append(json.dumps({"image": lines and record["image"], "report": "", "split": "train"}).encode())
    lines.append(json.dumps({"image": record["image"], "report": "FINDINGS: caf\u00e9", "split": "train"})
                 .encode().replace(b"caf\\u00e9", b"caf\xe9"))
    path = tmp_path / "bad_manifest.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_unreadable_samples_are_skipped_logged_and_limited(synthetic_cxr, tmp_path):
    from mmvl.errors import TrainingError

    manifest = _manifest_with_bad_rows(synthetic_cxr, tmp_path, n_corrupt=2)
    with pytest.raises(ManifestError, match="outside the data root"):  # the rows point at synthetic_cxr's folder
        Trainer(tiny_config(manifest), tmp_path / "refused").fit()
    root = os.path.commonpath([synthetic_cxr.parent, tmp_path])
    options = ["train.batch_size=16", "train.val_interval=100", f"data.root={root}"]
    trainer = Trainer(tiny_config(manifest, "train.max_steps=11", *options, "data.max_skip_fraction=0.05"),
                      tmp_path / "skip")
    trainer.fit()  # 11 steps of 16 > one epoch of the 160 training rows: every corrupt file was met
    skipped = [json.loads(line) for line in (tmp_path / "skip" / "skipped.jsonl").read_text().splitlines()]
    at_load = [s for s in skipped if s["step"] == 0]
    assert sorted(s["reason"] for s in at_load) == [
        "'report' is not valid UTF-8 (byte 0xe9); re-encode the manifest as UTF-8",
        "empty report (sections ['findings', 'impression'])"]
    in_training = [s for s in skipped if s["step"] > 0]
    assert {Path(s["path"]).name for s in in_training} == {"corrupt0.dcm", "corrupt1.dcm"}
    assert all("not a DICOM file" in s["reason"] or "corrupt" in s["reason"] for s in in_training)
    assert [m for m in read_metrics(tmp_path / "skip") if "loss" in m][-1]["skipped_samples"] == 2

    strict = Trainer(tiny_config(manifest, "train.max_steps=11", *options, "data.max_skip_fraction=0.005"),
                     tmp_path / "strict")
    expected = r"1 of 160 training samples could not be read.*corrupt.\.dcm: corrupt.*check_data.py"
    with pytest.raises(TrainingError, match=expected):
        strict.fit()


def test_deterministic_fixes_the_cublas_workspace(synthetic_cxr, tmp_path, monkeypatch):
    """``train.deterministic`` sets CUBLAS_WORKSPACE_CONFIG (without it cuBLAS matmuls on a GPU are not
    reproducible, and a bitwise resume fails there); a value the user set is kept."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        Trainer(tiny_config(synthetic_cxr, "train.deterministic=True", "train.max_steps=1"), tmp_path / "a")
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        Trainer(tiny_config(synthetic_cxr, "train.deterministic=True", "train.max_steps=1"), tmp_path / "b")
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before)


def test_fit_stops_its_loader_workers(synthetic_cxr, tmp_path, one_thread):
    # persistent loader workers used to live as long as the Trainer object: one still referenced at interpreter exit
    # (a module-scoped fixture's) kept them into multiprocessing's exit handlers, and CI's `make test` hung after
    # printing its summary. fit() now stops them, and a second fit() starts new ones.
    trainer = Trainer(tiny_config(synthetic_cxr, "train.max_steps=2", "train.batch_size=16", "train.num_workers=2",
                                  "train.val_interval=100", "train.ckpt_interval=100"), tmp_path / "run")
    assert trainer.loader.num_workers == 2 and trainer.loader.persistent_workers
    trainer.fit()
    assert not multiprocessing.active_children()
    trainer.max_steps = 3
    trainer.fit()
    assert trainer.state.step == 3 and not multiprocessing.active_children()
