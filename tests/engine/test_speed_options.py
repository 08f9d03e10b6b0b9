"""Speed switches change how a step runs, not what it computes: torch.compile, channels-last, and the
optimizer's fused/foreach choice give the losses of the plain run."""

from __future__ import annotations

import pytest
import torch

from mmvl.engine.checkpoint import load_checkpoint
from mmvl.engine.optim import build_optimizer
from mmvl.engine.trainer import Trainer
from mmvl.utils import read_jsonl
from tests.conftest import tiny_clip_config


def _losses(synthetic_cxr, work_dir, *options, dropout=True):
    cfg = tiny_clip_config(synthetic_cxr, "train.max_steps=3", "train.batch_size=8", "train.val_interval=100",
                           "train.ckpt_interval=100", "optim.warmup_steps=1", *options)
    if not dropout:  # masks drawn per chunk differ from masks drawn for the whole batch
        cfg["model"]["text_encoder"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    Trainer(cfg, work_dir).fit()
    return [record["loss"] for record in read_jsonl(work_dir / "metrics.jsonl") if "loss" in record]


@pytest.mark.slow
def test_compile_and_channels_last_give_the_plain_losses(synthetic_cxr, tmp_path, one_thread):
    plain = _losses(synthetic_cxr, tmp_path / "plain")
    assert len(plain) == 3
    # aot_eager: torch.compile's graph capture and autograd tracing without a C++ toolchain (inductor needs one)
    compiled = _losses(synthetic_cxr, tmp_path / "compiled", "train.compile=aot_eager")
    channels_last = _losses(synthetic_cxr, tmp_path / "cl", "train.channels_last=True")
    assert compiled == pytest.approx(plain, rel=1e-4)
    assert channels_last == pytest.approx(plain, rel=1e-4)


def test_fused_adamw_only_for_plain_cuda_parameters():
    model = torch.nn.Linear(4, 2)
    assert not build_optimizer(model, {"lr": 1e-3}).defaults.get("fused")  # CPU: torch's default loop
    assert build_optimizer(model, {"lr": 1e-3, "fused": True}).defaults["fused"]  # asked for: passed through
    if torch.cuda.is_available():
        assert build_optimizer(model.cuda(), {"lr": 1e-3}).defaults["fused"]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["clip", "siglip"])
def test_gradient_caching_gives_the_plain_step(synthetic_cxr, tmp_path, one_thread, head):
    """4 chunks of 2: the loss of the batch of 8 and its gradients, so the same losses and weights."""
    options = [f"model.heads.0.type={head}"]
    plain = _losses(synthetic_cxr, tmp_path / "plain", *options, dropout=False)
    cached = _losses(synthetic_cxr, tmp_path / "cached", *options, "train.grad_cache_chunks=4", dropout=False)
    assert cached == pytest.approx(plain, rel=1e-5)
    a = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cached" / "checkpoints" / "last.pt")["model"]
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_gradient_caching_refuses_models_it_cannot_split(synthetic_cxr, tmp_path):
    from mmvl.errors import ConfigError

    cfg = tiny_clip_config(synthetic_cxr, "train.grad_cache_chunks=2")
    cfg["model"]["heads"].append(dict(type="mae", mask_ratio=0.75))
    with pytest.raises(ConfigError, match="one contrastive head"):
        Trainer(cfg, tmp_path / "x")


def test_keep_freed_memory_applies_on_glibc():
    import platform

    from mmvl.engine.strategy import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
