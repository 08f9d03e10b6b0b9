"""Map-style datasets registered in ``DATASETS``; the manifest dataset is the default for 2D studies."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmvl.data.manifest import load_manifest
from mmvl.data.reports import report_text
from mmvl.data.transforms import Pipeline
from mmvl.errors import DataError, ManifestError
from mmvl.registry import DATASETS
from mmvl.utils import get_logger

logger = get_logger(__name__)


@DATASETS.register("manifest")
class ManifestDataset(Dataset):
    """Rows of a manifest, optionally filtered by ``split``, read through a preprocessing pipeline.

    Items are ``{"image": (1, H, W) float tensor, "report": str, "labels": (L,) float tensor (-1 unknown),
    "meta": {"path", "study_id", "index"}}``. The key may be an int or ``(index, seed)``: the seed drives
    the random augmentation, which is how the trainer makes augmentation reproducible across resumes.
    Rows with an empty report (after section extraction) are skipped and counted at load time; missing
    image files are an error naming them; undecodable files raise, or with ``on_error="skip"`` are
    logged and returned as ``None`` (the collate function drops and counts them).
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
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.manifest = os.fspath(manifest)
        self.split = split
        self.on_error = on_error
        self.pipeline = Pipeline(pipeline)
        rows = load_manifest(manifest)
        if split is not None:
            rows = [row for row in rows if row.get("split") == split]
            if not rows:
                raise ManifestError(manifest, f"no rows with split == '{split}'")
        self.rows: list[dict[str, Any]] = []
        self.skipped_empty_reports = 0
        for row in rows:
            row["text"] = report_text(row["report"], report_sections)
            if require_report and not row["text"]:
                self.skipped_empty_reports += 1
                if self.skipped_empty_reports <= 3:
                    logger.warning("%s line %d: empty report, row skipped", self.manifest, row["line"])
                continue
            self.rows.append(row)
        if self.skipped_empty_reports:
            logger.warning("%s: skipped %d rows with empty reports", self.manifest, self.skipped_empty_reports)
        if not self.rows:
            raise ManifestError(manifest, f"no usable rows (split={split!r}; all reports empty?)")
        if check_files:
            missing = [(row["line"], p) for row in self.rows for p in row["image"] if not os.path.isfile(p)]
            if missing:
                listed = "; ".join(f"line {line}: {p}" for line, p in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise ManifestError(manifest, f"{len(missing)} image file(s) not found: {listed}{more}")
        if label_names is None:
            label_names = sorted({name for row in self.rows for name in (row["labels"] or {})})
        self.label_names = list(label_names)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def texts(self) -> list[str]:
        return [row["text"] for row in self.rows]

    def labels_of(self, row: dict[str, Any]) -> torch.Tensor:
        labels = row["labels"] or {}
        return torch.tensor([float(labels.get(name, -1)) for name in self.label_names], dtype=torch.float32)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, seed = key if isinstance(key, tuple) else (key, None)
        row = self.rows[index]
        path = row["image"][0]
        try:
            sample = self.pipeline(path, seed=seed)
        except DataError as err:
            if self.on_error == "raise":
                raise
            logger.warning("skipping unreadable sample (manifest line %d): %s", row["line"], err)
            return None
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(sample["image"])),
            "report": row["text"],
            "meta": {"path": path, "study_id": row.get("study_id"), "index": index},
        }
        if self.label_names:
            item["labels"] = self.labels_of(row)
        return item
