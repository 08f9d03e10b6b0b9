"""Manifests: one row per study, ``{"image": path or [paths], "report": str, "labels": {...}?, "split": ...}``.

JSONL or CSV. Paths are relative to the manifest's folder unless absolute. In CSV, several images are
separated by ``;`` and ``labels`` is a JSON object string. 3D rows point at a NIfTI file or a DICOM series
folder and may add ``series_uid``, ``spacing`` and ``rescale`` (see ``datasets/README.md``).

Image paths must lie inside the data root: the manifest's folder, or ``root`` (config ``data.root``). A path
that escapes it (``../``, or an absolute path elsewhere) is refused unless ``allow_outside_root=True``
(``data.allow_outside_root``), so a manifest from elsewhere cannot make mmvl read arbitrary files. The check
is on the path text after normalisation; symbolic links inside the root are followed as they are.

Manifests must be UTF-8. A row holding bytes that are not UTF-8 (typically a report exported as
Latin-1) is kept with an ``error`` entry, so datasets skip and count it and ``tools/check_data.py`` lists it.
"""

from __future__ import annotations

import argparse
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


def _inside(path: str, root: str) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return os.path.commonpath([path, root]) == root if os.path.isabs(path) == os.path.isabs(root) else False


FRONTAL_VIEWS = ("PA", "AP", "AP AXIAL", "PA AXIAL", "FRONTAL")  # (0018,5101) ViewPosition values seen frontal


def _parse_views(views: Any, n_images: int, path: Path, line: int, csv_row: bool) -> list[str] | None:
    """The optional ``views`` of a study row: one view name per image (``PA``, ``AP``, ``LATERAL``, ``LL``...),
    upper-cased; ``;``-separated in CSV."""
    if views in (None, "", []):
        return None
    if csv_row and isinstance(views, str):
        views = [part.strip() for part in views.split(";")]
    if isinstance(views, str):
        views = [views]
    if not isinstance(views, list) or len(views) != n_images or not all(isinstance(v, str | None) for v in views):
        raise ManifestError(path, f"row {line}: 'views' must list one view name per image ({n_images}), got "
                                  f"{views!r}")
    return [(v or "").strip().upper() for v in views]


def is_frontal(view: str | None) -> bool:
    return (view or "").upper() in FRONTAL_VIEWS


def _parse_row(raw: dict[str, Any], path: Path, line: int, csv_row: bool, root: str | None) -> dict[str, Any]:
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
    row["image"] = [os.path.normpath(p if os.path.isabs(p) else str(path.parent / p)) for p in images]
    if root is not None:
        for image in row["image"]:
            if not _inside(os.path.abspath(image), root):
                common = os.path.commonpath([os.path.abspath(image), root])
                raise ManifestError(path, f"row {line}: image path {image} lies outside the data root {root}; "
                                          f"set data.root (--data-root) to a folder holding every image, such as "
                                          f"{common}, or data.allow_outside_root=True (--allow-outside-root) if "
                                          "the manifest is trusted")
    row["views"] = _parse_views(raw.get("views"), len(row["image"]), path, line, csv_row)
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


def load_manifest(
    path: str | os.PathLike, *, root: str | os.PathLike | None = None, allow_outside_root: bool = False
) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` or ``.csv`` manifest into rows with absolute image paths (files not checked).

    ``root``: the folder every image must lie in (default the manifest's folder); a row pointing outside
    it is a :class:`ManifestError` unless ``allow_outside_root``.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "manifest not found")
    data_root = None if allow_outside_root else os.path.abspath(root if root is not None else path.parent)
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
                rows.append(_parse_row(raw, path, reader.line_num, csv_row=True, root=data_root))
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
            rows.append(_parse_row(raw, path, line, csv_row=False, root=data_root))
    if not rows:
        raise ManifestError(path, "manifest has no rows")
    return rows


def add_root_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-root`` and ``--allow-outside-root`` for the tools that read a manifest (as ``data.root`` and
    ``data.allow_outside_root`` in a config)."""
    parser.add_argument("--data-root", help="folder every manifest image must lie in (default: the manifest's "
                        "folder); paths outside it are refused")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="read manifest images wherever they are (only for a manifest you trust)")
