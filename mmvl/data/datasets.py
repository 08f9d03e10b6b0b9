"""Map-style datasets registered in ``DATASETS``; the manifest dataset is the default for 2D studies."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmvl.config.schema import CACHE_KINDS, ON_ERROR, VIEW_POLICIES
from mmvl.data.fractions import study_key
from mmvl.data.manifest import is_frontal, load_manifest
from mmvl.data.reports import augment_report, report_parts
from mmvl.data.transforms import LoadVolume, Pipeline
from mmvl.errors import DataError, ManifestError
from mmvl.registry import DATASETS
from mmvl.utils import get_logger

logger = get_logger(__name__)


# Disk-cache entries above this size are memory-mapped, smaller ones read whole. Measured with the collate's stack
# on one thread: a 224 x 224 float32 image is 0.16 ms read against 0.27 ms mapped; a 224 x 224 x 112 volume
# 30 ms read against 18 ms mapped.
MMAP_BYTES = 1 << 20


class LoadStage:
    """The deterministic head of a pipeline, for MONAI's caching datasets (wrapped in ``monai.transforms.Lambda``).

    A data error becomes ``{"error": message}`` rather than an exception, so a cache records the bad
    file once (and MONAI's ``CacheDataset`` can fill its cache past it) and the dataset decides to
    raise or skip.
    """

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.pipeline.load(item["path"], mask_paths=item.get("masks"), **item["fields"])
        except DataError as err:
            return {"error": str(err)}


def _stamp(path: str) -> list[int]:
    """Size and modification time, so an edited file misses the disk cache (folders: their own mtime)."""
    try:
        info = os.stat(path)
    except OSError:
        return [-1, -1]
    return [info.st_size, info.st_mtime_ns]


class ArrayCache(Dataset):
    """Disk cache of the deterministic steps' output: per item a ``<key>.npy`` (the float32 image) and a
    ``<key>.json`` (its metadata, or the error the file gave), the key a SHA-256 of the item's path, fields,
    file size and mtime (its mask files' too) and the deterministic pipeline spec.

    A hit is one small JSON read and the ``.npy``, memory-mapped above :data:`MMAP_BYTES` (copy-on-write, so the
    tensor handed out is writable and a caller's writes never reach the file; no copy before the collate's
    stack) and read whole below it (one ``read`` beats mapping and faulting in a few pages): no pickling.
    A miss runs ``stage`` and writes both files atomically (the JSON last, so a reader never sees half an
    entry); concurrent workers filling the same entry write the same bytes.
    """

    def __init__(self, items: Sequence[dict[str, Any]], stage: Any, cache_dir: str | os.PathLike):
        self.items, self.stage, self.cache_dir = list(items), stage, os.fspath(cache_dir)
        self.keys = [hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest() for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def filled(self) -> bool:
        """Whether every item is in the cache (one ``stat`` per item)."""
        return all(os.path.isfile(os.path.join(self.cache_dir, key + ".json")) for key in self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        base = os.path.join(self.cache_dir, self.keys[index])
        try:
            with open(base + ".json", encoding="utf-8") as handle:
                record = json.load(handle)
        except (FileNotFoundError, json.JSONDecodeError):
            return self._fill(base, self.items[index])
        if "error" in record:
            return {"error": record["error"]}
        image = base + ".npy"
        mapped = "c" if os.path.getsize(image) > MMAP_BYTES else None
        out = {"image": torch.from_numpy(np.load(image, mmap_mode=mapped)), "meta": record["meta"]}
        if record.get("mask"):
            out["mask"] = torch.from_numpy(np.load(base + ".mask.npy", mmap_mode=mapped))
        return out

    def _fill(self, base: str, item: dict[str, Any]) -> dict[str, Any]:
        loaded = self.stage(item)
        partial = f".{os.getpid()}.tmp"
        if "error" in loaded:
            record = {"error": loaded["error"]}
        else:
            with open(base + ".npy" + partial, "wb") as handle:
                np.save(handle, loaded["image"].numpy())
            os.replace(base + ".npy" + partial, base + ".npy")
            record = {"meta": loaded["meta"]}
            if loaded.get("mask") is not None:
                with open(base + ".mask.npy" + partial, "wb") as handle:
                    np.save(handle, loaded["mask"].numpy())
                os.replace(base + ".mask.npy" + partial, base + ".mask.npy")
                record["mask"] = True
        with open(base + ".json" + partial, "w", encoding="utf-8") as handle:
            json.dump(record, handle, default=_jsonable)
        os.replace(base + ".json" + partial, base + ".json")
        return loaded


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays in reader metadata, as JSON numbers and lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serialisable")


@DATASETS.register("manifest")
class ManifestDataset(Dataset):
    """Rows of a manifest, optionally filtered by ``split``, read through a preprocessing pipeline.

    Items are ``{"image": (1, H, W) or (1, X, Y, Z) float tensor, "report": str, "labels": (L,) float tensor
    (-1 unknown), "meta": {"path", "study_id", "index"}}``. The key may be an int or ``(index, seed)``: the
    seed drives the random augmentation, which is how the trainer makes augmentation reproducible across
    resumes.

    Rows with an empty report (after section extraction) or with bytes that are not UTF-8 are skipped at
    load time and listed in ``skipped_rows``; missing image files are an error naming them. A file that
    cannot be read raises, or with ``on_error="skip"`` yields ``{"skipped": {"path", "line", "reason",
    "index"}}``, which :class:`~mmvl.data.loader.Collate` drops and reports.

    Image paths outside ``root`` (default: the manifest's folder) are refused unless ``allow_outside_root``
    (config ``data.root`` / ``data.allow_outside_root``; see :func:`~mmvl.data.manifest.load_manifest`).

    A row is a study: ``image`` may list several views (with an optional ``views`` list: ``PA``, ``AP``,
    ``LATERAL``...). ``view_policy="random"`` (default) gives one item per study, its view drawn from the
    per-sample seed (so each epoch may show another view, reproducibly and across resumes); ``"frontal"`` draws
    among its frontal views only (all views when the row names none); ``"all"`` gives one item per view. Without a
    seed (evaluation) a study shows its first frontal view (its first image when no view is frontal or named).
    ``group_keys`` name each item's study and report text, so a sampler can keep them out of one batch.
    ``studies``: only the rows of these studies (``study_id``, else the first image path: a label fraction).
    ``mask_labels``: segmentation; each item also holds ``masks`` ``(L, ...)`` (0/1 float32, in the image's
    geometry after the pipeline: spatial steps move them with the image), one per label from the row's ``masks``
    (label -> file, relative to the manifest), empty where the row has none; a missing mask file is an error naming
    it, an unreadable one fails (or is skipped) as an unreadable image does.
    ``report_augment``: ``dict(shuffle=..., drop=...)`` of :func:`~mmvl.data.reports.augment_report`, applied to
    the report of every sample drawn with a seed (training), from that seed: a resumed run sees the same text.

    ``cache="memory"`` keeps the output of the deterministic steps in RAM (MONAI ``CacheDataset``, filled
    at start-up); ``cache="disk"`` stores it under ``cache_dir`` (:class:`ArrayCache`: one memory-mapped ``.npy``
    per item), keyed by path, file size and mtime and the deterministic part of the pipeline spec. Random steps
    always run fresh with the per-sample seed, so cached and uncached runs give identical tensors. A loader
    should take its worker count from :meth:`loader_workers`: a fully cached evaluation set is fastest without.
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        pipeline: Sequence[dict[str, Any]],
        split: str | None = None,
        report_sections: Sequence[str] = ("findings", "impression"),
        label_names: Sequence[str] | None = None,
        check_files: bool = True,
        on_error: str = "raise",
        require_report: bool = True,
        cache: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_workers: int = 0,
        root: str | os.PathLike | None = None,
        allow_outside_root: bool = False,
        view_policy: str = "random",
        studies: Collection[str] | None = None,
        mask_labels: Sequence[str] | None = None,
        report_augment: Mapping[str, Any] | None = None,
    ):
        if view_policy not in VIEW_POLICIES:
            raise ValueError(f"view_policy must be one of {VIEW_POLICIES}, got {view_policy!r}")
        self.view_policy = view_policy
        self.report_augment = dict(report_augment) if report_augment is not None else None
        if self.report_augment is not None:  # refused here, not at the first sample
            augment_report(["."], np.random.default_rng(0), **self.report_augment)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if cache not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
        if cache == "disk" and cache_dir is None:
            raise ValueError("cache='disk' needs cache_dir")
        self.manifest = os.fspath(manifest)
        self.split = split
        self.on_error = on_error
        self.pipeline = Pipeline(pipeline)
        rows = load_manifest(manifest, root=root, allow_outside_root=allow_outside_root)
        if split is not None:
            rows = [row for row in rows if row.get("split") == split]
            if not rows:
                raise ManifestError(manifest, f"no rows with split == '{split}'")
        if studies is not None:  # a label fraction's subset (mmvl.data.fractions)
            studies = set(studies)
            rows = [row for row in rows if study_key(row) in studies]
        self.rows: list[dict[str, Any]] = []
        self.skipped_rows: list[dict[str, Any]] = []
        for row in rows:
            reason = row.get("error")
            if reason is None:
                row["parts"] = report_parts(row["report"], report_sections)
                row["text"] = " ".join(row["parts"])
                if require_report and not row["text"]:
                    reason = "empty report" + (f" (sections {list(report_sections)})" if report_sections else "")
            if reason is not None:
                self.skipped_rows.append({"line": row["line"], "path": row["image"][0], "reason": reason})
                continue
            self.rows.append(row)
        if self.skipped_rows:
            counts = Counter(entry["reason"].split(" (")[0] for entry in self.skipped_rows)
            logger.warning("%s: skipped %d rows at load time: %s", self.manifest, len(self.skipped_rows),
                           ", ".join(f"{n} {reason}" for reason, n in counts.items()))
        if not self.rows:
            raise ManifestError(manifest, f"no usable rows (split={split!r}; all reports empty?)")
        if check_files:
            volume = self.pipeline.kind == "3d"
            missing = [(row["line"], p) for row in self.rows for p in row["image"]
                       if not (os.path.isfile(p) or (volume and os.path.isdir(p)))]
            if missing:
                listed = "; ".join(f"line {line}: {p}" for line, p in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise ManifestError(manifest, f"{len(missing)} image file(s) not found: {listed}{more}")
        self.mask_labels = list(mask_labels) if mask_labels else None
        if self.mask_labels:
            from mmvl.data.masks import row_mask_paths

            manifest_dir = os.path.dirname(os.path.abspath(self.manifest))
            try:
                for row in self.rows:
                    row["mask_paths"] = [row_mask_paths(row, self.mask_labels, manifest_dir, view)
                                         for view in range(len(row["image"]))]
            except DataError as err:
                raise ManifestError(manifest, err.problem) from err
            if check_files:
                missing = [(row["line"], p) for row in self.rows for paths in row["mask_paths"] for p in paths
                           if p is not None and not os.path.isfile(p)]
                if missing:
                    listed = "; ".join(f"line {line}: {p}" for line, p in missing[:5])
                    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                    raise ManifestError(manifest, f"{len(missing)} mask file(s) not found: {listed}{more}")
        if label_names is None:
            label_names = sorted({name for row in self.rows for name in (row["labels"] or {})})
        self.label_names = list(label_names)
        # the views each study may show, and the items: (row, fixed view) or (row, None: drawn per sample)
        self.candidates = [self._candidate_views(row) for row in self.rows]
        if view_policy == "all":
            self.items = [(r, v) for r, views in enumerate(self.candidates) for v in views]
        else:
            self.items = [(r, None) for r in range(len(self.rows))]
        self.cache = cache
        self._pairs = [(r, v) for r, views in enumerate(self.candidates) for v in views]  # what a cache holds
        self._pair_index = {pair: i for i, pair in enumerate(self._pairs)}
        self._cached = self._build_cache(cache, cache_dir, cache_workers) if cache else None

    def _candidate_views(self, row: dict[str, Any]) -> list[int]:
        views = row.get("views")
        every = list(range(len(row["image"])))
        if self.view_policy == "frontal" and views:
            frontal = [v for v in every if is_frontal(views[v])]
            return frontal or every
        return every

    def _default_view(self, row_index: int) -> int:
        """The view shown without a seed: the first frontal one among the candidates, else the first."""
        views = self.rows[row_index].get("views")
        candidates = self.candidates[row_index]
        return next((v for v in candidates if views and is_frontal(views[v])), candidates[0])

    @property
    def group_keys(self) -> list[tuple[Any, str]]:
        """``(study, normalised report text)`` of every item: two items sharing either are one study's views or
        two identical reports, a false negative in a contrastive batch."""
        keys = []
        for r, _ in self.items:
            row = self.rows[r]
            study = row.get("study_id")
            text = " ".join(row["text"].lower().split())
            keys.append((("study", study) if study not in (None, "") else ("row", r), text))
        return keys

    @property
    def skipped_empty_reports(self) -> int:
        return sum(entry["reason"].startswith("empty report") for entry in self.skipped_rows)

    def _item(self, row: dict[str, Any], view: int = 0) -> dict[str, Any]:
        fields = {key: row[key] for key in LoadVolume.FIELDS if row.get(key) is not None}
        item = {"path": row["image"][view], "fields": fields}
        if self.mask_labels:
            item["masks"] = row["mask_paths"][view]
        return item

    def _build_cache(self, cache: str, cache_dir: str | os.PathLike | None, workers: int) -> Dataset:
        if cache == "memory":
            from monai.data import CacheDataset
            from monai.transforms import Lambda

            stage = Lambda(LoadStage(self.pipeline), track_meta=False)
            items = [self._item(self.rows[r], v) for r, v in self._pairs]
            return CacheDataset(items, transform=stage, cache_rate=1.0, num_workers=workers or None,
                                copy_cache=False, progress=os.environ.get("MMVL_NO_PROGRESS") != "1")
        spec = json.dumps(self.pipeline.deterministic_spec, sort_keys=True)
        items = []
        for r, v in self._pairs:
            item = self._item(self.rows[r], v)
            item.update(stamp=_stamp(item["path"]), spec=spec)
            if item.get("masks") is not None:  # an edited or replaced mask file misses the cache too
                item["mask_stamps"] = [_stamp(path) if path else None for path in item["masks"]]
            items.append(item)
        os.makedirs(cache_dir, exist_ok=True)
        return ArrayCache(items, LoadStage(self.pipeline), cache_dir)

    def loader_workers(self, requested: int) -> int:
        """DataLoader workers worth using: 0 when every item is cached and no random step follows the cache (an
        evaluation pipeline, or training without augmentation), since a hit then costs less than sending the
        item from a worker process, let alone starting the workers; else ``requested``."""
        if self._cached is None or self.pipeline.split < len(self.pipeline.transforms):
            return requested
        if self.cache == "disk" and not self._cached.filled():
            return requested
        return 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def texts(self) -> list[str]:
        """The report of every study (once per study, whatever the view policy)."""
        return [row["text"] for row in self.rows]

    def labels_of(self, row: dict[str, Any]) -> torch.Tensor:
        labels = row["labels"] or {}
        return torch.tensor([float(labels.get(name, -1)) for name in self.label_names], dtype=torch.float32)

    def load(self, row_index: int, view: int = 0) -> dict[str, Any]:
        """Output of the deterministic steps for view ``view`` of row ``row_index`` (from the cache if any), or
        ``{"error": ...}``."""
        if self._cached is not None:
            return self._cached[self._pair_index[(row_index, view)]]
        return LoadStage(self.pipeline)(self._item(self.rows[row_index], view))

    def view_of(self, index: int, seed: int | None) -> int:
        """The view item ``index`` shows: its fixed one, one drawn from ``seed``, or the default one."""
        row_index, view = self.items[index]
        if view is not None:
            return view
        candidates = self.candidates[row_index]
        if seed is None or len(candidates) == 1:
            return self._default_view(row_index)
        # its own stream, derived from the sample seed: the augmentation's draws are those of a one-view row
        return candidates[int(np.random.default_rng([seed, 1]).integers(len(candidates)))]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        row_index = self.items[index][0]
        row = self.rows[row_index]
        view = self.view_of(index, seed)
        path = row["image"][view]
        loaded = self.load(row_index, view)
        if "error" in loaded:
            if self.on_error == "raise":
                raise DataError(None, f"manifest line {row['line']}: {loaded['error']}")
            logger.warning("skipping unreadable sample (manifest line %d): %s", row["line"], loaded["error"])
            return {"skipped": {"index": index, "line": row["line"], "path": path, "reason": loaded["error"]}}
        sample = self.pipeline.augment(loaded, seed)
        image = torch.from_numpy(sample["image"])
        if self.cache == "memory" and image.data_ptr() == loaded["image"].data_ptr():
            image = image.clone()  # never hand out the cache's own memory
        text, parts = row["text"], row["parts"]
        if self.report_augment is not None and seed is not None:  # its own stream of the sample seed, as the view
            parts = augment_report(parts, np.random.default_rng([seed, 2]), **self.report_augment)
            text = " ".join(parts)
        item = {
            "image": image,
            "report": text,
            "report_parts": parts,
            "meta": {"path": path, "study_id": row.get("study_id"), "index": index, "view": view,
                     "view_name": row["views"][view] if row.get("views") else None},
        }
        if self.label_names:
            item["labels"] = self.labels_of(row)
        if self.mask_labels:
            item["masks"] = torch.from_numpy(sample["mask"])
        return item
