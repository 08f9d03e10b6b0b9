"""Training on CUDA: a bfloat16 CLIP step is finite and close to float32, fused AdamW takes the steps of the
per-tensor loop, a checkpoint resumes bitwise with ``train.deterministic=True``, FSDP2 runs in one process, and
``train.compile=True`` (inductor) gives the eager losses. Skipped without CUDA (CI); run by
benchmarks/gpu_check.py on a GPU machine."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
from torch import nn

from mmvl.engine.checkpoint import load_checkpoint, step_checkpoint_name
from mmvl.engine.optim import build_optimizer
from mmvl.engine.trainer import Trainer
from tests.engine.test_crash_safety import assert_same_training_state, tinier_config
from tests.engine.test_speed_options import _losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_clip_steps_are_finite_and_close_to_float32(synthetic_cxr, tmp_path):
    # Dropout off: CUDA's dropout draws its mask per vectorised chunk, whose width depends on the dtype.
    exact = _losses(synthetic_cxr, tmp_path / "fp32", "train.device='cuda'", "train.amp=None", dropout=False)
    low = _losses(synthetic_cxr, tmp_path / "bf16", "train.device='cuda'", "train.amp='bf16'", dropout=False)
    assert len(low) == len(exact) == 3 and all(math.isfinite(v) for v in low)
    # The first loss comes from the same weights: a log-softmax over 8 logits made by ~10 stacked bfloat16-rounded
    # products (eps 7.8e-3 each, errors partly cancelling); later ones also carry the steps' differences.
    assert low[0] == pytest.approx(exact[0], rel=2e-2)
    assert low == pytest.approx(exact, rel=5e-2)


def test_fused_adamw_takes_the_steps_of_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 8)).cuda()
    loop_model = copy.deepcopy(model)
    cfg = {"lr": 1e-2, "weight_decay": 0.05}
    fused = build_optimizer(model, dict(cfg))
    loop = build_optimizer(loop_model, dict(cfg, fused=False))
    assert fused.defaults["fused"] and not loop.defaults.get("fused")
    inputs = torch.randn(16, 32, device="cuda")
    for _ in range(5):
        for net, optimizer in ((model, fused), (loop_model, loop)):
            optimizer.zero_grad()
            net(inputs).square().mean().backward()
            optimizer.step()
    # One update formula in float32 either way; the fused kernel orders a few operations per element differently
    # (a few ulp per step), far below what a wrong bias correction or weight decay would move (~lr * wd = 5e-4).
    for (name, a), b in zip(model.named_parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(fused.state.values(), loop.state.values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], atol=1e-9, rtol=1e-5)


def test_checkpoint_resumes_bitwise_on_cuda(synthetic_cxr, tmp_path):
    cfg = tinier_config(synthetic_cxr, "train.device='cuda'", "train.max_steps=4", "train.ckpt_interval=2",
                        "train.deterministic=True", "model.image_encoder.drop_rate=0.1",
                        "model.image_encoder.token_drop=0.25", keep_checkpoints=2)  # dropout and token drop draw RNG
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:  # the trainer switches torch's deterministic mode on for the process: the later tests get it back off
        Trainer(cfg, straight).fit()
        # The run as a crash after step 2 leaves it: the checkpoints after step 2 gone, then --resume.
        shutil.copytree(straight, resumed)
        for path in (resumed / "checkpoints").iterdir():
            if not path.name.startswith(step_checkpoint_name(2)):
                path.unlink()
        Trainer(cfg, resumed, resume=True).fit()
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    a = load_checkpoint(straight / "checkpoints" / step_checkpoint_name(4))
    b = load_checkpoint(resumed / "checkpoints" / step_checkpoint_name(4))
    assert a["step"] == b["step"] == 4
    assert_same_training_state(a, b)


def test_fsdp2_in_one_process_on_cuda(tmp_path):
    """FSDP2 (mmvl's ``fully_shard_blocks``) on a one-process NCCL group takes the plain model's steps. The trainer
    shards only under torchrun with several processes, so the sharding is called as the strategy calls it."""
    import timm
    import torch.distributed as dist

    from mmvl.engine.strategy import fully_shard_blocks

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                                  num_heads=2, num_classes=0, in_chans=1).cuda()
        sharded = copy.deepcopy(plain)
        blocks = fully_shard_blocks(sharded)
        assert len(blocks) == 2
        images = torch.randn(4, 1, 32, 32, device="cuda")
        losses = {}
        for name, model in (("plain", plain), ("sharded", sharded)):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
            for _ in range(3):
                optimizer.zero_grad()
                loss = model(images).square().mean()
                loss.backward()
                optimizer.step()
                losses.setdefault(name, []).append(loss.item())
        assert losses["sharded"] == pytest.approx(losses["plain"], rel=1e-5)
        for (name, a), b in zip(plain.named_parameters(), sharded.parameters()):
            full = b.full_tensor() if hasattr(b, "full_tensor") else b
            torch.testing.assert_close(full, a, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        dist.destroy_process_group()


def test_compile_gives_the_eager_losses(synthetic_cxr, tmp_path):
    """Last in this file: inductor's first compile takes tens of seconds, and gpu_check's budget may end in it."""
    options = ("train.device='cuda'", "train.amp=None")  # float32: only the order of sums may differ
    eager = _losses(synthetic_cxr, tmp_path / "eager", *options, dropout=False)  # no RNG inside the graph
    compiled = _losses(synthetic_cxr, tmp_path / "compiled", *options, "train.compile=True", dropout=False)
    assert len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)
