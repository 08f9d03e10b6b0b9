"""Distributed training on CPU with gloo: 2 processes launched by torchrun.

- contrastive losses and gradients: 2 ranks x batch 4 (DDP, embeddings gathered with gradients) equal
  1 rank x batch 8 within 1e-5, for CLIP (global and local loss), SigLIP and the label-aware loss;
- the trainer: 2 ranks x batch 4 give the weights of 1 rank x batch 8; a 2-process run resumes with 1 process
  and ends where the 1-process run does; only rank 0 writes the work dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmvl.data.loader import ResumableSampler
from mmvl.engine.checkpoint import load_checkpoint, step_checkpoint_name
from mmvl.engine.trainer import Trainer
from mmvl.utils import read_jsonl
from tests.conftest import REPO, tiny_clip_config
from tests.engine.dist_worker import run

HEADS = {
    "clip": dict(type="clip"),
    "clip_local_loss": dict(type="clip", local_loss=True),
    "siglip": dict(type="siglip"),
    "clip_soft": dict(type="clip_soft", soft_target_weight=0.5),
}


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMVL_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_two_ranks_of_4_equal_one_rank_of_8(tmp_path):
    torch.manual_seed(1)
    labels = torch.randint(-1, 2, (8, 3)).float()
    inputs = {"images": torch.randn(8, 16), "texts": torch.randn(8, 12), "labels": labels, "heads": HEADS}
    torch.save(inputs, tmp_path / "inputs.pt")
    torchrun(str(REPO / "tests" / "engine" / "dist_worker.py"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, head in HEADS.items():
        single = run(head, inputs)
        losses = [ranks[r][name]["loss"] for r in range(2)]
        if name == "clip_local_loss":  # each rank: its rows' terms; their mean is the loss of the whole batch
            torch.testing.assert_close(sum(losses) / 2, single["loss"], atol=1e-5, rtol=1e-5)
        elif name == "siglip":  # each rank: its images against every text, over its image count
            torch.testing.assert_close(sum(losses) / 2, single["loss"], atol=1e-5, rtol=1e-5)
        else:  # every rank computes the loss of the whole gathered batch
            for loss in losses:
                torch.testing.assert_close(loss, single["loss"], atol=1e-5, rtol=1e-5)
        for param, grad in single["grads"].items():
            assert grad.abs().sum() > 0, (name, param)
            for r in range(2):  # DDP leaves the same averaged gradient on both ranks: the 1-process one
                torch.testing.assert_close(ranks[r][name]["grads"][param], grad, atol=1e-5, rtol=1e-5,
                                           msg=lambda m, n=name, p=param, r=r: f"{n} {p} rank {r}: {m}")


def test_ranks_split_each_global_batch():
    """The sampler: rank r takes the r-th quarter... of each global batch, as one process would order them."""
    one = ResumableSampler(22, seed=3)
    order = [index for index, _ in one]
    parts = []
    for rank in range(2):
        sampler = ResumableSampler(22, seed=3, rank=rank, world_size=2, batch_size=4)
        parts.append(list(sampler))
        assert len(sampler) == len(parts[-1]) == 8  # 2 full global batches of 8; the last 6 are dropped
    interleaved = [pair[0] for k in range(2) for part in parts for pair in part[4 * k:4 * k + 4]]
    assert interleaved == order[:16]
    resumed = ResumableSampler(22, seed=3, rank=1, world_size=2, batch_size=4)
    resumed.set_epoch(0, start=8)  # one global batch done
    assert list(resumed) == parts[1][4:]


def _config(manifest: Path, *options: str):
    """The tiny CLIP model without dropout (whose random streams differ between ranks), and AdamW with eps=1 so
    that updates follow the gradients (lr * g) instead of amplifying float rounding in near-zero ones."""
    cfg = tiny_clip_config(manifest, "optim.warmup_steps=1", "train.val_interval=3", "train.ckpt_interval=3",
                           *options)
    cfg["model"]["text_encoder"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg["optim"].update(lr=0.05, eps=1.0, min_lr_ratio=1.0)  # constant: the runs below differ in max_steps
    return cfg


def _losses(work_dir: Path) -> list[float]:
    return [record["loss"] for record in read_jsonl(work_dir / "metrics.jsonl") if "loss" in record]


def _weights(work_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(work_dir / "checkpoints" / "last.pt")["model"]


@pytest.mark.slow
def test_trainer_two_processes_match_one_and_resume_with_one(synthetic_cxr, tmp_path, one_thread):
    cfg = _config(synthetic_cxr, "train.batch_size=4", "train.max_steps=3")
    cfg.dump(tmp_path / "config.py")
    two = tmp_path / "two"
    result = torchrun(str(REPO / "tools" / "train.py"), str(tmp_path / "config.py"), "--work-dir", str(two))
    assert "done: 3 steps" in result.stdout

    one = tmp_path / "one"
    Trainer(_config(synthetic_cxr, "train.batch_size=8", "train.max_steps=6"), one).fit()  # the same global batch
    state = load_checkpoint(two / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and state["step"] == 3 and state["epoch_samples"] == 24
    reference = load_checkpoint(one / "checkpoints" / step_checkpoint_name(3))["model"]
    for name, value in state["model"].items():
        torch.testing.assert_close(value, reference[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # rank 0 alone writes the logs, with the loss of the whole global batch: the 1-process losses
    assert _losses(two) == pytest.approx(_losses(one)[:3], rel=1e-5)

    # the 2-process run continues with 1 process and batch 8: the same data from sample 24 on
    Trainer(_config(synthetic_cxr, "train.batch_size=4", "train.max_steps=3"), two, resume=True,
            resume_override=["train.batch_size=8", "train.max_steps=6"]).fit()
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    final, expected = _weights(two), _weights(one)
    for name, value in final.items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_fsdp_matches_one_process_and_its_checkpoint_resumes_unsharded(synthetic_cxr, tmp_path, one_thread):
    """train.strategy=fsdp (FSDP2 fully_shard on CPU/gloo): the losses of 1 process x batch 8, and a full
    checkpoint that one process resumes."""
    cfg = _config(synthetic_cxr, "train.batch_size=4", "train.max_steps=2", "train.strategy=fsdp")
    cfg.dump(tmp_path / "config.py")
    sharded = tmp_path / "fsdp"
    torchrun(str(REPO / "tools" / "train.py"), str(tmp_path / "config.py"), "--work-dir", str(sharded))
    one = tmp_path / "one"
    Trainer(_config(synthetic_cxr, "train.batch_size=8", "train.max_steps=3"), one).fit()
    assert _losses(sharded) == pytest.approx(_losses(one)[:2], rel=1e-5)
    state = load_checkpoint(sharded / "checkpoints" / "last.pt")
    assert set(state["model"]) == set(_weights(one)) and len(state["optimizer"]["state"]) > 0  # unsharded
    Trainer(_config(synthetic_cxr, "train.batch_size=4", "train.max_steps=2", "train.strategy=fsdp"), sharded,
            resume=True, resume_override=["train.batch_size=8", "train.max_steps=3", "train.strategy=ddp"]).fit()
    assert _losses(sharded) == pytest.approx(_losses(one), rel=1e-5)
