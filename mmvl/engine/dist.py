"""torch.distributed for the trainer: the process group from ``torchrun``'s environment, and the few
collective operations the training loop needs so that every rank takes the same decisions.

``torchrun --nproc-per-node N tools/train.py CONFIG`` (one node) or with ``--nnodes/--node-rank/--rdzv-*``
(several) sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous; :func:`init_distributed` joins it
with NCCL on GPUs and gloo on CPUs. Without those variables everything here is a no-op for one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mmvl.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group ``torchrun`` describes (or the one already initialised); one process otherwise.

    ``backend``: ``nccl`` (default on CUDA), ``gloo`` (default on CPU). On CUDA each process uses GPU
    ``LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("train.dist_backend='nccl' needs CUDA; use 'gloo' on CPU")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce(values: list[float], info: DistInfo, op: str = "sum", device: Any = "cpu") -> list[float]:
    """``values`` reduced element-wise over the ranks (``sum``, ``max`` or ``min``), in float64."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor.tolist()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable, small: ids, records, RNG states), in rank order."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group at the end of a run (``wait``: after the other ranks finish too). DDP objects are
    collected first: with gloo in torch 2.13 a process that exits while one is alive aborts ("terminate called
    without an active exception")."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    import gc

    gc.collect()
    if wait:
        dist.barrier()
    dist.destroy_process_group()
