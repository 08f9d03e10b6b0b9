"""Manifests: one row per study, ``{"image": path or [paths], "report": str, "labels": {...}?, "split": ...}``.

JSONL or CSV. Paths are relative to the manifest's folder unless absolute. In CSV, several images are
separated by ``;`` and ``labels`` is a JSON object string. 3D rows point at a NIfTI file or a DICOM series
folder and may add ``series_uid``, ``spacing`` and ``rescale`` (see ``datasets/README.md``).

Image paths must lie inside the data root: the manifest's folder, or ``root`` (config ``data.root``). A path
that escapes it (``../``, or an absolute path elsewhere) is refused unless ``allow_outside_root=True``
(``data.allow_outside_root``), so a manifest from elsewhere cannot make mmvl read arbitrary files. The check
is on the path text after normalisation; symbolic links inside the root are followed as they are. The refusal
names every escaping row and suggests a root (:func:`suggest_root`: the images' common folder, never ``/``, a
system folder or the home folder). Tools and functions that run a trained model take its training ``data.root``
by default (:func:`trained_root`, :func:`root_options` for command-line options).

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
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mmvl.data.masks import row_mask_paths
from mmvl.errors import ConfigError, DataError, ManifestError

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


# Folders no data root should be: a root there would let a manifest read the system's or everyone's files. Their
# sub-folders (/home/me/data, /tmp/run1, /mnt/nas/mimic) are fine.
SYSTEM_FOLDERS = ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
                  "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/tmp",
                  "/private", "/private/etc", "/private/tmp", "/private/var", "/Users", "/Volumes", "/System",
                  "/Library", "/Applications")
SHOWN_ROWS = 10  # escaping rows named in an error message; tools/check_data.py lists them all


def too_wide_for_root(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is the filesystem (or a drive's) root, a system folder (``SYSTEM_FOLDERS``, the temp
    folder itself) or the user's home folder: never a data root to suggest or inherit."""
    folder = os.path.normpath(os.path.abspath(folder))
    if os.path.dirname(folder) == folder:  # "/" or "C:\\"
        return True
    wide = {os.path.normpath(p) for p in (*SYSTEM_FOLDERS, tempfile.gettempdir(), os.path.expanduser("~"))}
    return folder in wide or os.path.realpath(folder) in {os.path.realpath(p) for p in wide}


def suggest_root(images: Iterable[str | os.PathLike]) -> str | None:
    """The narrowest data root holding every one of ``images``: their common folder, or None when that would be
    too wide to be safe (:func:`too_wide_for_root`) or there are no images."""
    folders = {os.path.dirname(os.path.normpath(os.path.abspath(image))) for image in images}
    if not folders:
        return None
    try:
        common = os.path.commonpath(sorted(folders))
    except ValueError:  # paths on different drives
        return None
    return None if too_wide_for_root(common) else common


def outside_root_advice(rows: list[dict[str, Any]]) -> str:
    """How to fix rows that escape the data root: a root holding every image (and escaping mask) of ``rows``, or
    why none is suggested, and the trusted-manifest switch."""
    images = [image for row in rows for image in row["image"]]
    images += [path for row in rows for path in row.get("outside_root", ()) if path not in row["image"]]  # masks
    suggested = suggest_root(images)
    if suggested is not None:
        where = f"set data.root (--data-root) to a folder holding every image, such as {suggested} (their " \
                "common folder)"
    else:
        folders = {os.path.dirname(os.path.abspath(image)) for image in images}
        common = os.path.commonpath(sorted(folders)) if len({os.path.splitdrive(f)[0] for f in folders}) == 1 else ""
        where = (f"no safe data root can be suggested: the images' common folder is {common or 'none'}, which "
                 "would let the manifest read system or home files; fix or remove the rows that escape, or move "
                 "the images under one data folder and set data.root (--data-root) to it")
    return f"{where}, or set data.allow_outside_root=True (--allow-outside-root) if the manifest is trusted"


def outside_root_lines(rows: list[dict[str, Any]], limit: int | None = None) -> list[str]:
    """``row N: path`` for every image of ``rows`` outside the data root (the first ``limit`` rows)."""
    escaping = [row for row in rows if row.get("outside_root")]
    return [f"row {row['line']}: {image}" for row in escaping[:limit] for image in row["outside_root"]]


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


def _mask_files(row: dict[str, Any], manifest_dir: Path) -> list[str]:
    """The mask files a row's ``masks`` names for each of its images, resolved as the datasets resolve them
    (:func:`mmvl.data.masks.row_mask_paths`); the data root holds them as it holds the images."""
    masks = row.get("masks")
    if not isinstance(masks, dict):
        return []  # not a mapping: refused with the row's line when the masks are read
    try:
        return [mask for view in range(len(row["image"]))
                for mask in row_mask_paths(row, list(masks), manifest_dir, view) if mask]
    except DataError:
        return []  # malformed (a list of the wrong length...): refused with the row's line before any is read


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
    if root is not None:  # refused by load_manifest once every row is read, so that all of them are named
        outside = [image for image in row["image"] if not _inside(os.path.abspath(image), root)]
        outside += [mask for mask in _mask_files(row, path.parent) if not _inside(os.path.abspath(mask), root)]
        if outside:
            row["outside_root"] = outside
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
    path: str | os.PathLike, *, root: str | os.PathLike | None = None, allow_outside_root: bool = False,
    keep_outside_root: bool = False,
) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` or ``.csv`` manifest into rows with absolute image paths (files not checked).

    ``root``: the folder every image must lie in (default the manifest's folder); rows pointing outside it are
    a :class:`ManifestError` naming them all unless ``allow_outside_root``. ``keep_outside_root`` returns them
    instead, with their escaping paths in ``outside_root`` (for ``tools/check_data.py``, which lists them and
    reads none of them).
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
    escaping = [row for row in rows if row.get("outside_root")]
    if escaping and not keep_outside_root:
        lines = outside_root_lines(escaping, SHOWN_ROWS)
        more = f"; and {len(escaping) - SHOWN_ROWS} more rows" if len(escaping) > SHOWN_ROWS else ""
        raise ManifestError(path, f"{len(escaping)} row{'s' if len(escaping) > 1 else ''} with image (or mask) "
                                  f"paths outside the data root {data_root} ({'; '.join(lines)}{more}; "
                                  f"tools/check_data.py lists them all); {outside_root_advice(rows)}")
    return rows


def add_root_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-root`` and ``--allow-outside-root`` for the tools that read a manifest (as ``data.root`` and
    ``data.allow_outside_root`` in a config)."""
    parser.add_argument("--data-root", help="folder every manifest image must lie in (default: data.root of "
                        "the config or model, else the manifest's folder); paths outside it are refused")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="read manifest images wherever they are (only for a manifest you trust)")


def root_options(args: argparse.Namespace, config: Mapping[str, Any] | None = None,
                 source: str = "the model") -> dict[str, Any]:
    """:func:`trained_root` for a tool's ``--data-root`` / ``--allow-outside-root`` (:func:`add_root_arguments`)."""
    return trained_root(config, args.data_root, args.allow_outside_root, source=source)


def trained_root(config: Mapping[str, Any] | None, data_root: str | os.PathLike | None = None,
                 allow_outside_root: bool = False, source: str = "the model") -> dict[str, Any]:
    """``root`` and ``allow_outside_root`` for :func:`load_manifest` when a manifest is read with a trained model:
    ``data_root`` / ``allow_outside_root`` when given, else the ``data.root`` recorded with the model (``config``:
    a work dir's training config, or a zoo entry's ``config.json``; a root of None, or none recorded, means the
    manifest's folder). ``data.allow_outside_root`` is not inherited: a model does not vouch for the manifest it
    is run on. A recorded root that is too wide (:func:`too_wide_for_root`, e.g. ``/``) is refused rather than
    used; ``source`` names the model in that message."""
    if allow_outside_root:
        return {"root": None if data_root is None else os.fspath(data_root), "allow_outside_root": True}
    if data_root is not None:
        return {"root": os.fspath(data_root), "allow_outside_root": False}
    root = ((config or {}).get("data") or {}).get("root")
    if root is not None and too_wide_for_root(root):
        raise ConfigError(f"{source}: its recorded data.root {root} would let a manifest read system or home files; "
                          "pass --data-root FOLDER (the folder holding the manifest's images)")
    return {"root": None if root is None else os.fspath(root), "allow_outside_root": False}
