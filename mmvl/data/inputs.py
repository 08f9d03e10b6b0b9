"""The scans a trained model runs on: finding them (files, folders, manifest rows) and preprocessing them in
batches with the model's recorded pipeline, for ``mmvl.zero_shot`` and the tools.

Inputs are files or folders. A 2D model takes DICOM, PNG and JPEG files, searched recursively in folders; a 3D
model takes NIfTI files and DICOM series folders (a folder whose files are DICOM slices is one volume). Every
file found that the model cannot take gets an ``error`` naming the reason (a NIfTI volume given to a 2D model,
a text file, a corrupt DICOM) instead of stopping the run; hidden files (``.DS_Store``) are left out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmvl.data.dicom import is_dicom_file
from mmvl.data.io import RASTER_SUFFIXES
from mmvl.data.manifest import load_manifest
from mmvl.data.reports import report_text
from mmvl.data.transforms import LoadVolume
from mmvl.data.volume import NIFTI_SUFFIXES
from mmvl.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclass
class InputItem:
    """One scan to run: ``path``, and from a manifest row its ``study_id``, extra volume ``fields`` (spacing,
    series_uid...), ``labels`` and ``reference`` report; ``error`` when it cannot be run at all."""

    path: str
    study_id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] | None = None
    reference: str | None = None
    error: str | None = None


def input_kind(path: PathLike) -> str:
    """``"dicom"``, ``"nifti"``, ``"raster"`` (PNG/JPEG/...), ``"series"`` (a folder of DICOM files),
    ``"folder"`` (any other folder), ``"missing"`` or ``"unknown"``."""
    path = Path(path)
    if path.is_dir():
        return "series" if any(_is_dicom(child) for child in _visible_files(path)) else "folder"
    if not path.exists():
        return "missing"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(RASTER_SUFFIXES):
        return "raster"
    return "dicom" if _is_dicom(path) else "unknown"


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _is_dicom(path: Path) -> bool:
    try:
        return is_dicom_file(path)
    except OSError:
        return False


def _mismatch(kind: str, volumes: bool) -> str | None:
    """Why a model of this input kind cannot take an input of ``kind``, or None when it can."""
    if kind == "missing":
        return "no such file or folder"
    if kind == "unknown":
        return (f"not a DICOM (no DICM preamble), NIfTI ({', '.join(NIFTI_SUFFIXES)}) or image "
                f"({', '.join(RASTER_SUFFIXES)}) file")
    if volumes and kind in ("raster", "dicom"):
        return (f"a 2D {'DICOM file' if kind == 'dicom' else 'image'}; this is a 3D model: give a NIfTI file or a "
                "folder holding one DICOM series")
    if not volumes and kind in ("nifti", "series"):
        return ("a 3D volume" + (" (NIfTI)" if kind == "nifti" else " (DICOM series folder)")
                + "; this is a 2D model: give DICOM, PNG or JPEG images")
    return None


def find_inputs(inputs: Sequence[PathLike], volumes: bool = False) -> list[InputItem]:
    """The scans under ``inputs`` for a 2D (``volumes=False``) or 3D model, in sorted order.

    2D: files as given; folders searched recursively, every visible file listed. 3D: NIfTI files and DICOM
    series folders as given; other folders searched recursively for NIfTI files and for folders of DICOM
    slices, other files listed. Inputs the model cannot take carry an ``error``.
    """
    items: list[InputItem] = []

    def add(path: Path, kind: str) -> None:
        items.append(InputItem(path=str(path), error=_mismatch(kind, volumes)))

    for entry in inputs:
        path = Path(entry)
        kind = input_kind(path)
        if kind not in ("folder", "series") or (volumes and kind == "series"):
            add(path, kind)
            continue
        if volumes:  # a folder of folders (or of NIfTI files): each DICOM folder is one series
            for folder, subdirs, files in os.walk(path):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                here = Path(folder)
                if here != path and input_kind(here) == "series":
                    add(here, "series")
                    subdirs[:] = []  # slices of this series, not more inputs
                    continue
                for name in sorted(n for n in files if not n.startswith(".")):
                    add(here / name, input_kind(here / name))
        else:
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if not any(part.startswith(".") for part in file.relative_to(path).parts):
                    add(file, input_kind(file))
    return items


def manifest_items(manifest: PathLike, sections: Sequence[str] | None = None, root: PathLike | None = None,
                   allow_outside_root: bool = False) -> list[InputItem]:
    """One item per manifest row (its first image), with study id, volume fields, labels and, when ``sections``
    is given, the reference report text of those sections. ``root``/``allow_outside_root``: see
    :func:`~mmvl.data.manifest.load_manifest`."""
    items = []
    for row in load_manifest(manifest, root=root, allow_outside_root=allow_outside_root):
        item = InputItem(path=row["image"][0], study_id=row.get("study_id") or None,
                         fields={key: row[key] for key in LoadVolume.FIELDS if row.get(key) is not None},
                         labels=row.get("labels") or None, error=row.get("error") or None)
        if sections is not None and row.get("report"):
            item.reference = report_text(row["report"], sections)
        items.append(item)
    return items


@dataclass
class Batch:
    """Rows of one batch (a dict per item, with ``path``, ``study_id``, ``error``), and the image tensor of the
    rows that loaded (``rows[i]`` for ``i`` in ``loaded``)."""

    rows: list[dict[str, Any]]
    loaded: list[int]
    images: torch.Tensor | None


def iter_batches(preprocess: Any, items: Sequence[InputItem], batch_size: int = 32, device: Any = "cpu",
                 progress: bool = True, desc: str = "scans") -> Iterator[Batch]:
    """Preprocess ``items`` with the model's pipeline, ``batch_size`` at a time; unreadable ones get an error
    (``DataError.problem``: the reason, the path is in the row) and the rest go on."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    disable = not progress or os.environ.get("MMVL_NO_PROGRESS") == "1"
    bar = tqdm(total=len(items), desc=desc, unit="scan", disable=disable)
    for start in range(0, len(items), batch_size):
        rows, loaded, images = [], [], []
        for item in items[start:start + batch_size]:
            row = {"path": item.path, "study_id": item.study_id or "", "error": item.error or ""}
            if not row["error"]:
                try:
                    images.append(torch.from_numpy(preprocess(item.path, **item.fields)["image"]))
                    loaded.append(len(rows))
                except DataError as err:
                    row["error"] = err.problem
            if row["error"]:
                logger.warning("%s: %s", item.path, row["error"])
            rows.append(row)
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:  # a pipeline without a fixed output size: run the odd ones alone
            raise DataError(None, f"preprocessed images differ in shape within a batch ({sorted(shapes)}); the "
                                  "model's eval pipeline must end at a fixed size (ResizePad / CropOrPad)")
        bar.update(len(rows))
        yield Batch(rows=rows, loaded=loaded, images=torch.stack(images).to(device) if images else None)
    bar.close()
