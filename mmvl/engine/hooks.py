"""The side jobs of a training run, each an object with a few named moments that ``Trainer.fit`` calls in order
(as mmengine's hooks and Lightning's callbacks, without priorities): ``before_train(trainer)``,
``after_train_step(trainer, logs)``, ``after_train(trainer)`` (also after an error: ``trainer.failed``).
Beside them: the metrics log every hook writes to, and the accounting of skipped samples and steps."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmvl.engine.checkpoint import link_checkpoint
from mmvl.engine.data import build_val_loader, to_device
from mmvl.errors import ConfigError, TrainingError
from mmvl.evaluation.retrieval import retrieval_metrics
from mmvl.utils import append_lines, get_logger

logger = get_logger(__name__)


class Hook:
    """Base: every moment does nothing."""

    def before_train(self, trainer: Any) -> None:
        pass

    def after_train_step(self, trainer: Any, logs: dict[str, Any]) -> None:
        pass

    def after_train(self, trainer: Any) -> None:
        pass


def every(step: int, interval: int, last: int) -> bool:
    """At every ``interval`` steps (0: never) and at the last step."""
    return bool(interval) and (step % interval == 0 or step == last)


class MetricsLog:
    """``metrics.jsonl`` (appended; fsynced before each checkpoint) and TensorBoard scalars, on rank 0."""

    def __init__(self, work_dir: Path, enabled: bool):
        self.work_dir, self.enabled = work_dir, enabled
        self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_lines(self.work_dir / "metrics.jsonl", [json.dumps(record)])
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard: only once something is logged

            self.writer = SummaryWriter(str(self.work_dir / "tensorboard"))
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class SkipAccounting:
    """Samples that could not be read (``skipped.jsonl``; training stops once more than
    ``data.max_skip_fraction`` of the training rows failed) and steps skipped for a non-finite loss or gradient
    (``bad_steps.jsonl``; training stops after ``train.max_bad_steps`` in a row)."""

    def __init__(self, work_dir: Path, strategy: Any, train_set: Any, max_skip_fraction: float, max_bad_steps: int):
        # the parts it needs, not the trainer: a reference cycle would keep the trainer, and with it the loader's
        # worker processes, alive until interpreter exit, which then waits for those workers forever
        self.work_dir, self.strategy, self.train_set = work_dir, strategy, train_set
        self.max_skip_fraction, self.max_bad_steps = max_skip_fraction, max_bad_steps
        self.pending: list[dict[str, Any]] = []

    @property
    def path(self) -> Path:
        return self.work_dir / "skipped.jsonl"

    def record(self, records: list[dict[str, Any]]) -> None:
        if records and self.strategy.is_main:
            append_lines(self.path, [json.dumps(record) for record in records])

    def unreadable(self, state: Any, entries: list[dict[str, Any]]) -> None:
        """Samples of the batch just loaded that the dataset skipped; counted at once in one process, after the
        step's rank agreement (:meth:`flush`) in several."""
        self.pending += [{"step": state.step + 1, "epoch": state.epoch, "split": "train", **entry}
                         for entry in entries]
        if not self.strategy.enabled:
            self.flush(state)

    def flush(self, state: Any) -> None:
        """Log the pending unreadable samples (every rank's, under torchrun); stop once too many distinct ones
        failed."""
        records, self.pending = self.pending, []
        if self.strategy.enabled:
            records = [record for part in self.strategy.gather(records) for record in part]
        state.skipped_samples += len(records)
        self.record(records)
        state.skipped_indices.update(entry["index"] for entry in records)
        train_set = self.train_set
        if len(state.skipped_indices) > self.max_skip_fraction * len(train_set):
            first = records[0] if records else {}
            raise TrainingError(
                f"{len(state.skipped_indices)} of {len(train_set)} training samples could not be read, more than "
                f"data.max_skip_fraction={self.max_skip_fraction:g}; latest: {first.get('reason')}. All are listed "
                f"in {self.path}; check the data with `python tools/check_data.py {train_set.manifest}`."
            )

    def bad_step(self, state: Any, ids: list[Any], reason: str, last_checkpoint: Path | None) -> None:
        """Skip the step (no update), record its samples in ``bad_steps.jsonl``; stop after too many in a row."""
        ids = [i for part in self.strategy.gather(ids) for i in part]  # every rank's samples
        state.bad_steps += 1
        state.skipped_steps += 1
        logger.warning("step %d skipped (%s); samples: %s", state.step + 1, reason, ids)
        if self.strategy.is_main:
            append_lines(self.work_dir / "bad_steps.jsonl", [json.dumps(
                {"step": state.step + 1, "epoch": state.epoch, "reason": reason, "samples": ids,
                 "consecutive": state.bad_steps})])
        if state.bad_steps >= self.max_bad_steps:
            last = last_checkpoint if last_checkpoint and last_checkpoint.is_file() else "none"
            raise TrainingError(
                f"{state.bad_steps} consecutive bad steps ending at step {state.step} ({reason}); last samples "
                f"{ids}; last good checkpoint: {last}. Lower optim.lr or check the data; every skipped step and its "
                f"samples are in {self.work_dir / 'bad_steps.jsonl'}."
            )


class LoggerHook(Hook):
    """Every ``train.log_interval`` steps and at the last: the step's values averaged over the ranks, to
    ``metrics.jsonl``/TensorBoard and the tqdm bar."""

    def before_train(self, trainer: Any) -> None:
        self.progress = tqdm(total=trainer.max_steps, initial=trainer.state.step, desc="train", dynamic_ncols=True,
                             disable=os.environ.get("MMVL_NO_PROGRESS") == "1" or not trainer.strategy.is_main)
        self.started = time.perf_counter()

    def after_train_step(self, trainer: Any, logs: dict[str, Any]) -> None:
        self.progress.update(1)
        state = trainer.state
        if not every(state.step, int(trainer.train_cfg["log_interval"]), trainer.max_steps):
            return
        batch_time = logs.pop("batch_time")
        logs = trainer.strategy.reduce_logs({key: float(value) for key, value in logs.items()})
        lr = trainer.scheduler.get_last_lr()[0]
        self.progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
        record = {"step": state.step, "epoch": state.epoch, "lr": lr, "batch_time": batch_time,
                  "samples_per_s": logs.pop("samples") / batch_time, "skipped_samples": state.skipped_samples,
                  "skipped_steps": state.skipped_steps, "overflow_steps": state.overflow_steps, **logs}
        if trainer.scaler.is_enabled():
            record["loss_scale"] = trainer.scaler.get_scale()
        trainer.metrics.write(record)

    def after_train(self, trainer: Any) -> None:
        self.progress.close()
        logger.info("finished %d steps in %.1f s; work dir: %s", trainer.state.step,
                    time.perf_counter() - self.started, trainer.work_dir)


class ValidationHook(Hook):
    """Every ``train.val_interval`` steps and at the last: the validation losses (and retrieval Recall@K for
    contrastive models) logged, and ``best.pt`` linked to the step's checkpoint when ``train.best_metric``
    improved (``train.best_mode``)."""

    def __init__(self, trainer: Any):
        self.mode = trainer.train_cfg["best_mode"]
        if self.mode not in ("min", "max"):
            raise ConfigError(f"train.best_mode must be 'min' or 'max', got {self.mode!r}")
        self.key = trainer.train_cfg["best_metric"]
        self.last: dict[str, float] = {}

    def after_train_step(self, trainer: Any, logs: dict[str, Any]) -> None:
        step = trainer.state.step
        if trainer.val_set is None or not every(step, int(trainer.train_cfg["val_interval"]), trainer.max_steps):
            return
        self.last = trainer.validate()
        trainer.metrics.write({"step": step, **self.last})
        logger.info("step %d: %s", step, ", ".join(f"{k}={v:.3f}" for k, v in self.last.items()))
        value = self.last.get(self.key)
        if value is None:
            return
        best = trainer.state.best_value
        if best is None or math.isnan(best) or (value < best if self.mode == "min" else value > best):
            trainer.state.best_value = value
            path = trainer.save_checkpoint()  # best.pt is a second name of this step's checkpoint, not a copy
            if trainer.strategy.is_main:
                link_checkpoint(path, trainer.ckpt_dir / "best.pt")


@torch.no_grad()
def validate(trainer: Any) -> dict[str, float]:
    """On the validation split: every loss the heads log (``val/loss``, ``val/<head>/loss``...), averaged over
    samples, and with a contrastive head retrieval Recall@1/5/10 (image->text, text->image; a retrieved report
    whose text equals the query's own counts as a hit, so boilerplate reports are not held against the model,
    nor can they choose best.pt). Every rank
    validates the whole split on its own (local batches, no gathers); the training RNG stream is untouched and
    masking heads draw the same masks at every validation. Classification heads (``is_classifier``) add their
    ``evaluate`` metrics of the whole split (``val/<head>/macro_auroc``...); segmentation heads (``is_segmenter``)
    their Dice from the voxel counts of the whole split (``val/<head>/mean_dice``, ``val/<head>/dice/<label>``)."""
    model, device = trainer.model, trainer.strategy.device
    world = model.world_size
    model.set_world(0, 1)
    model.eval()
    contrastive = any(getattr(h, "is_contrastive", False) for h in model.heads.values()) \
        and model.text_encoder is not None
    totals: dict[str, float] = {}
    count = 0
    image_embs, text_embs, texts = [], [], []
    classifiers = {name: head for name, head in model.heads.items() if getattr(head, "is_classifier", False)}
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in classifiers}
    targets: dict[str, list[torch.Tensor]] = {name: [] for name in classifiers}
    segmenters = {name: head for name, head in model.heads.items() if getattr(head, "is_segmenter", False)}
    counts: dict[str, list[torch.Tensor]] = {name: [] for name in segmenters}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(trainer.train_cfg["seed"]))
            for batch in build_val_loader(trainer.val_set, trainer.collate, trainer.train_cfg):
                if "image" not in batch:
                    continue
                batch = to_device(batch, device)
                n = len(batch["image"])
                with trainer.autocast():
                    out = model(batch)
                    if contrastive:
                        image_embs.append(model.encode_image(batch["image"]).float())
                        text_embs.append(model.encode_text(batch).float())
                        texts += batch["report"]
                for name, head in classifiers.items():
                    scores[name].append(out.pop(f"{name}/scores").float().cpu())
                    targets[name].append(head.targets(batch).cpu())
                for name in segmenters:
                    counts[name].append(out.pop(f"{name}/dice_stats").cpu())
                for key, value in out.items():
                    if torch.is_tensor(value) and value.numel() == 1:
                        totals[key] = totals.get(key, 0.0) + float(value) * n
                count += n
    finally:
        model.set_world(trainer.strategy.dist.rank, world)
    metrics = {f"val/{k}": v / max(count, 1) for k, v in totals.items()}
    for name, head in classifiers.items():
        if scores[name]:
            found = head.evaluate(torch.cat(scores[name]).numpy(), torch.cat(targets[name]).long().numpy())
            metrics.update({f"val/{name}/{key}": value for key, value in found.items()})
    for name, head in segmenters.items():
        if counts[name]:
            found = head.evaluate(torch.cat(counts[name]).numpy())
            metrics.update({f"val/{name}/{key}": value for key, value in found.items()})
    if image_embs:
        recall = retrieval_metrics(torch.cat(image_embs), torch.cat(text_embs), texts=texts)
        metrics.update({f"val/{k}": v for k, v in recall.items()})
    return metrics


class VisualizationHook(Hook):
    """Every ``train.vis_interval`` steps: heads with a ``visualize`` method draw the first validation batch to
    ``<work_dir>/vis/``."""

    def after_train_step(self, trainer: Any, logs: dict[str, Any]) -> None:
        if not every(trainer.state.step, int(trainer.train_cfg["vis_interval"] or 0), trainer.max_steps):
            return
        model = trainer.model
        heads = [(name, h) for name, h in model.heads.items() if hasattr(h, "visualize")]
        if not heads or trainer.val_set is None or not trainer.strategy.is_main:
            return
        batch = next((b for b in build_val_loader(trainer.val_set, trainer.collate, trainer.train_cfg)
                      if "image" in b), None)
        if batch is None:
            return
        model.eval()
        batch = to_device(batch, trainer.strategy.device)
        for name, head in heads:
            path = trainer.work_dir / "vis" / f"{name.replace('/', '_')}_step{trainer.state.step:07d}.png"
            path.parent.mkdir(exist_ok=True)
            with torch.no_grad():
                head.visualize(model, batch, path)


class CheckpointHook(Hook):
    """Every ``train.ckpt_interval`` steps and at the last; on a stop signal, at the step it stopped."""

    def after_train_step(self, trainer: Any, logs: dict[str, Any]) -> None:
        if every(trainer.state.step, int(trainer.train_cfg["ckpt_interval"]), trainer.max_steps):
            trainer.save_checkpoint()

    def after_train(self, trainer: Any) -> None:
        if trainer.stop_signal is None or trainer.failed:
            return
        trainer.save_checkpoint()
        logger.warning("stopped by %s at step %d of %d; checkpoint %s; continue with --resume", trainer.stop_signal,
                       trainer.state.step, trainer.max_steps, trainer.last_checkpoint)


class PlotHook(Hook):
    """At the end of a run that did not fail: ``WORK_DIR/plots/*.png`` from ``metrics.jsonl``
    (``train.plots``)."""

    def after_train(self, trainer: Any) -> None:
        if trainer.failed or not trainer.strategy.is_main:
            return
        try:
            from mmvl.engine.plots import plot_run  # matplotlib: imported only when plots are drawn

            paths = plot_run(trainer.work_dir)
        except Exception as err:  # a plot must never cost the run its exit status: the checkpoints are written
            logger.warning("plots not drawn: %s: %s", type(err).__name__, err)
            return
        logger.info("plots: %s", ", ".join(str(p) for p in paths))
