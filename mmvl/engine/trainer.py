"""The training loop: data, model, AdamW + cosine warmup, AMP, accumulation, clipping, validation, checkpoints.

A work directory holds everything needed to repeat or continue a run: ``config.py`` (merged config),
``preprocess.json`` (eval pipeline), ``tokenizer/``, ``metrics.jsonl``, ``skipped.jsonl`` (every sample
left out, with its path and reason), ``bad_steps.jsonl`` (steps skipped for a non-finite loss or gradient,
with their samples), ``tensorboard/``, ``train.log`` and ``checkpoints/``: the last ``train.keep_checkpoints``
``step_<N>.pt``, ``last.pt`` (the newest of them) and ``best.pt``, each with a ``.sha256`` beside it.
``resume=True`` continues exactly from the newest checkpoint that verifies: data order, augmentation seeds,
dropout RNG, optimizer, scheduler and loss-scaler state are all restored, so a run killed at any point and
resumed ends with the same weights as one never interrupted. SIGTERM or SIGINT (pre-emption, Ctrl-C) ends
the current step, writes a checkpoint and returns from ``fit()``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

import mmvl
from mmvl.config import Config
from mmvl.data.datasets import ManifestDataset
from mmvl.data.loader import Collate, ResumableSampler
from mmvl.data.tokenizer import train_wordpiece_tokenizer
from mmvl.data.transforms import save_preprocess
from mmvl.engine.checkpoint import (
    capture_rng_state,
    link_checkpoint,
    load_checkpoint,
    load_newest_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_name,
)
from mmvl.engine.dist import all_gather_objects, all_reduce, barrier, broadcast_object, init_distributed
from mmvl.engine.optim import build_optimizer, build_scheduler
from mmvl.errors import CheckpointError, ConfigError, ManifestError, TrainingError
from mmvl.evaluation.retrieval import retrieval_metrics
from mmvl.models import build_model
from mmvl.registry import DATASETS
from mmvl.utils import (
    append_lines,
    atomic_directory,
    atomic_write_text,
    fsync_file,
    get_logger,
    read_jsonl,
    seed_everything,
)

logger = get_logger(__name__)

TRAIN_DEFAULTS: dict[str, Any] = dict(
    max_steps=1000, batch_size=32, num_workers=2, accum_steps=1, grad_clip=1.0, amp=None, seed=0,
    log_interval=10, val_interval=200, ckpt_interval=200, best_metric="val/i2t_R@5", best_mode="max",
    max_bad_steps=10, keep_checkpoints=3, deterministic=False, device=None, vis_interval=0,
    # torchrun: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 fully_shard of every block, for large encoders)
    strategy="ddp", dist_backend=None, find_unused_parameters=False,
    # speed: torch.compile (True, or a backend name such as "aot_eager"), channels-last images and conv weights
    compile=None, channels_last=False,
    # gradient caching (Gao et al. 2021): encoders run over the batch in this many chunks, the contrastive loss
    # over the whole batch; activation memory of one chunk, the gradients of the whole batch (0: off)
    grad_cache_chunks=0,
    # CPU: glibc keeps freed step buffers for reuse instead of returning them to the OS and faulting them back in
    keep_freed_memory=True,
)
# Below this fp16 loss scale an overflowing gradient is not fixed by scaling down: it counts as a bad step.
MIN_LOSS_SCALE = 1.0
JSONL_LOGS = ("metrics.jsonl", "skipped.jsonl", "bad_steps.jsonl")


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: SIGTERM/SIGINT are the main process's to handle (Slurm signals every process of
    the job, a terminal every process of the group); a worker that died of them would fail the step the main
    process is finishing. Workers still exit with the main process, whatever kills it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    """Build everything from a merged :class:`Config` and run ``fit()``."""

    def __init__(self, cfg: Config, work_dir: str | os.PathLike, resume: bool = False):
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.work_dir / "checkpoints"
        unknown = set(cfg.get("train", {})) - set(TRAIN_DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown train option(s) {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
        self.train_cfg = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
        self.dist = init_distributed(self.train_cfg["dist_backend"])
        self._attach_log_file()
        try:
            self._setup(resume)
        except BaseException:
            self._detach_log_file()
            raise

    def _setup(self, resume: bool) -> None:
        cfg = self.cfg
        if self.train_cfg["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(int(self.train_cfg["seed"]))  # the same on every rank: identical initial weights
        self.device = self._device()
        if self.device.type == "cpu" and self.train_cfg["keep_freed_memory"]:
            keep_freed_memory()

        self.train_set, self.val_set = self._build_datasets(cfg["data"])
        self._prepare_tokenizer()
        self.model = build_model(cfg["model"]).to(self.device)
        if self.train_cfg["channels_last"]:
            self.model.to(memory_format=torch.channels_last)  # 4D (conv) weights; the rest is unaffected
        self.train_model = self._wrap_model()
        self._check_grad_cache()
        if self.train_cfg["compile"]:
            backend = self.train_cfg["compile"] if isinstance(self.train_cfg["compile"], str) else "inductor"
            self.train_model = torch.compile(self.train_model, backend=backend)
        if self.dist.enabled:  # dropout and masks differ between ranks, as their data does
            torch.manual_seed(int(self.train_cfg["seed"]) + 1_000_003 * self.dist.rank)
        self.optimizer = build_optimizer(self.model, cfg.get("optim", {}))
        self.max_steps = int(self.train_cfg["max_steps"])
        self.scheduler = build_scheduler(self.optimizer, cfg.get("optim", {}), self.max_steps)
        amp = self.train_cfg["amp"]
        if amp not in (None, "bf16", "fp16"):
            raise ConfigError(f"train.amp must be None, 'bf16' or 'fp16', got {amp!r}")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

        self.step, self.epoch, self.epoch_samples = 0, 0, 0  # samples of this epoch consumed, all ranks together
        self.best_value: float | None = None
        self.bad_steps = 0  # consecutive
        self.skipped_steps = 0  # in the whole run: non-finite loss or gradient
        self.overflow_steps = 0  # fp16 steps skipped by the loss scaler, which then lowered the scale
        self.skipped_samples = 0
        self.last_checkpoint: Path | None = None
        self.stop_signal: str | None = None
        self._pending_skips: list[dict[str, Any]] = []
        if self.dist.is_main:
            remove_stale_temp_files(self.ckpt_dir)
        self.skipped_indices: set[int] = set()
        self.max_skip_fraction = float(cfg["data"].get("max_skip_fraction", 0.01))
        if resume:
            self._resume()
        elif self.dist.is_main:
            for name in ("skipped.jsonl", "bad_steps.jsonl"):
                (self.work_dir / name).unlink(missing_ok=True)
            self._record_skips([{"step": 0, "split": name, **entry} for name, dataset in
                                (("train", self.train_set), ("val", self.val_set)) if dataset is not None
                                for entry in dataset.skipped_rows])
        if self.dist.is_main:
            cfg.dump(self.work_dir / "config.py")
            save_preprocess(self.work_dir / "preprocess.json", cfg["data"]["eval_pipeline"],
                            mmvl_version=mmvl.__version__)
        self.loader = self._build_loader()
        self.writer = None

    # -- setup ---------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        device = torch.device(self.train_cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        return device

    def _wrap_model(self) -> torch.nn.Module:
        """What the training step calls: the model itself, DDP around it, or the model sharded in place by
        FSDP2 (``fully_shard`` on every block of a ``ModuleList``, then the whole). Contrastive heads gather
        embeddings from every rank with gradients (open_clip's ``gather_with_grad``)."""
        self._replicated: list[torch.nn.Parameter] = []
        if not self.dist.enabled:
            return self.model
        self.model.set_world(self.dist.rank, self.dist.world_size)
        strategy = self.train_cfg["strategy"]
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(self.train_cfg["find_unused_parameters"]))
        if strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            if self.train_cfg["vis_interval"]:
                raise ConfigError("train.vis_interval is not supported with train.strategy='fsdp'; set it to 0")
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if self.train_cfg["amp"] == "bf16" else MixedPrecisionPolicy()
            blocks = [block for module in self.model.modules() if isinstance(module, torch.nn.ModuleList)
                      for block in module if any(p.requires_grad for p in block.parameters())]
            for block in blocks:
                fully_shard(block, mp_policy=policy)
            # scalars (logit scale and bias) cannot be sharded: they stay replicated, gradients averaged by hand
            self._replicated = [p for p in self.model.parameters() if p.ndim == 0 and p.requires_grad]
            fully_shard(self.model, mp_policy=policy, ignored_params=set(self._replicated))
            logger.info("FSDP: %d blocks sharded over %d ranks", len(blocks), self.dist.world_size)
            return self.model
        raise ConfigError(f"train.strategy must be 'ddp' or 'fsdp', got {strategy!r}")

    def _attach_log_file(self) -> None:
        if not self.dist.is_main:  # only rank 0 writes the work dir's logs
            self._log_handler = None
            return
        handler = logging.FileHandler(self.work_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("mmvl").addHandler(handler)
        self._log_handler = handler

    def _detach_log_file(self) -> None:
        if self._log_handler is None:
            return
        logging.getLogger("mmvl").removeHandler(self._log_handler)
        self._log_handler.close()

    def _build_datasets(self, data: Mapping[str, Any]) -> tuple[ManifestDataset, ManifestDataset | None]:
        """``data.type="manifest"`` (default) reads ``data.manifest``; ``"shards"`` streams the webdataset shards
        in ``data.shards`` that ``tools/make_shards.py`` wrote from one (``data.resampled``,
        ``data.shuffle_buffer``)."""
        data = dict(data)
        kind = data.get("type", "manifest")
        streaming = kind == "shards"
        manifest = data.get("shards") if streaming else data.get("manifest")
        if manifest is None:
            raise ConfigError(f"data.{'shards' if streaming else 'manifest'} is not set")
        if not streaming and not os.path.isfile(manifest):
            hint = data.get("prepare_hint", "see datasets/README.md for the manifest format")
            raise ManifestError(manifest, f"manifest not found. {hint}")
        cache_dir = data.get("cache_dir") or self.work_dir / "cache"
        common = dict(
            manifest=manifest,
            report_sections=tuple(data.get("report_sections", ("findings", "impression"))),
            on_error=data.get("on_error", "skip"),
            cache=data.get("cache"),
            cache_dir=cache_dir if data.get("cache") == "disk" else None,
            cache_workers=int(data.get("cache_workers", 0)),
            root=data.get("root"),
            allow_outside_root=bool(data.get("allow_outside_root", False)),
        )
        stream = dict(seed=int(self.train_cfg["seed"]), resampled=bool(data.get("resampled", False)),
                      shuffle_buffer=int(data.get("shuffle_buffer", 1000))) if streaming else {}
        train_set = DATASETS.build(dict(type=kind, split=data.get("train_split", "train"),
                                        pipeline=data["train_pipeline"], **stream, **common))
        val_set = None
        if data.get("val_split"):
            whole = dict(split_by_rank=False) if streaming else {}  # every rank validates the whole split
            val_set = DATASETS.build(dict(type=kind, split=data["val_split"], pipeline=data["eval_pipeline"],
                                          label_names=train_set.label_names, **whole, **common))
        logger.info("data: %d train rows, %d val rows from %s", len(train_set), len(val_set or []), manifest)
        return train_set, val_set

    def _prepare_tokenizer(self) -> None:
        """Text encoders and heads (report decoders) whose ``tokenizer`` is a dict get one WordPiece vocabulary,
        trained on the training reports and shared, in ``<work_dir>/tokenizer``."""
        model_cfg = self.cfg["model"]
        heads = model_cfg.get("heads") or []
        users = [c for c in (model_cfg.get("text_encoder"), *(heads if isinstance(heads, list) else [heads]))
                 if c and isinstance(c.get("tokenizer"), Mapping)]
        if not users:
            return
        options = dict(users[0]["tokenizer"])
        kind = options.pop("type", "wordpiece")
        if kind != "wordpiece":
            raise ConfigError(f"model tokenizer type '{kind}' unknown; use dict(type='wordpiece', ...) or a directory")
        out_dir = self.work_dir / "tokenizer"
        if self.dist.is_main and not (out_dir / "tokenizer.json").is_file():
            logger.info("training a WordPiece tokenizer on %d training reports -> %s", len(self.train_set), out_dir)
            with atomic_directory(out_dir) as tmp:  # a resumed run never finds half a tokenizer
                train_wordpiece_tokenizer(self.train_set.texts, tmp, **options)
        barrier(self.dist)  # the other ranks read the one rank 0 wrote
        for user in users:
            user["tokenizer"] = str(out_dir)

    def _build_loader(self) -> DataLoader:
        tokenizer = self.model.tokenizer
        max_length = self.model.max_length
        workers = int(self.train_cfg["num_workers"])
        if workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers + fork
        batch_size = int(self.train_cfg["batch_size"])
        if batch_size > len(self.train_set):
            raise ConfigError(f"train.batch_size {batch_size} exceeds the {len(self.train_set)} training rows")
        self.sampler = None  # a streaming (iterable) dataset orders and splits its samples itself
        if not isinstance(self.train_set, IterableDataset):
            self.sampler = ResumableSampler(len(self.train_set), seed=int(self.train_cfg["seed"]),
                                            rank=self.dist.rank, world_size=self.dist.world_size,
                                            batch_size=batch_size)
        return DataLoader(
            self.train_set, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=Collate(tokenizer, max_length), drop_last=True, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
        )

    # -- checkpoints ---------------------------------------------------------------------------------
    def _model_and_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Full (unsharded) states; with FSDP every rank takes part and rank 0 receives them on the CPU."""
        if self.dist.enabled and self.train_cfg["strategy"] == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(self.model, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict(), self.optimizer.state_dict()

    def state_dict(self) -> dict[str, Any]:
        model_state, optimizer_state = self._model_and_optimizer_state()
        rng = [capture_rng_state()]
        if self.dist.enabled:  # as bytes: all_gather_object's unpickler refuses tensors
            rng = [_from_bytes(b) for b in all_gather_objects(_to_bytes(rng[0]), self.dist)]
        batch = int(self.train_cfg["batch_size"]) * self.dist.world_size
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "epoch_samples": self.epoch_samples,
            "position": self.epoch_samples // batch, "world_size": self.dist.world_size,
            "best_value": self.best_value, "skipped_samples": self.skipped_samples,
            "bad_steps": self.bad_steps, "skipped_steps": self.skipped_steps, "overflow_steps": self.overflow_steps,
            "skipped_indices": sorted(self.skipped_indices),
            "rng": rng[0], "rng_per_rank": rng,  # per-rank streams: dropout and masks differ between ranks
            "config": self.cfg.to_dict(),
            "mmvl_version": mmvl.__version__,
        }

    def save(self, name: str) -> Path:
        """Write ``checkpoints/<name>`` (rank 0; every rank must call it, as the state is gathered)."""
        state = self.state_dict()
        path = self.ckpt_dir / name
        if self.dist.is_main:
            for log in JSONL_LOGS:  # the log lines up to this checkpoint reach the disk before it does
                fsync_file(self.work_dir / log)
            save_checkpoint(path, state)
        barrier(self.dist)  # no rank goes on (or exits) before the checkpoint is on disk
        return path

    def save_checkpoint(self) -> Path:
        """``step_<N>.pt``, ``last.pt`` pointing at it, and only the newest ``train.keep_checkpoints`` kept."""
        path = self.save(step_checkpoint_name(self.step))
        if self.dist.is_main:
            link_checkpoint(path, self.ckpt_dir / "last.pt")
            prune_checkpoints(self.ckpt_dir, int(self.train_cfg["keep_checkpoints"]))
        self.last_checkpoint = path
        return path

    def _resume(self) -> None:
        if not self.ckpt_dir.is_dir() or not any(self.ckpt_dir.glob("*.pt")):
            raise CheckpointError(f"--resume: no checkpoint in {self.ckpt_dir}; start without --resume")
        # rank 0 picks (and sets aside damaged ones), the others load what it picked
        picked = None
        if self.dist.is_main:
            try:
                picked = load_newest_checkpoint(self.ckpt_dir)[0]
            except CheckpointError as err:
                picked = err
        picked = broadcast_object(picked, self.dist)
        if isinstance(picked, CheckpointError):
            raise picked
        path, state = picked, load_checkpoint(picked)
        self._load_model_and_optimizer(path, state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        saved_world = int(state.get("world_size", 1))
        saved_batch = int(self.cfg["train"].get("batch_size", TRAIN_DEFAULTS["batch_size"]))
        self.epoch_samples = state.get("epoch_samples", state["position"] * saved_batch * saved_world)
        self.best_value, self.skipped_samples = state["best_value"], state["skipped_samples"]
        self.skipped_indices = set(state.get("skipped_indices", ()))
        self.bad_steps = state.get("bad_steps", 0)
        self.skipped_steps, self.overflow_steps = state.get("skipped_steps", 0), state.get("overflow_steps", 0)
        self.last_checkpoint = path
        if self.dist.is_main and path.name != "last.pt":  # last.pt may link a newer checkpoint that proved damaged
            link_checkpoint(path, self.ckpt_dir / "last.pt")
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            restore_rng_state(per_rank[self.dist.rank])
        else:
            restore_rng_state(state["rng"])
            if self.dist.enabled:
                torch.manual_seed(int(self.train_cfg["seed"]) + 1_000_003 * self.dist.rank + self.step)
            logger.warning("resuming a %d-process run with %d processes: data order and augmentation continue "
                           "exactly; per-rank random streams (dropout, masks) restart", saved_world,
                           self.dist.world_size)
        if self.dist.is_main:
            for log in JSONL_LOGS:
                self._truncate_log(log, self.step)
        barrier(self.dist)
        logger.info("resumed from %s at step %d (epoch %d, sample %d)", path, self.step, self.epoch,
                    self.epoch_samples)

    def _load_model_and_optimizer(self, path: Path, state: dict[str, Any]) -> None:
        try:
            if self.dist.enabled and self.train_cfg["strategy"] == "fsdp":
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

                set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"],
                               options=StateDictOptions(full_state_dict=True))
                return
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{path} does not match the configured model: {err}") from err
        self.optimizer.load_state_dict(state["optimizer"])

    def _truncate_log(self, name: str, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from, so none are counted twice (and a line torn by
        a crash)."""
        path = self.work_dir / name
        if path.is_file():
            records = [record for record in read_jsonl(path) if record["step"] <= step]
            atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))

    # -- loop ----------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, Any]]:
        batch_size = int(self.train_cfg["batch_size"])
        global_batch = batch_size * self.dist.world_size
        while True:
            if self.sampler is None:  # shards: start counted in this rank's batches
                self.train_set.set_epoch(self.epoch, start=self.epoch_samples // global_batch, batch_size=batch_size)
            else:
                self.sampler.set_epoch(self.epoch, start=self.epoch_samples)
            if self.sampler is None or len(self.sampler) >= batch_size:
                for batch in self.loader:
                    self.epoch_samples += global_batch
                    if batch["n_skipped"]:
                        self._pending_skips += [{"step": self.step + 1, "epoch": self.epoch, "split": "train",
                                                 **entry} for entry in batch["skipped"]]
                        if not self.dist.enabled:
                            self._skipped_in_training()
                    if "image" in batch:
                        yield batch
            self.epoch, self.epoch_samples = self.epoch + 1, 0

    def _record_skips(self, records: list[dict[str, Any]]) -> None:
        if records and self.dist.is_main:
            append_lines(self.work_dir / "skipped.jsonl", [json.dumps(record) for record in records])

    def _sync_step(self) -> None:
        """After each step of a multi-process run: every rank learns of a stop signal any rank received and of the
        samples any rank could not read (one small all-reduce; the records are gathered only when there are
        some), so all take the same decisions."""
        if not self.dist.enabled:
            return
        stop, skipped = all_reduce([float(self.stop_signal is not None), float(len(self._pending_skips))],
                                   self.dist, op="sum", device=self.device)
        if stop and self.stop_signal is None:
            self.stop_signal = "SIGTERM (another rank)"
        if skipped:
            self._pending_skips = [r for part in all_gather_objects(self._pending_skips, self.dist) for r in part]
            self._skipped_in_training()

    def _skipped_in_training(self) -> None:
        """Log unreadable samples to ``skipped.jsonl``; stop once too many distinct ones failed."""
        records, self._pending_skips = self._pending_skips, []
        self.skipped_samples += len(records)
        self._record_skips(records)
        self.skipped_indices.update(entry["index"] for entry in records)
        limit = self.max_skip_fraction * len(self.train_set)
        if len(self.skipped_indices) > limit:
            first = records[0] if records else {}
            raise TrainingError(
                f"{len(self.skipped_indices)} of {len(self.train_set)} training samples could not be read, more "
                f"than data.max_skip_fraction={self.max_skip_fraction:g}; latest: {first.get('reason')}. "
                f"All are listed in {self.work_dir / 'skipped.jsonl'}; check the data with "
                f"`python tools/check_data.py {self.train_set.manifest}`."
            )

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        append_lines(self.work_dir / "metrics.jsonl", [json.dumps(record)])
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.work_dir / "tensorboard"))
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, record["step"])

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """One optimizer step over ``accum_steps`` micro-batches; ``None`` if the step was skipped.

        Returns the heads' logged values as 0-dim tensors (``float()`` them when logging: on a GPU each
        conversion waits for the step to finish, so the loop converts only at ``log_interval``), plus
        ``grad_norm``, ``data_time`` and ``samples``. The step itself waits for the device twice: for the
        loss's finiteness (after the backward passes, so they queue without waiting) and the gradient norm's.
        """
        accum = int(self.train_cfg["accum_steps"])
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, Any] = {}
        data_time, samples = 0.0, 0
        ids: list[Any] = []
        loss_total = torch.zeros((), device=self.device)
        for micro in range(accum):
            start = time.perf_counter()
            batch = to_device(next(batches), self.device)
            if self.train_cfg["channels_last"] and batch["image"].ndim == 4:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            data_time += time.perf_counter() - start
            samples += len(batch["image"])
            ids.extend(m.get("study_id") or m["path"] for m in batch["meta"])
            if self.grad_cache_chunks:
                out = self._grad_cache_step(batch, accum)
                loss = out["loss"]
            else:
                with self._gradient_sync(micro == accum - 1):
                    with self._autocast():
                        out = self.train_model(batch)
                    loss = out["loss"]
                    if loss.requires_grad:  # a NaN loss is caught below, before any update
                        self.scaler.scale(loss / accum).backward()
            loss_total = loss_total + loss.detach().float()
            for key, value in out.items():
                logs[key] = logs.get(key, 0.0) + value.detach().float() / accum
        by_hand = self._replicated
        if self.grad_cache_chunks:
            by_hand = [p for p in self.model.parameters() if p.requires_grad]
        for param in by_hand if self.dist.enabled else ():  # outside DDP's/FSDP's reduction: average here
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(self.dist.world_size)
        if self.dist.enabled:  # every rank must take the same decision: one NaN anywhere skips the step
            torch.distributed.all_reduce(loss_total)
        if not torch.isfinite(loss_total):
            return self._bad_step(ids, "non-finite loss")
        self.scaler.unscale_(self.optimizer)
        clip = self.train_cfg["grad_clip"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
        if not torch.isfinite(grad_norm):
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.update()  # the inf found by unscale_() lowers the fp16 loss scale; a no-op without fp16
            if scale is not None and scale > MIN_LOSS_SCALE:
                self.optimizer.zero_grad(set_to_none=True)
                self.overflow_steps += 1
                logger.info("step %d: fp16 gradient overflow at loss scale %g; step skipped, scale now %g",
                            self.step + 1, scale, self.scaler.get_scale())
                return None
            return self._bad_step(ids, "non-finite gradient norm")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.bad_steps = 0
        logs.update(grad_norm=grad_norm.detach(), data_time=data_time, samples=samples)
        return logs

    @property
    def grad_cache_chunks(self) -> int:
        return int(self.train_cfg["grad_cache_chunks"] or 0)

    def _check_grad_cache(self) -> None:
        if not self.grad_cache_chunks:
            return
        heads = list(self.model.heads.values())
        if (len(heads) != 1 or not getattr(heads[0], "is_contrastive", False) or self.model.mask_ratio
                or self.model.text_encoder is None):
            raise ConfigError("train.grad_cache_chunks needs a model with one contrastive head (clip, siglip, "
                              "clip_soft) and a text encoder, without masking; set it to 0")
        if self.dist.enabled and self.train_cfg["strategy"] != "ddp":
            raise ConfigError("train.grad_cache_chunks works with train.strategy='ddp' only")

    def _grad_cache_step(self, batch: dict[str, Any], accum: int) -> dict[str, Any]:
        """Forward and backward of one micro-batch with gradient caching: (1) embeddings of each chunk without
        autograd graphs, (2) the loss of the whole batch and its gradient with respect to the embeddings,
        (3) each chunk again with its graph, back-propagating those gradients. The RNG state of each chunk is
        replayed in (3), so dropout draws the same masks: the gradients are those of the plain step."""
        (name, head), = self.model.heads.items()
        parts = torch.arange(len(batch["image"]), device=self.device).chunk(self.grad_cache_chunks)
        devices = [self.device] if self.device.type == "cuda" else []

        def embed(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with self._autocast():
                image = self.model.image_encoder(batch["image"][rows])
                text = self.model.text_encoder(batch["input_ids"][rows], batch["attention_mask"][rows])
                return head.embed(image, text)

        states, images, texts = [], [], []
        with torch.no_grad():
            for rows in parts:
                states.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]))
                image_emb, text_emb = embed(rows)
                images.append(image_emb)
                texts.append(text_emb)
        image_all = torch.cat(images).requires_grad_()
        text_all = torch.cat(texts).requires_grad_()
        out = head.loss_from_embeddings(image_all, text_all, batch)
        loss = self.model.loss_weights[name] * out["loss"]
        self.scaler.scale(loss / accum).backward()
        for rows, (cpu_state, cuda_states) in zip(parts, states):
            torch.set_rng_state(cpu_state)
            for device, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, device)
            image_emb, text_emb = embed(rows)
            torch.autograd.backward([image_emb, text_emb], [image_all.grad[rows], text_all.grad[rows]])
        return {"loss": loss, **{f"{name}/{key}": value for key, value in out.items()}}

    def _gradient_sync(self, last_micro_batch: bool):
        """DDP/FSDP: gradients are reduced across ranks on the last micro-batch of an accumulated step only."""
        if not self.dist.enabled or last_micro_batch:
            return contextlib.nullcontext()
        if isinstance(self.train_model, torch.nn.parallel.DistributedDataParallel):
            return self.train_model.no_sync()
        return _fsdp_no_sync(self.model)

    def _bad_step(self, ids: list[Any], reason: str) -> None:
        """Skip the step (no update), record its samples in ``bad_steps.jsonl``; stop after too many in a row."""
        ids = [i for part in all_gather_objects(ids, self.dist) for i in part]  # every rank's samples
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.skipped_steps += 1
        logger.warning("step %d skipped (%s); samples: %s", self.step + 1, reason, ids)
        if self.dist.is_main:
            append_lines(self.work_dir / "bad_steps.jsonl", [json.dumps(
                {"step": self.step + 1, "epoch": self.epoch, "reason": reason, "samples": ids,
                 "consecutive": self.bad_steps})])
        if self.bad_steps >= int(self.train_cfg["max_bad_steps"]):
            last = self.last_checkpoint if self.last_checkpoint and self.last_checkpoint.is_file() else "none"
            raise TrainingError(
                f"{self.bad_steps} consecutive bad steps ending at step {self.step} ({reason}); last samples {ids}; "
                f"last good checkpoint: {last}. Lower optim.lr or check the data; every skipped step and its "
                f"samples are in {self.work_dir / 'bad_steps.jsonl'}."
            )
        return None

    def _val_loader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=int(self.train_cfg["batch_size"]), shuffle=False,
            num_workers=int(self.train_cfg["num_workers"]),
            collate_fn=Collate(self.model.tokenizer, self.loader.collate_fn.max_length),
        )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """On the validation split: every loss the heads log (``val/loss``, ``val/<head>/loss``...), averaged
        over samples, and with a contrastive head retrieval Recall@1/5/10 (image->text, text->image)."""
        if self.val_set is None:
            return {}
        world = self.model.world_size
        self.model.set_world(0, 1)  # every rank validates the whole split on its own: local batches, no gathers
        try:
            return self._validate()
        finally:
            self.model.set_world(self.dist.rank, world)

    def _validate(self) -> dict[str, float]:
        self.model.eval()
        contrastive = any(getattr(h, "is_contrastive", False) for h in self.model.heads.values())
        totals: dict[str, float] = {}
        count = 0
        image_embs, text_embs = [], []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # masking heads draw masks: same ones at every validation,
            torch.manual_seed(int(self.train_cfg["seed"]))  # and training's RNG stream left untouched
            for batch in self._val_loader():
                if "image" not in batch:
                    continue
                batch = to_device(batch, self.device)
                n = len(batch["image"])
                with self._autocast():
                    out = self.model(batch)
                    if contrastive and self.model.text_encoder is not None:
                        image_embs.append(self.model.encode_image(batch["image"]).float())
                        text_embs.append(self.model.encode_text(batch).float())
                for key, value in out.items():
                    if torch.is_tensor(value) and value.numel() == 1:
                        totals[key] = totals.get(key, 0.0) + float(value) * n
                count += n
        metrics = {f"val/{k}": v / max(count, 1) for k, v in totals.items()}
        if image_embs:
            metrics.update({f"val/{k}": v for k, v in
                            retrieval_metrics(torch.cat(image_embs), torch.cat(text_embs)).items()})
        return metrics

    def visualize(self) -> None:
        """Heads with a ``visualize`` method draw the first validation batch to ``<work_dir>/vis/``."""
        heads = [(name, h) for name, h in self.model.heads.items() if hasattr(h, "visualize")]
        if not heads or self.val_set is None or not self.dist.is_main:
            return
        batch = next((b for b in self._val_loader() if "image" in b), None)
        if batch is None:
            return
        self.model.eval()
        batch = to_device(batch, self.device)
        for name, head in heads:
            path = self.work_dir / "vis" / f"{name.replace('/', '_')}_step{self.step:07d}.png"
            path.parent.mkdir(exist_ok=True)
            with torch.no_grad():
                head.visualize(self.model, batch, path)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        """First SIGTERM/SIGINT: finish the step, checkpoint, return. A second SIGINT (Ctrl-C again) interrupts
        at once (the last checkpoint on disk stays valid: it was written atomically). A repeated SIGTERM is
        ignored: SLURM signals every process of a job step and torchrun forwards its own SIGTERM too, so one
        pre-emption can deliver two, and the checkpoint must still be written."""
        name = signal.Signals(signum).name
        if self.stop_signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(f"second {name}")
            logger.warning("%s received again: still finishing step %d and writing a checkpoint", name, self.step + 1)
            return
        self.stop_signal = name
        logger.warning("%s received: finishing step %d, then writing a checkpoint and stopping (Ctrl-C again "
                       "to stop at once)", self.stop_signal, self.step + 1)

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def fit(self) -> dict[str, float]:
        """Train to ``train.max_steps``, or until SIGTERM/SIGINT (``stop_signal`` then names it); returns the
        last validation metrics."""
        cfg = self.train_cfg
        batches = self._batches()
        last_val: dict[str, float] = {}
        progress = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                        disable=os.environ.get("MMVL_NO_PROGRESS") == "1" or not self.dist.is_main)
        started = time.perf_counter()
        try:
            with self._stop_signals():
                while self.step < self.max_steps and self.stop_signal is None:
                    tick = time.perf_counter()
                    logs = self.train_step(batches)
                    self._sync_step()
                    if logs is None:
                        continue
                    self.step += 1
                    progress.update(1)
                    batch_time = time.perf_counter() - tick
                    if self.step % int(cfg["log_interval"]) == 0 or self.step == self.max_steps:
                        logs = self._reduce_logs({key: float(value) for key, value in logs.items()})
                        progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                        record = {"step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
                                  "batch_time": batch_time, "samples_per_s": logs.pop("samples") / batch_time,
                                  "skipped_samples": self.skipped_samples, "skipped_steps": self.skipped_steps,
                                  "overflow_steps": self.overflow_steps, **logs}
                        if self.scaler.is_enabled():
                            record["loss_scale"] = self.scaler.get_scale()
                        self._log(record)
                    if self.val_set is not None and (self.step % int(cfg["val_interval"]) == 0
                                                     or self.step == self.max_steps):
                        last_val = self.validate()
                        self._log({"step": self.step, **last_val})
                        logger.info("step %d: %s", self.step, ", ".join(f"{k}={v:.3f}" for k, v in last_val.items()))
                        self._maybe_save_best(last_val)
                    vis = int(cfg["vis_interval"] or 0)
                    if vis and (self.step % vis == 0 or self.step == self.max_steps):
                        self.visualize()
                    if self.step % int(cfg["ckpt_interval"]) == 0 or self.step == self.max_steps:
                        self.save_checkpoint()
                if self.stop_signal is not None:
                    if self.last_checkpoint is None or self.last_checkpoint.name != step_checkpoint_name(self.step):
                        self.save_checkpoint()
                    logger.warning("stopped by %s at step %d of %d; checkpoint %s; continue with --resume",
                                   self.stop_signal, self.step, self.max_steps, self.last_checkpoint)
        finally:
            progress.close()
            if self.writer is not None:
                self.writer.close()
            self._detach_log_file()
        elapsed = time.perf_counter() - started
        logger.info("finished %d steps in %.1f s; work dir: %s", self.step, elapsed, self.work_dir)
        return last_val

    def _reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Logged values averaged over the ranks (``samples`` summed: the step's global batch)."""
        if not self.dist.enabled:
            return logs
        keys = sorted(logs)
        values = all_reduce([logs[key] for key in keys], self.dist, op="sum", device=self.device)
        return {key: value if key == "samples" else value / self.dist.world_size for key, value in zip(keys, values)}

    def _maybe_save_best(self, metrics: dict[str, float]) -> None:
        key = self.train_cfg["best_metric"]
        if key not in metrics:
            return
        value = metrics[key]
        if self.train_cfg["best_mode"] not in ("min", "max"):
            raise ConfigError(f"train.best_mode must be 'min' or 'max', got {self.train_cfg['best_mode']!r}")
        if self.best_value is None or math.isnan(self.best_value):
            better = True
        else:
            better = value < self.best_value if self.train_cfg["best_mode"] == "min" else value > self.best_value
        if better:
            self.best_value = value
            self.save("best.pt")


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module) -> Iterator[None]:
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
    False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 32 << 20))
