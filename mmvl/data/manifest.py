"""Manifests: one row per study, ``{"image": path or [paths], "report": str, "labels": {...}?, "split": ...}``.

JSONL or CSV. Paths are relative to the manifest's folder unless absolute. In CSV, several images are
separated by ``;`` and ``labels`` is a JSON object string.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from mmvl.errors import ManifestError

REQUIRED_KEYS = ("image", "report")


def _parse_row(raw: dict[str, Any], path: Path, line: int, csv_row: bool) -> dict[str, Any]:
    missing = [key for key in REQUIRED_KEYS if key not in raw or raw[key] in (None, "")]
    if "image" in missing:
        raise ManifestError(path, f"row {line}: no 'image' path (keys: {sorted(raw)})")
    row = dict(raw)
    images = raw["image"]
    if csv_row and isinstance(images, str):
        images = [part.strip() for part in images.split(";") if part.strip()]
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ManifestError(path, f"row {line}: 'image' must be a path or a list of paths, got {images!r}")
    row["image"] = [p if os.path.isabs(p) else str(path.parent / p) for p in images]
    row["report"] = "" if raw.get("report") is None else str(raw["report"])
    labels = raw.get("labels")
    if csv_row and isinstance(labels, str):
        try:
            labels = json.loads(labels) if labels.strip() else None
        except json.JSONDecodeError as err:
            raise ManifestError(path, f"row {line}: 'labels' is not a JSON object: {err}") from err
    if labels is not None and not isinstance(labels, dict):
        raise ManifestError(path, f"row {line}: 'labels' must be a dict of name -> 0/1, got {labels!r}")
    row["labels"] = labels
    row["line"] = line
    return row


def load_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` or ``.csv`` manifest into rows with absolute image paths (files not checked)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "manifest not found")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise ManifestError(path, f"CSV manifest needs an 'image' column, found {reader.fieldnames}")
            for line, raw in enumerate(reader, start=2):
                rows.append(_parse_row(raw, path, line, csv_row=True))
    else:
        with open(path) as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as err:
                    raise ManifestError(path, f"line {line}: invalid JSON ({err.msg})") from err
                if not isinstance(raw, dict):
                    raise ManifestError(path, f"line {line}: expected a JSON object, got {type(raw).__name__}")
                rows.append(_parse_row(raw, path, line, csv_row=False))
    if not rows:
        raise ManifestError(path, "manifest has no rows")
    return rows
