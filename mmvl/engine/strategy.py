"""Where and how the model runs: the device, DDP or FSDP2 wrapping under ``torchrun``, gradient-sync control for
accumulation, full (unsharded) model and optimizer states for checkpoints, and the rank agreement that keeps
every process taking the same decisions (one fused all-reduce per step)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mmvl.engine.dist import all_gather_objects, all_reduce, barrier, broadcast_object, init_distributed
from mmvl.errors import CheckpointError, ConfigError
from mmvl.utils import get_logger

logger = get_logger(__name__)
GRAD_BUCKET_BYTES = 25 * 2**20  # DDP's bucket_cap_mb default


class Strategy:
    """One process of a run: ``rank``/``world_size``, ``device`` and the wrapped training model.

    ``train_cfg`` keys read: ``device``, ``strategy`` (``ddp`` or ``fsdp``), ``dist_backend``, ``amp`` (FSDP's
    mixed-precision policy), ``find_unused_parameters``.
    """

    def __init__(self, train_cfg: Mapping[str, Any]):
        self.kind = train_cfg["strategy"]
        if self.kind not in ("ddp", "fsdp"):
            raise ConfigError(f"train.strategy must be 'ddp' or 'fsdp', got {self.kind!r}")
        self.amp = train_cfg["amp"]
        self.find_unused_parameters = bool(train_cfg["find_unused_parameters"])
        self.dist = init_distributed(train_cfg["dist_backend"])
        device = torch.device(train_cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self.replicated: list[nn.Parameter] = []  # parameters outside DDP's/FSDP's gradient reduction
        self.train_model: nn.Module | None = None

    @property
    def enabled(self) -> bool:
        return self.dist.enabled

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def fsdp(self) -> bool:
        return self.dist.enabled and self.kind == "fsdp"

    # -- wrapping --------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """What the training step calls: the model itself, DDP around it, or the model sharded in place by
        FSDP2 (``fully_shard`` on every :func:`transformer_blocks` unit, then the whole). Contrastive heads gather
        embeddings from every rank with gradients (open_clip's ``gather_with_grad``)."""
        self.replicated = []
        if not self.dist.enabled:
            self.train_model = model
            return model
        model.set_world(self.dist.rank, self.dist.world_size)
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Buffers are broadcast from rank 0 before every forward only where training changes them (batch-norm
            # statistics); the ViT/BERT towers' buffers are constants (position ids), and the broadcast would be one
            # more collective per step. Gradients are views into DDP's buckets: no copy in or out of them.
            running_stats = any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                                for m in model.modules())
            self.train_model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters, broadcast_buffers=running_stats,
                gradient_as_bucket_view=True)
            return self.train_model
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.amp == "bf16" else MixedPrecisionPolicy()
        # scalars (logit scale and bias) cannot be sharded: they stay replicated, gradients averaged by hand
        self.replicated = [p for p in model.parameters() if p.ndim == 0 and p.requires_grad]
        blocks = fully_shard_blocks(model, policy, ignored_params=set(self.replicated))
        logger.info("FSDP: %d blocks sharded over %d ranks", len(blocks), self.dist.world_size)
        self.train_model = model
        return model

    def gradient_sync(self, model: nn.Module, last_micro_batch: bool):
        """DDP/FSDP: gradients are reduced across ranks on the last micro-batch of an accumulated step only."""
        if not self.dist.enabled or last_micro_batch:
            return contextlib.nullcontext()
        if isinstance(self.train_model, nn.parallel.DistributedDataParallel):
            return self.train_model.no_sync()
        return _fsdp_no_sync(model)

    def average_gradients(self, params: list[nn.Parameter], bucket_bytes: int = GRAD_BUCKET_BYTES) -> int:
        """Average ``params``' gradients over the ranks (a parameter without a gradient counts as zeros), for
        gradients outside DDP's/FSDP's own reduction (gradient caching runs the encoders outside DDP's forward,
        so its hooks do not fire). Gradients go in buckets of at most ``bucket_bytes`` (DDP's default 25 MiB), one
        flat all-reduce per bucket: a few collectives, never one per parameter, and at most one bucket of extra
        memory at a time. Returns the number of all-reduces."""
        if not self.dist.enabled or not params:
            return 0
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        buckets = gradient_buckets([param.grad for param in params], bucket_bytes)
        for grads in buckets:
            flat = torch._utils._flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat)
            flat.div_(self.dist.world_size)
            for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)
        return len(buckets)

    # -- rank agreement --------------------------------------------------------------------------------
    def agree(self, values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
        """``values`` summed over the ranks in one all-reduce (one device sync): a non-finite loss on any rank,
        a stop signal any rank received, the count of unreadable samples, so every rank decides alike."""
        keys = sorted(values)
        if not self.dist.enabled:
            return {key: float(values[key]) for key in keys}
        tensor = torch.stack([torch.as_tensor(values[key], dtype=torch.float64, device=self.device).reshape(())
                              for key in keys])
        torch.distributed.all_reduce(tensor)
        return dict(zip(keys, tensor.tolist()))

    def reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Logged values averaged over the ranks (``samples`` summed: the step's global batch)."""
        if not self.dist.enabled:
            return logs
        keys = sorted(logs)
        values = all_reduce([logs[key] for key in keys], self.dist, op="sum", device=self.device)
        return {key: value if key == "samples" else value / self.dist.world_size for key, value in zip(keys, values)}

    def gather(self, obj: Any) -> list[Any]:
        return all_gather_objects(obj, self.dist)

    def broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj, self.dist)

    def on_main(self, work: Callable[[], Any]) -> Any:
        """``work()`` on rank 0 only (file-system decisions one process must take), its result given to every
        rank; a ``ConfigError`` or ``CheckpointError`` it raises is raised on every rank, so none waits at a barrier
        for the others (those two pickle as they are; ``DataError``'s two-argument constructor would not)."""
        outcome: Any = None
        if self.is_main:
            try:
                outcome = work()
            except (ConfigError, CheckpointError) as err:
                outcome = err
        outcome = self.broadcast(outcome)
        if isinstance(outcome, (ConfigError, CheckpointError)):
            raise outcome
        return outcome

    def barrier(self) -> None:
        barrier(self.dist)

    def gather_tensors(self, state: Any) -> list[Any]:
        """Every rank's ``state`` holding tensors (``all_gather_object``'s unpickler refuses tensors: as bytes)."""
        if not self.dist.enabled:
            return [state]
        return [_from_bytes(b) for b in all_gather_objects(_to_bytes(state), self.dist)]

    # -- full states -----------------------------------------------------------------------------------
    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Unsharded model and optimizer states; with FSDP every rank takes part, rank 0 gets them on the CPU."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return model.state_dict(), optimizer.state_dict()

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=optimizer_state_by_name(model, optimizer, state["optimizer"]),
                           options=StateDictOptions(full_state_dict=True))
            return
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (an optimizer state dict) keyed by parameter name, as ``set_state_dict`` reads it. A checkpoint of
    one process or of DDP keys its parameters by position (``torch.optim.Optimizer.state_dict``), FSDP's by name:
    positions are mapped to the names of this optimizer's parameters in the same order, so a run started on one
    process or under DDP continues under FSDP (``Optimizer.load_state_dict`` itself maps by position)."""
    saved = [key for group in state["param_groups"] for key in group["params"]]
    if not saved or all(isinstance(key, str) for key in saved):
        return dict(state)
    name_of = {id(param): name for name, param in model.named_parameters()}
    names = [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]
    sizes = [len(group["params"]) for group in state["param_groups"]]
    if sizes != [len(group["params"]) for group in optimizer.param_groups]:
        raise CheckpointError(f"the checkpoint's optimizer has parameter groups of {sizes} parameters, the "
                              f"configured model {[len(g['params']) for g in optimizer.param_groups]}")
    rename = dict(zip(saved, names))
    return {"state": {rename[key]: value for key, value in state["state"].items()},
            "param_groups": [{**group, "params": [rename[key] for key in group["params"]]}
                             for group in state["param_groups"]]}


def gradient_buckets(grads: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """``grads`` in order, cut into runs of one dtype and device of at most ``bucket_bytes`` each (a gradient larger
    than that is a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for grad in grads:
        nbytes = grad.numel() * grad.element_size()
        last = buckets[-1][-1] if buckets else None
        if last is None or (last.dtype, last.device) != (grad.dtype, grad.device) or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(grad)
        size += nbytes
    return buckets


def fully_shard_blocks(model: nn.Module, mp_policy: Any = None, ignored_params: set[nn.Parameter] | None = None) \
        -> list[nn.Module]:
    """FSDP2 ``fully_shard`` on every :func:`transformer_blocks` unit, then on the whole model (the root unit
    holding what no block holds): ``len(blocks) + 1`` units. Returns the blocks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy, ignored_params=ignored_params)
    return blocks


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the trainable, non-leaf members of every ``nn.ModuleList`` or
    ``nn.Sequential`` whose members are all of one class, whichever container the library chose (timm's ViT
    ``blocks`` is a ``Sequential``; MONAI's ViT ``blocks``, open_clip's ``resblocks`` and a BERT ``encoder.layer``
    are ``ModuleList``s). Only the innermost such blocks count: a Swin stage holding a ``Sequential`` of blocks
    gives its blocks, not itself. Leaf layers (``Sequential(Linear, GELU, Linear)``) are no blocks."""
    candidates: list[nn.Module] = []
    for container in model.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            continue
        members = list(container)
        if len({type(member) for member in members}) != 1:
            continue
        candidates.extend(member for member in members
                          if next(member.children(), None) is not None
                          and any(p.requires_grad for p in member.parameters()))
    chosen = {id(block): block for block in candidates}
    outer = {key for key, block in chosen.items()
             if any(id(sub) in chosen for sub in block.modules() if sub is not block)}
    return [block for key, block in chosen.items() if key not in outer]


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _to_bytes(state: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory below 1 GiB for reuse and to serve allocations below 32 MiB from
    its heap (``mallopt`` M_TRIM_THRESHOLD / M_MMAP_THRESHOLD, as the MALLOC_*_ environment variables would).
    A CPU training step frees and re-allocates the same activation buffers every step; by default glibc returns
    many of them to the OS and page-faults them back in (~10k faults per step in benchmarks/bench_train.py).
    Process-wide, so only on request (``train.keep_freed_memory=True``). False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 32 << 20))
