"""Run under ``torchrun --nproc-per-node 2`` by tests/engine/test_strategy.py (gloo, CPU). Each rank writes
``OUT_DIR/rank<r>.json`` with:

- ``fsdp_units``: FSDP units after :func:`mmvl.engine.strategy.fully_shard_blocks` on a depth-3 timm ViT (the
  image tower mmvl builds), and the loss of one forward/backward through the sharded model;
- ``buckets``: :meth:`Strategy.average_gradients` with a small bucket size: its all-reduce count and the averaged
  gradients (each rank's gradients are ``rank + 1``);
- ``grad_cache``: with a config path, one training step of that config (``train.grad_cache_chunks`` set) with
  every ``torch.distributed.all_reduce`` of the step counted, and the trainable parameter count.

``python strategy_worker.py OUT_DIR [CONFIG WORK_DIR]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mmvl.engine.dist import init_distributed, shutdown_distributed
from mmvl.engine.strategy import Strategy, fully_shard_blocks
from mmvl.registry import ENCODERS

VIT_DEPTH = 3
TRAIN_CFG = {"strategy": "ddp", "amp": None, "find_unused_parameters": False, "dist_backend": "gloo",
             "device": "cpu"}


def fsdp_units() -> dict:
    from torch.distributed.fsdp import FSDPModule

    import mmvl.models  # noqa: F401  (registers the encoders)

    torch.manual_seed(0)
    encoder = ENCODERS.build(dict(type="vit2d", model_name="vit_tiny_patch16_224", img_size=32, patch_size=8,
                                  embed_dim=32, depth=VIT_DEPTH, num_heads=2))
    blocks = fully_shard_blocks(encoder)
    units = [name for name, module in encoder.named_modules() if isinstance(module, FSDPModule)]
    loss = encoder(torch.randn(2, 1, 32, 32)).pooled.square().mean()
    loss.backward()
    return {"units": units, "blocks": len(blocks), "depth": VIT_DEPTH, "loss": loss.item()}


def buckets(strategy: Strategy) -> dict:
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 10, 10, 30, 5)]
    for param in params[:-1]:
        param.grad = torch.full_like(param, float(strategy.dist.rank + 1))  # the last has none: zeros
    calls = strategy.average_gradients(params, bucket_bytes=20 * 4)  # 20 float32 per bucket
    return {"all_reduces": calls, "grads": [param.grad.tolist() for param in params]}


def grad_cache_step(config: str, work_dir: str) -> dict:
    from mmvl.config import Config
    from mmvl.engine.trainer import Trainer

    counted: list[int] | None = None
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        if counted is not None:
            counted.append(int(tensor.numel()))
        return all_reduce(tensor, *args, **kwargs)

    trainer = Trainer(Config.fromfile(config), Path(work_dir))
    train_step = trainer.train_step
    steps: list[list[int]] = []

    def counting_step(*args, **kwargs):
        nonlocal counted
        counted = []
        try:
            return train_step(*args, **kwargs)
        finally:
            steps.append(counted)
            counted = None

    trainer.train_step = counting_step
    dist.all_reduce = counting_all_reduce
    try:
        trainer.fit()
    finally:
        dist.all_reduce = all_reduce
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    return {"steps": steps, "parameters": len(trainable), "numel": sum(p.numel() for p in trainable)}


def main() -> None:
    out = Path(sys.argv[1])
    info = init_distributed("gloo")
    strategy = Strategy(TRAIN_CFG)
    result = {"world_size": info.world_size, "fsdp_units": fsdp_units(), "buckets": buckets(strategy)}
    if len(sys.argv) > 3:
        result["grad_cache"] = grad_cache_step(sys.argv[2], sys.argv[3])
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
