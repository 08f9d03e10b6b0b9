"""The data side of a training run, outside the trainer: train and validation datasets from ``cfg.data``, the
tokenizers the model's text towers and report heads use, and the loaders, including the endless, resumable
stream of training batches."""

from __future__ import annotations

import copy
import json
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mmvl.config.schema import DATA_DEFAULTS, REPORT_AUGMENT_DEFAULTS
from mmvl.data.fractions import label_fraction_subset
from mmvl.data.loader import Collate, ResumableSampler
from mmvl.data.manifest import load_manifest
from mmvl.data.tokenizer import train_wordpiece_tokenizer
from mmvl.errors import CheckpointError, ConfigError, ManifestError
from mmvl.models.vlm import tokenizer_users
from mmvl.registry import DATASETS
from mmvl.utils import atomic_directory, atomic_write_text, get_logger

logger = get_logger(__name__)


def build_datasets(data_cfg: Mapping[str, Any], work_dir: Path, seed: int, is_main: bool = True,
                   mask_labels: list[str] | None = None) -> tuple[Dataset, Dataset | None]:
    """``data.type="manifest"`` reads ``data.manifest``; ``"shards"`` streams the webdataset shards in
    ``data.shards`` that ``tools/make_shards.py`` wrote from one (``data.resampled``, ``data.shuffle_buffer``).
    Every key of ``data`` is one of :data:`mmvl.config.schema.DATA_DEFAULTS` (the config check refuses others).
    ``data.label_fraction`` trains on a subset of the training studies (:func:`label_fraction_studies`).
    ``mask_labels`` (a segmentation head's labels): the items carry the rows' masks of those labels."""
    data = {**DATA_DEFAULTS, **data_cfg}
    kind = data["type"]
    streaming = kind == "shards"
    source = data["shards"] if streaming else data["manifest"]
    if source is None:
        raise ConfigError(f"data.{'shards' if streaming else 'manifest'} is not set")
    if not streaming and not os.path.isfile(source):
        hint = data["prepare_hint"] or "see datasets/README.md for the manifest format"
        raise ManifestError(source, f"manifest not found. {hint}")
    for key in ("train_pipeline", "eval_pipeline"):
        if not data[key]:
            raise ConfigError(f"data.{key} is not set: give a list of transforms (see configs/_base_/datasets/)")
    common = dict(
        manifest=source, report_sections=tuple(data["report_sections"]), on_error=data["on_error"],
        cache=data["cache"], cache_dir=(data["cache_dir"] or work_dir / "cache") if data["cache"] == "disk" else None,
        cache_workers=int(data["cache_workers"]), root=data["root"],
        allow_outside_root=bool(data["allow_outside_root"]),
    )
    stream = dict(seed=seed, resampled=bool(data["resampled"]), shuffle_buffer=int(data["shuffle_buffer"])) \
        if streaming else dict(view_policy=data["view_policy"])
    if streaming and data["view_policy"] != DATA_DEFAULTS["view_policy"]:
        raise ConfigError(f"data.view_policy={data['view_policy']!r} applies to manifests; shards hold one image per "
                          "sample as tools/make_shards.py wrote them")
    if mask_labels:
        if streaming:
            raise ConfigError("a segmentation head reads the masks of manifest rows; shards hold no masks: train "
                              "from data.manifest instead")
        stream["mask_labels"] = list(mask_labels)
    if data["label_fraction"] is not None:
        if streaming:
            raise ConfigError("data.label_fraction draws studies from a manifest; shards hold their samples as "
                              "tools/make_shards.py wrote them: train from data.manifest instead")
        stream["studies"] = label_fraction_studies(data, work_dir, is_main)
    if data["report_augment"] is not None:
        if streaming:
            raise ConfigError("data.report_augment draws from each manifest sample's seed; shards stream their "
                              "reports as written: train from data.manifest instead, or set data.report_augment=None")
        stream["report_augment"] = {**REPORT_AUGMENT_DEFAULTS, **data["report_augment"]}
    train_set = DATASETS.build(dict(type=kind, split=data["train_split"], pipeline=data["train_pipeline"],
                                    **stream, **common))
    val_set = None
    if data["val_split"]:
        # every rank validates the whole split; from a manifest, one item per study (its first frontal view)
        whole = dict(split_by_rank=False) if streaming else dict(view_policy="random")
        masks = dict(mask_labels=list(mask_labels)) if mask_labels else {}
        val_set = DATASETS.build(dict(type=kind, split=data["val_split"], pipeline=data["eval_pipeline"],
                                      label_names=train_set.label_names, **whole, **masks, **common))
    logger.info("data: %d train rows, %d val rows from %s", len(train_set), len(val_set or []), source)
    return train_set, val_set


def label_fraction_studies(data: Mapping[str, Any], work_dir: Path, is_main: bool) -> list[str]:
    """The studies of the training split that ``data.label_fraction`` keeps (seeded by
    ``data.label_fraction_seed``, never by ``train.seed``: every mode and seed trains on the same studies), recorded
    in ``<work_dir>/label_fraction.json`` with the labels' positives; a resume draws them again and finds the
    same ones unless the manifest changed, which is refused."""
    rows = [row for row in load_manifest(data["manifest"], root=data["root"],
                                         allow_outside_root=bool(data["allow_outside_root"]))
            if row.get("split") == data["train_split"] and row.get("error") is None]
    label_names = sorted({name for row in rows for name in (row.get("labels") or {})})
    try:
        subset = label_fraction_subset(rows, label_names, data["label_fraction"], int(data["label_fraction_seed"]))
    except ValueError as err:
        raise ConfigError(f"{err} ({data['manifest']}, split {data['train_split']!r})") from err
    record = {"manifest": str(data["manifest"]), "split": data["train_split"], "labels": label_names, **subset}
    path = work_dir / "label_fraction.json"
    if path.is_file() and json.loads(path.read_text(encoding="utf-8"))["study_ids"] != subset["study_ids"] \
            and (work_dir / "checkpoints").is_dir() and any((work_dir / "checkpoints").glob("*.pt")):
        raise CheckpointError(f"{path}: the studies drawn for data.label_fraction={data['label_fraction']} differ "
                              f"from those this run trained on; {data['manifest']} changed since. Restore it, or start "
                              "a new run in another --work-dir")
    if is_main:
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    if subset["missing"]:
        logger.warning("data.label_fraction: no positive of %s in the training split", ", ".join(subset["missing"]))
    logger.info("data.label_fraction=%g (seed %d): %d of %d labelled studies (%d added for positives) -> %s",
                subset["fraction"], subset["seed"], len(subset["study_ids"]), subset["n_studies"],
                len(subset["added"]), path)
    return subset["study_ids"]


def prepare_tokenizers(model_cfg: Mapping[str, Any], texts: Callable[[], list[str]], work_dir: Path, resume: bool,
                       strategy: Any) -> dict[str, Any]:
    """The model config to build, with every ``tokenizer=dict(type="wordpiece", ...)`` replaced by the folder of
    one WordPiece vocabulary trained on the training reports (``texts()``) and shared, ``<work_dir>/tokenizer``.

    A text encoder with ``pretrained`` weights keeps its own vocabulary: its ``tokenizer`` dict is dropped, so
    the encoder loads the tokenizer from the pretrained folder (ids must match its embedding table). The folder
    is reused only by a resume; a fresh run trains it anew (the data may have changed)."""
    model_cfg = copy.deepcopy(dict(model_cfg))
    text = model_cfg.get("text_encoder")
    if text and text.get("pretrained") and isinstance(text.get("tokenizer"), Mapping):
        logger.info("text_encoder.pretrained=%s: using its own tokenizer, not a WordPiece vocabulary trained on "
                    "the reports (set text_encoder.tokenizer to a tokenizer folder to choose another)",
                    text["pretrained"])
        text.pop("tokenizer")
    users = [cfg for cfg in tokenizer_users(model_cfg) if isinstance(cfg["tokenizer"], Mapping)]  # recipes
    if not users:
        return model_cfg
    options = dict(users[0]["tokenizer"])
    kind = options.pop("type", "wordpiece")
    if kind != "wordpiece":
        raise ConfigError(f"model tokenizer type '{kind}' unknown; use dict(type='wordpiece', ...) or a directory")
    out_dir = work_dir / "tokenizer"
    if resume and not (out_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"--resume: the run's tokenizer {out_dir} is missing; the checkpoint's token ids "
                              "belong to it. Restore the folder, or start a new run in another --work-dir")
    if strategy.is_main and not resume:
        corpus = texts()
        logger.info("training a WordPiece tokenizer on %d training reports -> %s", len(corpus), out_dir)
        with atomic_directory(out_dir) as tmp:  # a crash never leaves half a tokenizer
            train_wordpiece_tokenizer(corpus, tmp, **options)
    strategy.barrier()  # the other ranks read the one rank 0 wrote
    for user in users:
        user["tokenizer"] = str(out_dir)
    return model_cfg


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: SIGTERM/SIGINT are the main process's to handle (Slurm signals every process of
    the job, a terminal every process of the group); a worker that died of them would fail the step the main
    process is finishing. Workers still exit with the main process, whatever kills it; at a normal exit they must
    be stopped first (``release_loader_workers``), since multiprocessing's exit handler stops them by SIGTERM."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(train_set: Dataset, collate: Collate, train_cfg: Mapping[str, Any], strategy: Any) -> \
        tuple[DataLoader, ResumableSampler | None]:
    # a filled cache with no random step after it is cheaper to read than to pickle across processes: 0 workers
    workers = getattr(train_set, "loader_workers", lambda n: n)(int(train_cfg["num_workers"]))
    if workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers + fork
    batch_size = int(train_cfg["batch_size"])
    if batch_size * strategy.dist.world_size > len(train_set):
        raise ConfigError(f"train.batch_size {batch_size} x {strategy.dist.world_size} processes exceeds the "
                          f"{len(train_set)} training rows")
    sampler = None  # a streaming (iterable) dataset orders and splits its samples itself
    if not isinstance(train_set, IterableDataset):
        # a global batch never holds two views of one study or two identical reports (contrastive false negatives)
        sampler = ResumableSampler(len(train_set), seed=int(train_cfg["seed"]), rank=strategy.dist.rank,
                                   world_size=strategy.dist.world_size, batch_size=batch_size,
                                   groups=getattr(train_set, "group_keys", None))
    loader = DataLoader(
        train_set, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate, drop_last=True,
        pin_memory=strategy.device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )
    return loader, sampler


def release_loader_workers(loader: DataLoader) -> None:
    """Stop a loader's persistent workers now (a later ``iter(loader)`` starts new ones). Left to the loader's
    garbage collection, a Trainer still referenced at interpreter exit keeps them alive into multiprocessing's exit
    handler, whose SIGTERM they ignore (``ignore_stop_signals``) and whose join then waits forever: a test run
    printed its summary and never exited. torch has no public call for this: ``_iterator`` is where
    ``persistent_workers`` keeps them."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        getattr(iterator, "_shutdown_workers", lambda: None)()
        loader._iterator = None


def build_val_loader(val_set: Dataset, collate: Collate, train_cfg: Mapping[str, Any]) -> DataLoader:
    workers = getattr(val_set, "loader_workers", lambda n: n)(int(train_cfg["num_workers"]))
    return DataLoader(val_set, batch_size=int(train_cfg["batch_size"]), shuffle=False, num_workers=workers,
                      collate_fn=collate)


def train_batches(trainer: Any) -> Iterator[dict[str, Any]]:
    """Training batches forever, epoch after epoch, from the run's position (``trainer.state.epoch`` and
    ``epoch_samples``, advanced here); samples the dataset could not read go to ``trainer.skips``."""
    state, loader, sampler = trainer.state, trainer.loader, trainer.sampler
    batch_size = int(trainer.train_cfg["batch_size"])
    global_batch = batch_size * trainer.strategy.dist.world_size
    while True:
        if sampler is None:  # shards: start counted in this rank's batches
            trainer.train_set.set_epoch(state.epoch, start=state.epoch_samples // global_batch, batch_size=batch_size)
        else:
            sampler.set_epoch(state.epoch, start=state.epoch_samples)
        whole_epoch, batches = state.epoch_samples == 0, 0
        if sampler is None or len(sampler) >= batch_size:
            for batch in loader:
                batches += 1
                state.epoch_samples += global_batch
                if batch["n_skipped"]:
                    trainer.skips.unreadable(state, batch["skipped"])
                if "image" in batch:
                    yield batch
        if whole_epoch and batches == 0:
            # a streaming split too small for every rank's loader workers to fill one batch: each epoch would be
            # empty, and the loop would look for the next batch forever
            workers = max(int(getattr(loader, "num_workers", 0)), 1)
            raise ConfigError(f"an epoch of the {len(trainer.train_set)} training rows gave no batch of "
                              f"train.batch_size {batch_size} (x {trainer.strategy.dist.world_size} processes, "
                              f"{workers} loader worker(s) each, every one batching its own shards): lower "
                              "train.batch_size or train.num_workers, or write smaller shards")
        state.epoch, state.epoch_samples = state.epoch + 1, 0


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
