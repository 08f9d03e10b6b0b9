"""The training loop: ``Trainer(cfg, work_dir).fit()`` wires the parts together and runs the steps; the parts live
beside it, one job each (``strategy``: devices and ranks; ``state``: checkpoints, resume, work dirs; ``data``:
datasets, tokenizers, loaders; ``hooks``: logging, validation, best checkpoint, pictures, plots; ``grad_cache``;
``optim``).

A work directory holds everything needed to repeat or continue a run: ``config.py`` (the merged config),
``preprocess.json`` (eval pipeline), ``tokenizer/``, ``metrics.jsonl``, ``skipped.jsonl``, ``bad_steps.jsonl``,
``tensorboard/``, ``plots/``, ``train.log`` and ``checkpoints/`` (the last ``train.keep_checkpoints``
``step_<N>.pt``, ``last.pt`` and ``best.pt`` as second names of step checkpoints, each with a ``.sha256``).
``resume=True`` continues exactly from the newest checkpoint that verifies, with the config it was trained with
(``resume_override`` names the settings allowed to change). SIGTERM or SIGINT (pre-emption, Ctrl-C) ends the
current step, writes a checkpoint and returns from ``fit()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import mmvl
from mmvl.config import Config
from mmvl.config.schema import DATA_DEFAULTS, TRAIN_DEFAULTS
from mmvl.config.validate import resolve_config, validate_config
from mmvl.data.loader import Collate
from mmvl.data.transforms import save_preprocess
from mmvl.engine import hooks as run_hooks
from mmvl.engine.checkpoint import (
    capture_rng_state,
    link_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_name,
)
from mmvl.engine.data import (
    build_datasets,
    build_train_loader,
    prepare_tokenizers,
    release_loader_workers,
    to_device,
    train_batches,
)
from mmvl.engine.finetune import mask_labels, prepare_finetune
from mmvl.engine.grad_cache import check_grad_cache, grad_cache_step
from mmvl.engine.optim import (
    apply_config_after_resume,
    build_optimizer,
    build_scheduler,
    config_hyperparameters,
    group_mismatch,
)
from mmvl.engine.state import (
    JSONL_LOGS,
    RunState,
    check_resume_config,
    load_resume_point,
    override_keys,
    prepare_work_dir,
    trim_logs,
)
from mmvl.engine.strategy import Strategy, keep_freed_memory
from mmvl.errors import CheckpointError, ConfigError
from mmvl.models import build_model
from mmvl.utils import fsync_file, get_logger, seed_everything

logger = get_logger(__name__)

# Below this fp16 loss scale an overflowing gradient is not fixed by scaling down: it counts as a bad step.
MIN_LOSS_SCALE = 1.0

__all__ = ["Trainer", "to_device"]


class Trainer:
    """Validate and build everything from a merged :class:`Config`, then ``fit()``.

    ``resume_override``: ``key=value`` settings applied on top of ``cfg`` that a resume may change from the
    checkpoint's config (e.g. ``train.max_steps=2000``); every other difference is refused.
    """

    def __init__(self, cfg: Config, work_dir: str | Path, resume: bool = False,
                 resume_override: Sequence[str] = ()):
        if resume_override and not resume:
            raise ConfigError("--resume-override is for --resume only; set the values in the config instead")
        cfg = Config(cfg.to_dict()) if not isinstance(cfg, Config) else cfg
        cfg.merge_options(list(resume_override))
        self.cfg = resolve_config(cfg)
        validate_config(self.cfg)  # before any expensive work: data, tokenizer, model
        self.work_dir = Path(work_dir)
        self.ckpt_dir = self.work_dir / "checkpoints"
        self.train_cfg = {**TRAIN_DEFAULTS, **self.cfg.get("train", {})}
        self.strategy = Strategy(self.train_cfg)
        created = bool(self.strategy.on_main(lambda: prepare_work_dir(self.work_dir, resume)))
        self._log_handler = self._attach_log_file()
        try:
            self._setup(resume, override_keys(resume_override))
        except BaseException:
            self._detach_log_file()
            if created and self.strategy.is_main:  # a failed start leaves no half-made work dir
                shutil.rmtree(self.work_dir, ignore_errors=True)
            raise

    def _setup(self, resume: bool, allowed: list[str]) -> None:
        cfg, train_cfg, strategy = self.cfg, self.train_cfg, self.strategy
        resume_point = None
        if resume:  # the config check comes before data, tokenizer and model are built
            resume_point = load_resume_point(self.ckpt_dir, strategy)
            changed = check_resume_config(resume_point[1]["config"], cfg, allowed, resume_point[0])
            if changed:
                logger.warning("resuming with changed settings: %s",
                               ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changed))
        if train_cfg["deterministic"]:
            # cuBLAS reorders its reductions between calls unless its workspace is fixed (CUDA >= 10.2, torch's
            # reproducibility notes); read when the first cuBLAS handle is made, which is after this point.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(int(train_cfg["seed"]))  # the same on every rank: identical initial weights
        if strategy.device.type == "cpu" and train_cfg["keep_freed_memory"]:
            keep_freed_memory()

        self.train_set, self.val_set = build_datasets(cfg["data"], self.work_dir, int(train_cfg["seed"]),
                                                      strategy.is_main, mask_labels(cfg["model"]))
        model_cfg = prepare_tokenizers(cfg["model"], lambda: self.train_set.texts, self.work_dir, resume, strategy)
        self.model = build_model(model_cfg)
        prepare_finetune(self.model, model_cfg, self.train_set.label_names, resume)  # init_from, label columns
        self.model.to(strategy.device)
        if train_cfg["channels_last"]:
            self.model.to(memory_format=torch.channels_last)  # 4D (conv) weights; the rest is unaffected
        self.train_model = strategy.wrap(self.model)
        self.grad_cache_chunks = int(train_cfg["grad_cache_chunks"] or 0)
        check_grad_cache(self.model, self.grad_cache_chunks, strategy.enabled, strategy.kind)
        if train_cfg["compile"]:
            backend = train_cfg["compile"] if isinstance(train_cfg["compile"], str) else "inductor"
            self.train_model = torch.compile(self.train_model, backend=backend)
        if strategy.enabled:  # dropout and masks differ between ranks, as their data does
            torch.manual_seed(int(train_cfg["seed"]) + 1_000_003 * strategy.dist.rank)
        self.optimizer = build_optimizer(self.model, cfg.get("optim", {}))
        self.max_steps = int(train_cfg["max_steps"])
        self.scheduler = build_scheduler(self.optimizer, cfg.get("optim", {}), self.max_steps)
        amp = train_cfg["amp"]
        if amp not in (None, "bf16", "fp16"):
            raise ConfigError(f"train.amp must be None, 'bf16' or 'fp16', got {amp!r}")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(strategy.device.type, enabled=amp == "fp16")

        self.state = RunState()
        self.last_checkpoint: Path | None = None
        self.stop_signal: str | None = None
        self.failed = False
        self.skips = run_hooks.SkipAccounting(self.work_dir, strategy, self.train_set,
                                              float(cfg["data"].get("max_skip_fraction", 0.01)),
                                              int(train_cfg["max_bad_steps"]))
        if strategy.is_main:
            remove_stale_temp_files(self.ckpt_dir)
        if resume_point is not None:
            self._resume(*resume_point)
        else:
            self.skips.record([{"step": 0, "split": name, **entry} for name, dataset in
                               (("train", self.train_set), ("val", self.val_set)) if dataset is not None
                               for entry in dataset.skipped_rows])
        if strategy.is_main:
            cfg.dump(self.work_dir / "config.py")
            save_preprocess(self.work_dir / "preprocess.json", cfg["data"]["eval_pipeline"],
                            mmvl_version=mmvl.__version__)
        self.collate = Collate(self.model.tokenizer, self.model.max_length,
                               cfg["data"].get("report_truncation", DATA_DEFAULTS["report_truncation"]))
        self.loader, self.sampler = build_train_loader(self.train_set, self.collate, train_cfg, strategy)
        self.metrics = run_hooks.MetricsLog(self.work_dir, strategy.is_main)
        self.hooks: list[run_hooks.Hook] = [run_hooks.LoggerHook(), run_hooks.ValidationHook(self),
                                            run_hooks.VisualizationHook(), run_hooks.CheckpointHook()]
        if train_cfg["plots"]:
            self.hooks.append(run_hooks.PlotHook())

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to ``train.max_steps``, or until SIGTERM/SIGINT (``stop_signal`` then names it); returns the
        last validation metrics."""
        batches = train_batches(self)
        for hook in self.hooks:
            hook.before_train(self)
        try:
            with self._stop_signals():
                while self.state.step < self.max_steps and self.stop_signal is None:
                    tick = time.perf_counter()
                    logs = self.train_step(batches)
                    if logs is None:
                        continue
                    self.state.step += 1
                    logs["batch_time"] = time.perf_counter() - tick
                    for hook in self.hooks:
                        hook.after_train_step(self, logs)
        except BaseException:
            self.failed = True
            raise
        finally:
            batches.close()
            release_loader_workers(self.loader)
            for hook in self.hooks:
                hook.after_train(self)
            self.metrics.close()
            self._detach_log_file()
        return next(h.last for h in self.hooks if isinstance(h, run_hooks.ValidationHook))

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """One optimizer step over ``accum_steps`` micro-batches; ``None`` if the step was skipped.

        Returns the heads' logged values as 0-dim tensors (``float()`` them when logging: on a GPU each
        conversion waits for the step to finish, so only the log hook converts), plus ``grad_norm``,
        ``data_time`` and ``samples``. The step waits for the device twice: at the rank agreement on the loss's
        finiteness (after the backward passes, so they queue without waiting) and for the gradient norm.
        """
        accum = int(self.train_cfg["accum_steps"])
        device = self.strategy.device
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, Any] = {}
        data_time, samples, ids = 0.0, 0, []
        loss_total = torch.zeros((), device=device)

        def backward(loss: torch.Tensor) -> None:
            self.scaler.scale(loss / accum).backward()

        for micro in range(accum):
            start = time.perf_counter()
            batch = to_device(next(batches), device)
            if self.train_cfg["channels_last"] and batch["image"].ndim == 4:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            data_time += time.perf_counter() - start
            samples += len(batch["image"])
            ids.extend(m.get("study_id") or m["path"] for m in batch["meta"])
            if self.grad_cache_chunks:
                out = grad_cache_step(self.model, batch, self.grad_cache_chunks, self.autocast, backward)
            else:
                with self.strategy.gradient_sync(self.model, micro == accum - 1):
                    with self.autocast():
                        out = self.train_model(batch)
                    if out["loss"].requires_grad:  # a NaN loss is caught below, before any update
                        backward(out["loss"])
            loss_total = loss_total + out["loss"].detach().float()
            for key, value in out.items():
                logs[key] = logs.get(key, 0.0) + value.detach().float() / accum
        by_hand = [p for p in self.model.parameters() if p.requires_grad] if self.grad_cache_chunks \
            else self.strategy.replicated
        self.strategy.average_gradients(by_hand)  # outside DDP's/FSDP's reduction: averaged here
        agreed = self.strategy.agree({"nonfinite": (~torch.isfinite(loss_total)).float(),
                                      "stop": float(self.stop_signal is not None),
                                      "unreadable": float(len(self.skips.pending))})
        if agreed["stop"] and self.stop_signal is None:
            self.stop_signal = "SIGTERM (another rank)"
        if agreed["unreadable"]:
            self.skips.flush(self.state)
        if agreed["nonfinite"]:
            self.optimizer.zero_grad(set_to_none=True)
            return self.skips.bad_step(self.state, ids, "non-finite loss", self.last_checkpoint)
        self.scaler.unscale_(self.optimizer)
        clip = self.train_cfg["grad_clip"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
        if not torch.isfinite(grad_norm):
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.update()  # the inf found by unscale_() lowers the fp16 loss scale; a no-op without fp16
            self.optimizer.zero_grad(set_to_none=True)
            if scale is not None and scale > MIN_LOSS_SCALE:
                self.state.overflow_steps += 1
                logger.info("step %d: fp16 gradient overflow at loss scale %g; step skipped, scale now %g",
                            self.state.step + 1, scale, self.scaler.get_scale())
                return None
            return self.skips.bad_step(self.state, ids, "non-finite gradient norm", self.last_checkpoint)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.state.bad_steps = 0
        logs.update(grad_norm=grad_norm.detach(), data_time=data_time, samples=samples)
        return logs

    def validate(self) -> dict[str, float]:
        return run_hooks.validate(self)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.strategy.device.type, dtype=self.amp_dtype)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds; every rank takes part (FSDP gathers, RNG states are collected per rank)."""
        model_state, optimizer_state = self.strategy.full_state(self.model, self.optimizer)
        rng = self.strategy.gather_tensors(capture_rng_state())
        batch = int(self.train_cfg["batch_size"]) * self.strategy.dist.world_size
        return {
            "model": model_state, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), **self.state.to_dict(),
            "position": self.state.epoch_samples // batch, "world_size": self.strategy.dist.world_size,
            "rng": rng[0], "rng_per_rank": rng,  # per-rank streams: dropout and masks differ between ranks
            "config": self.cfg.to_dict(),  # the resolved user config, compared on --resume
            "mmvl_version": mmvl.__version__,
        }

    def save_checkpoint(self) -> Path:
        """``step_<N>.pt`` (once per step), ``last.pt`` linked to it, only the newest ``train.keep_checkpoints``
        kept. Every rank must call it; rank 0 writes, after fsyncing the log lines up to this step."""
        name = step_checkpoint_name(self.state.step)
        if self.last_checkpoint is not None and self.last_checkpoint.name == name:
            return self.last_checkpoint
        state, path = self.state_dict(), self.ckpt_dir / name
        if self.strategy.is_main:
            for log in JSONL_LOGS:
                fsync_file(self.work_dir / log)
            save_checkpoint(path, state)
            link_checkpoint(path, self.ckpt_dir / "last.pt")
            prune_checkpoints(self.ckpt_dir, int(self.train_cfg["keep_checkpoints"]))
        self.strategy.barrier()  # no rank goes on (or exits) before the checkpoint is on disk
        self.last_checkpoint = path
        return path

    def _resume(self, path: Path, saved: dict[str, Any]) -> None:
        fresh = config_hyperparameters(self.optimizer, self.scheduler)
        try:
            self.strategy.load_full_state(self.model, self.optimizer, saved)
        except (RuntimeError, ValueError) as err:
            why = group_mismatch(saved.get("optimizer"), self.optimizer) or err
            raise CheckpointError(f"{path} does not match the configured model: {why}") from err
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        before, after = apply_config_after_resume(self.optimizer, self.scheduler, fresh, self.cfg.get("optim", {}),
                                                  self.max_steps)
        if after != before:
            logger.warning("schedule rebuilt for train.max_steps=%d: lr at step %d %.3g -> %.3g", self.max_steps,
                           saved["step"], before, after)
        self.state = RunState.from_dict(saved)
        if "epoch_samples" not in saved:
            self.state.epoch_samples = saved["position"] * int(self.train_cfg["batch_size"]) * saved["world_size"]
        self.last_checkpoint = path
        if self.strategy.is_main and path.name != "last.pt":  # last.pt may link a newer one that proved damaged
            link_checkpoint(path, self.ckpt_dir / "last.pt")
        world, rank = self.strategy.dist.world_size, self.strategy.dist.rank
        per_rank = saved.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == world:
            restore_rng_state(per_rank[rank])
        else:
            restore_rng_state(saved["rng"])
            if self.strategy.enabled:
                torch.manual_seed(int(self.train_cfg["seed"]) + 1_000_003 * rank + self.state.step)
            logger.warning("resuming a %d-process run with %d processes: data order and augmentation continue "
                           "exactly; per-rank random streams (dropout, masks) restart", saved["world_size"], world)
        if self.strategy.is_main:
            trim_logs(self.work_dir, self.state.step)
        self.strategy.barrier()
        logger.info("resumed from %s at step %d (epoch %d, sample %d)", path, self.state.step, self.state.epoch,
                    self.state.epoch_samples)

    # -- process plumbing --------------------------------------------------------------------------------
    def _attach_log_file(self) -> logging.Handler | None:
        if not self.strategy.is_main:  # only rank 0 writes the work dir's logs
            return None
        handler = logging.FileHandler(self.work_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        package = logging.getLogger("mmvl")
        self._package_level = package.level
        if package.getEffectiveLevel() > logging.INFO:  # train.log records INFO whatever the console shows
            package.setLevel(logging.INFO)
        package.addHandler(handler)
        return handler

    def _detach_log_file(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("mmvl").setLevel(self._package_level)
            logging.getLogger("mmvl").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        """First SIGTERM/SIGINT: finish the step, checkpoint, return. A second SIGINT (Ctrl-C again) interrupts
        at once (the last checkpoint on disk stays valid: it was written atomically). A repeated SIGTERM is
        ignored: SLURM signals every process of a job step and torchrun forwards its own SIGTERM too, so one
        pre-emption can deliver two, and the checkpoint must still be written."""
        name = signal.Signals(signum).name
        if self.stop_signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(f"second {name}")
            logger.warning("%s received again: still finishing step %d and writing a checkpoint", name,
                           self.state.step + 1)
            return
        self.stop_signal = name
        logger.warning("%s received: finishing step %d, then writing a checkpoint and stopping (Ctrl-C again "
                       "to stop at once)", name, self.state.step + 1)

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

    # read-only views used by tools, tests and benchmarks
    @property
    def step(self) -> int:
        return self.state.step

    @property
    def dist(self) -> Any:
        return self.strategy.dist

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    @property
    def best_value(self) -> float | None:
        return self.state.best_value

    @property
    def skipped_steps(self) -> int:
        return self.state.skipped_steps

    @property
    def overflow_steps(self) -> int:
        return self.state.overflow_steps

    @property
    def bad_steps(self) -> int:
        return self.state.bad_steps
