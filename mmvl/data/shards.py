"""Sharded streaming data: the deterministic head of a pipeline written once into webdataset tar shards
(:func:`write_shards`, ``tools/make_shards.py``), and the ``shards`` dataset that streams them back, split
over ranks and loader workers, for corpora too large to scan or list on a file system.

A shard folder holds ``<split>-000000.tar``... with one sample per manifest row (``image.npy``: the
preprocessed image; ``report.txt``: the section-extracted report; ``labels.json``; ``meta.json``: ``path``
relative to the data root, ``study_id``, ``index``), ``<split>.reports.jsonl`` (the reports again, for
training a tokenizer without reading the images), ``skipped.jsonl`` and the index ``shards.json``, written
last. Nothing else from the manifest row or the image header goes in.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_expander

import mmvl
from mmvl.data.datasets import ManifestDataset
from mmvl.data.manifest import load_manifest
from mmvl.data.transforms import Pipeline
from mmvl.errors import DataError
from mmvl.registry import DATASETS
from mmvl.utils import append_lines, atomic_write_text, get_logger

logger = get_logger(__name__)

INDEX = "shards.json"
FORMAT_VERSION = 1
DTYPES = (None, "float16")
UNSPLIT = "all"  # the split name used when the manifest has no ``split`` column


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so specs from configs and from an index compare."""
    return json.loads(json.dumps(value))


# -- writing -------------------------------------------------------------------------------------------
class _ShardSink:
    """Samples into ``<split>-%06d.tar``, ``shard_size`` per shard; each shard is written under a temp name
    (``.<name>.tmp``) and renamed once it is complete and on disk, so a crash never leaves a torn shard."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.shards: list[dict[str, Any]] = []
        self.bytes = 0
        self._handle: Any = None
        self._tar: wds.TarWriter | None = None
        self._count = 0

    def _temp(self, name: str) -> Path:
        return self.out / f".{name}.tmp"

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._handle = open(self._temp(name), "wb")  # closed in _finish or abort
            self._tar = wds.TarWriter(self._handle, encoder=False, mtime=0)  # mtime 0: same rows, same bytes
            self.shards.append({"file": name, "samples": 0})
            self._count = 0
        self._tar.write(sample)
        self._count += 1
        if self._count == self.shard_size:
            self._finish()

    def _finish(self) -> None:
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        entry = self.shards[-1]
        os.replace(self._temp(entry["file"]), self.out / entry["file"])
        entry["samples"] = self._count
        self.bytes += os.path.getsize(self.out / entry["file"])
        self._tar = self._handle = None

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._temp(self.shards[-1]["file"]).unlink(missing_ok=True)


_WORKER_DATASET: ManifestDataset | None = None


def _set_worker_dataset(dataset: ManifestDataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _load_row(index: int, dataset: ManifestDataset | None = None) -> np.ndarray | str:
    """The deterministic steps' image for row ``index`` as numpy (cheap to send between processes), or the
    reason it could not be read."""
    loaded = (dataset or _WORKER_DATASET).load(index)
    return loaded["error"] if "error" in loaded else loaded["image"].numpy()


def _loaded_rows(dataset: ManifestDataset, jobs: int) -> Iterator[tuple[int, np.ndarray | str]]:
    """``(index, image or error)`` for every row, in order; ``jobs > 1`` reads in worker processes with a
    bounded number of rows in flight, so memory stays flat on a large corpus."""
    if jobs <= 1:
        for index in range(len(dataset)):
            yield index, _load_row(index, dataset)
        return
    with ProcessPoolExecutor(jobs, initializer=_set_worker_dataset, initargs=(dataset,)) as pool:
        pending: deque = deque()
        for index in range(len(dataset)):
            pending.append((index, pool.submit(_load_row, index)))
            if len(pending) >= 4 * jobs:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _npy(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, image, allow_pickle=False)
    return buffer.getvalue()


def _remove_previous(out: Path) -> None:
    """Writing into a folder replaces what an earlier run wrote there: its index goes first (so no reader
    trusts a half-rewritten folder), then the files it listed, then temp files a crash left."""
    index_path = out / INDEX
    if index_path.is_file():
        try:
            previous = json.loads(index_path.read_text(encoding="utf-8"))
            listed = [name for entry in previous.get("splits", {}).values()
                      for name in [s["file"] for s in entry.get("shards", [])] + [entry.get("reports")] if name]
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as err:
            raise DataError(index_path, f"cannot read the previous index ({err}); delete the folder or pick "
                                        "another --out") from err
        index_path.unlink()
        for name in listed:
            if os.path.basename(name) == name:  # only plain names the index itself wrote
                (out / name).unlink(missing_ok=True)
    (out / "skipped.jsonl").unlink(missing_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink()


def write_shards(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    pipeline_spec: Sequence[dict[str, Any]],
    shard_size: int = 1000,
    splits: Sequence[str] | None = None,
    report_sections: Sequence[str] = ("findings", "impression"),
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    dtype: str | None = None,
    progress: bool = True,
    jobs: int = 1,
) -> dict[str, Any]:
    """Write the rows of ``manifest`` through the deterministic head of ``pipeline_spec`` into tar shards.

    ``splits``: the splits to write (default every split the manifest names; a manifest without splits is
    written as split ``"all"``). ``dtype="float16"`` halves the shards (the images are stored in
    float16 and read back as float32); by default they keep the pipeline's float32. Rows that cannot be
    read (and rows ``ManifestDataset`` skips: empty report, bytes that are not UTF-8) are not written;
    they are listed in ``<out>/skipped.jsonl`` and in the result. What an earlier run wrote into ``out``
    (the files its ``shards.json`` listed) is replaced, whichever splits this run writes.

    Returns ``{"out", "splits": {split: {"shards", "samples", "skipped", "bytes"}}, "skipped": [...], "bytes"}``.
    """
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(pipeline_spec)
    data_root = os.path.abspath(root if root is not None else Path(manifest).parent)
    if splits is None:
        rows = load_manifest(manifest, root=root, allow_outside_root=allow_outside_root)
        splits = sorted({row["split"] for row in rows if row.get("split")}) or [None]
    _remove_previous(out)
    from tqdm import tqdm

    show = progress and os.environ.get("MMVL_NO_PROGRESS") != "1"
    index_splits: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, Any]] = []
    for split in splits:
        name = split or UNSPLIT
        dataset = ManifestDataset(manifest, pipeline.spec, split=split, report_sections=report_sections,
                                  check_files=False, on_error="skip", root=root,
                                  allow_outside_root=allow_outside_root)
        split_skipped = [{"split": name, "line": entry["line"], "path": os.path.relpath(entry["path"], data_root),
                          "reason": entry["reason"], "index": None} for entry in dataset.skipped_rows]
        sink = _ShardSink(out, name, int(shard_size))
        reports: list[str] = []
        try:
            for index, image in tqdm(_loaded_rows(dataset, jobs), total=len(dataset), desc=f"shards {name}",
                                     unit="row", disable=not show):
                row = dataset.rows[index]
                path = os.path.relpath(row["image"][0], data_root)
                if isinstance(image, str):
                    split_skipped.append({"split": name, "line": row["line"], "path": path, "reason": image,
                                          "index": index})
                    continue
                meta = {"path": path, "study_id": row.get("study_id"), "index": index}
                sink.write({
                    "__key__": f"{index:09d}",
                    "image.npy": _npy(image.astype(dtype) if dtype else image),
                    "report.txt": row["text"].encode("utf-8"),
                    "labels.json": json.dumps(row["labels"] or {}).encode("utf-8"),
                    "meta.json": json.dumps(meta).encode("utf-8"),
                })
                reports.append(row["text"])
            sink.close()
        except BaseException:
            sink.abort()
            raise
        reports_file = f"{name}.reports.jsonl"
        atomic_write_text(out / reports_file, "".join(json.dumps(text) + "\n" for text in reports))
        if split_skipped:
            append_lines(out / "skipped.jsonl", [json.dumps(entry) for entry in split_skipped])
        index_splits[name] = {"samples": len(reports), "shards": sink.shards, "label_names": dataset.label_names,
                              "reports": reports_file, "skipped": len(split_skipped), "bytes": sink.bytes}
        skipped.extend(split_skipped)
    index = {
        "format_version": FORMAT_VERSION,
        "mmvl_version": mmvl.__version__,
        "dtype": dtype or "float32",
        "report_sections": list(report_sections),
        "deterministic_pipeline": pipeline.deterministic_spec,
        "pipeline": pipeline.spec,
        "label_names": sorted({label for entry in index_splits.values() for label in entry["label_names"]}),
        "splits": index_splits,
    }
    atomic_write_text(out / INDEX, json.dumps(_as_json(index), indent=1) + "\n")
    return {
        "out": str(out),
        "splits": {name: {"shards": len(entry["shards"]), "samples": entry["samples"], "skipped": entry["skipped"],
                          "bytes": entry["bytes"]} for name, entry in index_splits.items()},
        "skipped": skipped,
        "bytes": sum(entry["bytes"] for entry in index_splits.values()),
    }


# -- reading -------------------------------------------------------------------------------------------
def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``shards.json`` of a shard folder (or the file itself)."""
    path = Path(folder)
    if path.name != INDEX:
        path = path / INDEX
    if not path.is_file():
        raise DataError(path.parent, f"no {INDEX} here; write shards with `python tools/make_shards.py MANIFEST "
                                     "--out DIR` and set data.shards=DIR")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"not a readable shard index: {err}") from err
    missing = [key for key in ("format_version", "splits", "deterministic_pipeline", "report_sections", "label_names")
               if not isinstance(index, dict) or key not in index]
    if missing:
        raise DataError(path, f"not a shard index: no {', '.join(missing)}; rewrite it with tools/make_shards.py")
    if index["format_version"] > FORMAT_VERSION:
        raise DataError(path, f"format_version {index['format_version']} is newer than this mmvl reads "
                              f"({FORMAT_VERSION}); upgrade mmvl")
    return index


def sample_seed(seed: int, epoch: int, draw: int, index: int) -> int:
    """The augmentation seed of one sample: a function of (run seed, epoch, shard draw, row index) only, so
    it does not depend on ranks, workers or the order samples arrive in."""
    return int(np.random.SeedSequence([seed, epoch, draw, index]).generate_state(1)[0] & 0x7FFFFFFF)


def _shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard (``{"__key__", "image.npy": bytes, ...}``); the file is closed after."""
    with wds.gopen(url, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


@DATASETS.register("shards")
class ShardDataset(IterableDataset):
    """Streams the samples of one split of a shard folder (``tools/make_shards.py``), as
    :class:`~mmvl.data.datasets.ManifestDataset` yields them: ``{"image": float32 tensor, "report": str,
    "meta": {"path" (relative to the data root), "study_id", "index"}, "labels": (L,) tensor (-1 unknown)}``.

    Config: ``data.type="shards"`` and ``data.shards=DIR`` (the folder holding ``shards.json``); the keyword
    arguments the trainer gives a manifest dataset are accepted, so one config switches between the two:
    ``manifest`` names the folder when ``shards`` is not given; ``report_sections``, when given, must be the
    sections the shards were written with; ``on_error``, ``cache``, ``cache_dir``, ``cache_workers``,
    ``root`` and ``allow_outside_root`` do not apply (unreadable rows were left out when writing, the shards
    are the cache, paths were checked against the root then) and are ignored.

    ``pipeline`` must begin with the deterministic steps the shards were written with; a pipeline that does
    not is refused. The steps after them run on every sample: the rest of the deterministic head (an eval
    pipeline's ``Normalize`` on shards written from the train pipeline), then the random steps with
    :func:`sample_seed` of ``(seed, epoch, draw, index)``, so augmentation is reproducible.

    Shards are split over ranks (``webdataset.split_by_node``: ``torch.distributed`` when initialised, or the
    ``RANK``/``WORLD_SIZE`` environment) and then over DataLoader workers (as ``webdataset.split_by_worker``):
    rank r, worker w of W ranks and K workers reads the shards at positions ``r + W*(w + K*i)`` of the epoch's
    order.
    Each part is disjoint and together they are the split. When the shard count is not a multiple of W*K,
    the first parts get one shard more: an epoch then holds more batches on some ranks (a step-based loop
    just starts their next epoch later), and a rank with no shard at all is an error (write smaller shards,
    or use ``resampled``). ``shuffle_buffer=0`` streams shards and samples in written order (validation);
    ``> 0`` permutes the shard order per ``(seed, epoch)`` (the same order on every rank) and shuffles
    samples through a buffer of that size, seeded per (seed, epoch, rank, worker). ``resampled=True`` draws
    shards with replacement without end (one stream per ``(seed, epoch)``, split like the shard list), for
    runs that count steps, not epochs.

    :meth:`set_epoch` selects the epoch and where in it to start; it reaches persistent loader workers
    (the state lives in shared memory). ``len()`` is the sample count of the split, not of one rank.
    """

    def __init__(
        self,
        shards: str | os.PathLike | None = None,
        *,
        pipeline: Sequence[dict[str, Any]],
        split: str | None = None,
        label_names: Sequence[str] | None = None,
        seed: int = 0,
        resampled: bool = False,
        shuffle_buffer: int = 0,
        manifest: str | os.PathLike | None = None,
        report_sections: Sequence[str] | None = None,
        on_error: str = "skip",
        cache: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_workers: int = 0,
        root: str | os.PathLike | None = None,
        allow_outside_root: bool = False,
        split_by_rank: bool = True,
    ):
        folder = shards if shards is not None else manifest
        if folder is None:
            raise DataError(None, "the shards dataset needs data.shards: the folder tools/make_shards.py wrote")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        folder = Path(folder)
        self.folder = folder.parent if folder.name == INDEX else folder
        self.split_by_rank = split_by_rank  # False: every rank reads the whole split (the trainer's validation)
        self.manifest = str(self.folder)  # what the trainer's messages name
        index = read_index(self.folder)
        if cache:
            logger.info("%s: data.cache=%r is not used with shards (they hold the deterministic steps' output)",
                        self.folder, cache)
        if report_sections is not None and _as_json(list(report_sections)) != index["report_sections"]:
            raise DataError(self.folder, f"written with report_sections {index['report_sections']}, but "
                                         f"data.report_sections is {list(report_sections)}; rewrite the shards "
                                         "or set data.report_sections to match")
        self.pipeline = Pipeline(pipeline)
        written = index["deterministic_pipeline"]
        head = _as_json(self.pipeline.spec[: len(written)])
        if len(written) > self.pipeline.split or head != written:
            raise DataError(self.folder, f"the shards hold the output of the deterministic steps {written}, but the "
                                         f"configured pipeline starts with {head}; rewrite the shards with "
                                         "`python tools/make_shards.py MANIFEST --config CONFIG --out DIR` from "
                                         "this config, or train with the config they were written with")
        self._pending = self.pipeline.transforms[len(written): self.pipeline.split]  # deterministic, not yet run
        names = list(index["splits"]) if split is None else [split]
        unknown = [name for name in names if name not in index["splits"]]
        if unknown:
            raise DataError(self.folder, f"no split '{unknown[0]}' in the shards (they hold: "
                                         f"{', '.join(index['splits']) or 'none'})")
        entries = [index["splits"][name] for name in names]
        self.split = split
        self.urls = [str(self.folder / shard["file"]) for entry in entries for shard in entry["shards"]]
        if not self.urls:
            raise DataError(self.folder, f"split {split!r} has no samples (see skipped.jsonl there)")
        self._size = sum(entry["samples"] for entry in entries)
        self._reports = [entry["reports"] for entry in entries]
        if label_names is None:
            label_names = entries[0]["label_names"] if split is not None else index["label_names"]
        self.label_names = list(label_names)
        self.seed, self.resampled, self.shuffle_buffer = int(seed), bool(resampled), int(shuffle_buffer)
        self.skipped_rows: list[dict[str, Any]] = []  # rows that could not be read were left out when writing
        self.index = index
        self._state = torch.zeros(3, dtype=torch.int64).share_memory_()  # epoch, start batch, batch size
        self._state[2] = 1

    def set_epoch(self, epoch: int, start: int = 0, batch_size: int = 1) -> None:
        """Stream epoch ``epoch`` from batch ``start`` on: for a resumed run, ``start`` is the number of batches
        of ``batch_size`` this rank's DataLoader had already yielded in that epoch.

        A DataLoader takes batch k from worker ``k % num_workers`` while every worker has data, and starts
        again at worker 0 when resumed; so worker w takes the shards of worker ``(w + start) % num_workers``
        and skips that worker's batches before ``start``. The resumed loader then yields exactly the batches
        ``start, start + 1, ...`` of the uninterrupted epoch, until the first worker runs out in the epoch
        (shards divided unevenly, or the split's short last shard); past that point a resumed epoch may
        repeat or miss a few batches. Call it before iterating the loader.
        """
        self._state[0], self._state[1], self._state[2] = int(epoch), int(start), max(int(batch_size), 1)

    def __len__(self) -> int:
        return self._size

    @property
    def texts(self) -> list[str]:
        """The split's reports, in written order (read from ``<split>.reports.jsonl``, not from the shards)."""
        texts: list[str] = []
        for name in self._reports:
            with open(self.folder / name, encoding="utf-8") as handle:
                texts.extend(json.loads(line) for line in handle if line.strip())
        return texts

    def _shard_order(self, epoch: int) -> Iterator[tuple[int, str]]:
        """``(draw, url)`` for the epoch, identical on every rank and worker (they then take their part)."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.resampled:
            for draw in itertools.count():
                yield draw, self.urls[int(rng.integers(len(self.urls)))]
        order = rng.permutation(len(self.urls)) if self.shuffle_buffer else range(len(self.urls))
        for position in order:
            yield 0, self.urls[int(position)]

    def _decode(self, raw: dict[str, Any], epoch: int, draw: int) -> dict[str, Any]:
        meta = json.loads(raw["meta.json"])
        sample = {"image": np.load(io.BytesIO(raw["image.npy"]), allow_pickle=False), "meta": {}}
        for transform in self._pending:
            sample = transform(sample, None)
        augmented = self.pipeline.augment(sample, sample_seed(self.seed, epoch, draw, meta["index"]))
        item = {
            "image": torch.from_numpy(augmented["image"]),
            "report": raw["report.txt"].decode("utf-8"),
            "meta": {"path": meta["path"], "study_id": meta.get("study_id"), "index": meta["index"]},
        }
        if self.label_names:
            labels = json.loads(raw["labels.json"])
            item["labels"] = torch.tensor([float(labels.get(name, -1)) for name in self.label_names],
                                          dtype=torch.float32)
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start, batch_size = (int(value) for value in self._state.tolist())
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if not self.split_by_rank:
            rank, world_size = 0, 1
        if not self.resampled and len(self.urls) < world_size:
            raise DataError(self.folder, f"{len(self.urls)} shard(s) in split {self.split!r} for {world_size} ranks: "
                                         f"rank {rank} would get none; write smaller shards (--shard-size) or "
                                         "set resampled=True")
        # Resuming at batch `start`, the loader's round robin begins again at worker 0, which must therefore
        # play the part worker `start % num_workers` played (see set_epoch).
        role = (worker + start) % num_workers
        order = self._shard_order(epoch)
        by_rank = wds.split_by_node(order) if self.split_by_rank else order
        shards = itertools.islice(by_rank, role, None, num_workers)
        samples: Iterable[tuple[int, dict[str, Any]]] = (
            (draw, raw) for draw, url in shards for raw in _shard_samples(url))
        if self.shuffle_buffer > 0:
            buffer_seed = sample_seed(self.seed, epoch, rank, role)
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=buffer_seed)(samples)
        skip = batch_size * len(range(role, start, num_workers))
        for draw, raw in itertools.islice(samples, skip, None):
            yield self._decode(raw, epoch, draw)
