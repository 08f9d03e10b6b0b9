"""Run under ``torchrun --nproc-per-node 2`` by tests/engine/test_distributed.py: each rank takes its half of a
fixed batch of 8 through a small image/text model with a contrastive head wrapped in DDP (gloo, CPU), and saves
its loss and the (DDP-averaged) gradients for the test to compare with one process on the whole batch.

``python dist_worker.py OUT_DIR``; the batch and the variants come from ``OUT_DIR/inputs.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mmvl.engine.dist import shutdown_distributed
from mmvl.models.encoders.base import EncoderOutput
from mmvl.registry import HEADS


class TwoTowers(nn.Module):
    """Linear "encoders" in front of a contrastive head: enough to check the loss and its gradients."""

    def __init__(self, head: dict):
        super().__init__()
        self.image = nn.Linear(16, 32)
        self.text = nn.Linear(12, 24)
        self.head = HEADS.build(dict(head, image_dim=32, text_dim=24, embed_dim=8))

    def forward(self, images: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        image = EncoderOutput(pooled=self.image(images), tokens=images[:, None])
        text = EncoderOutput(pooled=self.text(texts), tokens=texts[:, None])
        return self.head(image, text, {"labels": labels})["loss"]


def run(head: dict, inputs: dict, rank: int = 0, world_size: int = 1) -> dict:
    """Loss and gradients of this rank's rows (all rows in one process)."""
    torch.manual_seed(0)
    model = TwoTowers(head)
    if world_size > 1:
        model.head.set_world(rank, world_size)
        model = nn.parallel.DistributedDataParallel(model)
    rows = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    loss = model(inputs["images"][rows], inputs["texts"][rows], inputs["labels"][rows])
    loss.backward()
    module = model.module if world_size > 1 else model
    return {"loss": loss.detach(), "grads": {name: p.grad.clone() for name, p in module.named_parameters()}}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inputs = torch.load(out / "inputs.pt", weights_only=True)
    results = {name: run(head, inputs, rank, world_size) for name, head in inputs["heads"].items()}
    torch.save(results, out / f"rank{rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
