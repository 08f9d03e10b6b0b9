"""Manifests: one row per study, ``{"image": path or [paths], "report": str, "labels": {...}?, "split": ...}``.

JSONL or CSV. Paths are relative to the manifest's folder unless absolute. In CSV, several images are
separated by ``;`` and ``labels`` is a JSON object string. 3D rows point at a NIfTI file or a DICOM series
folder and may add ``series_uid``, ``spacing`` and ``rescale`` (see ``datasets/README.md``).

Manifests must be UTF-8. A row holding bytes that are not UTF-8 (typically a report exported as
Latin-1) is kept with an ``error`` entry, so datasets skip and count it and ``tools/check_data.py`` lists it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from mmvl.errors import ManifestError

REQUIRED_KEYS = ("image", "report")
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by errors="surrogateescape"


def _encoding_problem(raw: dict[str, Any]) -> str | None:
    for key, value in raw.items():
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str) and (match := _UNDECODED.search(text)):
                byte = ord(match.group()) - 0xDC00
                return f"'{key}' is not valid UTF-8 (byte 0x{byte:02x}); re-encode the manifest as UTF-8"
    return None


def _readable(value: Any) -> Any:
    """Undecodable bytes shown as U+FFFD so that error messages and logs stay printable."""
    if isinstance(value, str):
        return _UNDECODED.sub("\ufffd", value)
    if isinstance(value, list):
        return [_readable(v) for v in value]
    return value


def _parse_row(raw: dict[str, Any], path: Path, line: int, csv_row: bool) -> dict[str, Any]:
    problem = _encoding_problem(raw)
    raw = {key: _readable(value) for key, value in raw.items()}
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
    for key in ("spacing", "rescale"):  # 3D overrides; JSON text in CSV
        value = raw.get(key)
        if csv_row and isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else None
            except json.JSONDecodeError as err:
                raise ManifestError(path, f"row {line}: '{key}' is not JSON: {err}") from err
        row[key] = value or None
    row["line"] = line
    if problem:
        row["error"] = problem
    return row


def load_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` or ``.csv`` manifest into rows with absolute image paths (files not checked)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "manifest not found")
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as err:
        raise ManifestError(path, f"cannot read manifest: {err}") from err
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise ManifestError(path, f"CSV manifest needs an 'image' column, found {reader.fieldnames}")
        try:
            for raw in reader:
                rows.append(_parse_row(raw, path, reader.line_num, csv_row=True))
        except csv.Error as err:
            raise ManifestError(path, f"line {reader.line_num}: malformed CSV ({err})") from err
    else:
        for line, record in enumerate(text.split("\n"), start=1):
            if not record.strip():
                continue
            try:
                raw = json.loads(record)
            except json.JSONDecodeError as err:
                raise ManifestError(path, f"line {line}: invalid JSON ({err.msg})") from err
            if not isinstance(raw, dict):
                raise ManifestError(path, f"line {line}: expected a JSON object, got {type(raw).__name__}")
            rows.append(_parse_row(raw, path, line, csv_row=False))
    if not rows:
        raise ManifestError(path, "manifest has no rows")
    return rows
