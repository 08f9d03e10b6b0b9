"""The scans a trained model runs on: finding them (files, folders, manifest rows) and preprocessing them in
batches with the model's recorded pipeline, for ``mmvl.zero_shot`` and the tools.

Inputs are files or folders, searched recursively. A 2D model takes DICOM, PNG, JPEG and TIFF files; a 3D model
takes NIfTI files and DICOM series (the slices of one SeriesInstanceUID in one folder; sub-folders are searched
too, so no input is lost under a folder of slices). A ``DICOMDIR`` is read for the images and series it lists.
Every file found that the model cannot take gets an ``error`` naming the reason (a NIfTI volume given to a 2D
model, a text file, a lone slice, a corrupt DICOM) instead of stopping the run; hidden files (``.DS_Store``)
are left out.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmvl.data.dicom import is_dicom_file
from mmvl.data.io import RASTER_SUFFIXES
from mmvl.data.manifest import load_manifest, trained_root
from mmvl.data.reports import report_text
from mmvl.data.transforms import LoadVolume, Pipeline
from mmvl.data.volume import NIFTI_SUFFIXES
from mmvl.errors import ConfigError, DataError
from mmvl.registry import TRANSFORMS

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclass
class InputItem:
    """One scan to run: ``path``, and from a manifest row its ``study_id``, extra volume ``fields`` (spacing,
    series_uid...), ``labels``, ``reference`` report, ``view`` (``PA``, ``LATERAL``...) and ``row`` (the manifest
    line: the study of a row without a study id); ``error`` when it cannot be run at all."""

    path: str
    study_id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] | None = None
    reference: str | None = None
    error: str | None = None
    view: str | None = None
    row: int | None = None


def input_kind(path: PathLike) -> str:
    """``"dicom"``, ``"nifti"``, ``"raster"`` (PNG/JPEG/TIFF...), ``"dicomdir"`` (a DICOM media index),
    ``"series"`` (a folder holding DICOM files), ``"folder"`` (any other folder), ``"missing"`` or ``"unknown"``."""
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
    if not _is_dicom(path):
        return "unknown"
    return "dicomdir" if name == "dicomdir" else "dicom"  # PS3.10 8.6: the index file is always named DICOMDIR


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
        return (f"unsupported kind: not a DICOM (no DICM preamble), NIfTI ({', '.join(NIFTI_SUFFIXES)}) or image "
                f"({', '.join(RASTER_SUFFIXES)}) file")
    if volumes and kind in ("raster", "dicom"):
        return (f"a 2D {'DICOM file' if kind == 'dicom' else 'image'}; this is a 3D model: give a NIfTI file or a "
                "folder holding one DICOM series")
    if not volumes and kind in ("nifti", "series"):
        return ("a 3D volume" + (" (NIfTI)" if kind == "nifti" else " (DICOM series folder)")
                + "; this is a 2D model: give DICOM, PNG, JPEG or TIFF images")
    return None


def find_inputs(inputs: Sequence[PathLike], volumes: bool = False) -> list[InputItem]:
    """The scans under ``inputs`` for a 2D (``volumes=False``) or 3D model, in sorted order.

    Folders are searched recursively (hidden files and folders left out). 2D: every DICOM, PNG, JPEG or TIFF
    file is an input. 3D: every NIfTI file is an input, and the DICOM image files directly in one folder are
    one series per SeriesInstanceUID (a folder holding several series gives one input per series, with its
    ``series_uid``), whatever else the folder and its sub-folders hold; a localizer series beside a volume
    ((0008,0008) ImageType LOCALIZER: the scout images a scan was planned on) is logged and left out. A
    ``DICOMDIR`` (CD/PACS export) is read with :class:`pydicom.fileset.FileSet` and the images and series it
    lists are the inputs. Every other file seen is listed with an ``error`` naming why the model cannot take
    it; a folder given that holds nothing to run is listed with an error too.
    """
    items: list[InputItem] = []
    for entry in inputs:
        path = Path(entry)
        kind = input_kind(path)
        if kind == "dicomdir":
            found = _from_dicomdir(path, volumes, claimed=set())
        elif kind in ("folder", "series"):
            found = _walk_folder(path, volumes)
        elif volumes and kind == "dicom":  # one slice given alone: the model needs its whole series folder
            found = [InputItem(path=str(path), error="a single DICOM file; this is a 3D model: give the folder "
                                                     "holding its series (one file per slice) or a NIfTI file")]
        else:
            found = [InputItem(path=str(path), error=_mismatch(kind, volumes))]
        if not found:
            found = [InputItem(path=str(path), error="no scans found in this folder (searched recursively for "
                                                     + ("NIfTI files and DICOM series" if volumes else
                                                        "DICOM, PNG, JPEG and TIFF images") + ")")]
        items += found
    return items


def _walk_folder(root: Path, volumes: bool) -> list[InputItem]:
    items: list[InputItem] = []
    claimed: set[str] = set()  # files a DICOMDIR already listed (as an image or a series slice)
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        here = Path(folder)
        names = sorted(n for n in files if not n.startswith("."))
        for name in names:
            if input_kind(here / name) == "dicomdir":
                items += _from_dicomdir(here / name, volumes, claimed)
        rows: list[tuple[str, InputItem]] = []  # (file name, row): a series sits where its first slice is
        slices: list[Path] = []
        for name in names:
            path = here / name
            kind = input_kind(path)
            if str(path) in claimed or kind == "dicomdir":
                continue
            if volumes and kind == "dicom":
                slices.append(path)
            else:
                rows.append((name, InputItem(path=str(path), error=_mismatch(kind, volumes))))
        if slices:
            rows += _series_in_folder(here, slices)
        items += [item for _name, item in sorted(rows, key=lambda row: row[0])]
    return items


def _series_in_folder(folder: Path, slices: Sequence[Path]) -> list[tuple[str, InputItem]]:
    """``(file name, row)``: one input per SeriesInstanceUID among the DICOM files directly in ``folder``
    (named by its first slice); files that are no image (SR, presentation states), whose header cannot be
    read or that are the only slice of their series get an error row."""
    import pydicom

    series: dict[str, list[Path]] = {}
    localizers: dict[str, list[Path]] = {}
    rows: list[tuple[str, InputItem]] = []
    for path in slices:
        try:
            with warnings.catch_warnings():  # pydicom's warnings quote element values, names included
                warnings.simplefilter("ignore")
                header = pydicom.dcmread(path, stop_before_pixels=True,
                                         specific_tags=["SOPClassUID", "SeriesInstanceUID", "Rows", "ImageType"])
                uid = str(header.get("SeriesInstanceUID", ""))
                image_type = [str(value).upper() for value in (header.get("ImageType") or [])]
        except Exception as err:  # corrupt headers raise a range of errors
            rows.append((path.name, InputItem(path=str(path), error=f"corrupt DICOM header: {type(err).__name__}")))
            continue
        if "Rows" not in header:
            sop = header.get("SOPClassUID")
            rows.append((path.name, InputItem(path=str(path), error="not an image: a DICOM object without pixel "
                                              "rows" + (f" ({getattr(sop, 'name', sop)})" if sop else ""))))
            continue
        if image_type[2:3] == ["LOCALIZER"]:
            localizers.setdefault(uid, []).append(path)
        else:
            series.setdefault(uid, []).append(path)
    for uid, files in localizers.items():
        if series:  # the planning images of the volume beside them (their own geometry), not a volume
            logger.info("%s: localizer series %s (%d images, ImageType LOCALIZER) left out", folder, uid, len(files))
        else:
            rows.append((files[0].name, InputItem(path=str(folder), fields={"series_uid": uid} if uid else {},
                                                  error="a localizer series ((0008,0008) ImageType LOCALIZER), not "
                                                        "a volume")))
    for uid, files in series.items():
        if len(files) == 1:  # a stray image beside other inputs, not a volume of one slice
            rows.append((files[0].name, InputItem(path=str(files[0]), error="a single DICOM slice (the only file of "
                         "its series in this folder); this is a 3D model: give a folder of slices or a NIfTI file")))
        else:
            fields = {"series_uid": uid} if uid and len(series) + len(localizers) > 1 else {}
            rows.append((files[0].name, InputItem(path=str(folder), fields=fields)))
    return rows


def _from_dicomdir(path: Path, volumes: bool, claimed: set[str]) -> list[InputItem]:
    """The images (2D) or series (3D, one per SeriesInstanceUID and folder) a DICOMDIR lists; the files it
    lists are added to ``claimed`` so the folder search does not list them again."""
    from pydicom.fileset import FileSet

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            file_set = FileSet(str(path))
            instances = [(Path(instance.path), instance) for instance in file_set]
    except Exception as err:  # a damaged index raises a range of errors
        return [InputItem(path=str(path), error=f"DICOMDIR cannot be read: {type(err).__name__}: {err}")]
    items: list[InputItem] = []
    series: dict[tuple[str, str], list[Path]] = {}
    for file, instance in instances:
        claimed.add(str(file))
        if not file.is_file():
            items.append(InputItem(path=str(file), error=f"listed in {path} but missing"))
        elif getattr(instance.node, "record_type", "IMAGE") != "IMAGE":
            items.append(InputItem(path=str(file), error=f"not an image: a {instance.node.record_type} record of "
                                                         f"{path}"))
        elif not volumes:
            items.append(InputItem(path=str(file)))
        else:
            uid = str(getattr(instance, "SeriesInstanceUID", "") or "")
            series.setdefault((str(file.parent), uid), []).append(file)
    for (folder, uid), _files in sorted(series.items()):
        items.append(InputItem(path=folder, fields={"series_uid": uid} if uid else {}))
    return items


def row_items(row: Mapping[str, Any], sections: Sequence[str] | None = None) -> list[InputItem]:
    """One item per image of a manifest row (a study's views), each with the study id, view name, volume fields,
    labels and, when ``sections`` is given, the reference report text of those sections."""
    views = row.get("views") or [None] * len(row["image"])
    reference = report_text(row["report"], sections) if sections is not None and row.get("report") else None
    return [InputItem(path=path, study_id=row.get("study_id") or None, view=view, row=row.get("line"),
                      fields={key: row[key] for key in LoadVolume.FIELDS if row.get(key) is not None},
                      labels=row.get("labels") or None, error=row.get("error") or None, reference=reference)
            for path, view in zip(row["image"], views)]


def manifest_items(manifest: PathLike, sections: Sequence[str] | None = None, root: PathLike | None = None,
                   allow_outside_root: bool = False) -> list[InputItem]:
    """Every image of every manifest row (:func:`row_items`); :mod:`mmvl.evaluation.studies` groups them back into
    studies. ``root``/``allow_outside_root``: see :func:`~mmvl.data.manifest.load_manifest`."""
    return [item for row in load_manifest(manifest, root=root, allow_outside_root=allow_outside_root)
            for item in row_items(row, sections)]


def scan_items(loaded: Any, inputs: Sequence[PathLike] | PathLike | None = (), manifest: PathLike | None = None,
               data_root: PathLike | None = None, allow_outside_root: bool = False, limit: int | None = None,
               what: str = "inputs") -> list[InputItem]:
    """The scans a loaded model (:class:`mmvl.loading.LoadedModel`) runs on: files and folders (:func:`find_inputs`,
    volumes for a 3D model) then the rows of ``manifest`` (its images inside ``data_root``, default the model's
    recorded ``data.root``: :func:`~mmvl.data.manifest.trained_root`), the first ``limit``. None found is an
    error naming ``what`` (the caller: ``zero_shot``, ``predict``)."""
    inputs = () if inputs is None else inputs
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise ConfigError(f"{what}: inputs must be a path or a list of paths, got {type(inputs).__name__}")
    items = find_inputs(paths, volumes=loaded.preprocess.kind == "3d")
    if manifest is not None:
        items += manifest_items(manifest, **trained_root(loaded.config, data_root, allow_outside_root,
                                                         source=loaded.source))
    items = items[:limit] if limit else items
    if not items:
        raise ConfigError(f"{what}: no inputs (give files, folders or a manifest)")
    return items


def rows_csv(rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> str:
    """CSV text of result rows (one per scan): floats rounded to 6 decimals, NaN (a scan that failed) as an empty
    cell beside its reason in ``error``; keys outside ``fields`` left out."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if isinstance(value, float) and math.isnan(value) else
                         round(value, 6) if isinstance(value, float) else value for key, value in row.items()})
    return buffer.getvalue()


def rows_frame(rows: list[dict[str, Any]], what: str) -> Any:
    """Result rows as a pandas DataFrame (``as_frame=True`` of ``what``: ``zero_shot``, ``predict``)."""
    try:
        import pandas as pd
    except ImportError as err:
        raise ConfigError(f"{what}(as_frame=True) needs pandas (pip install pandas)") from err
    return pd.DataFrame(rows)


def with_reader_options(preprocess: Pipeline, options: Mapping[str, Any] | None) -> Pipeline:
    """``preprocess`` with its reading step (``LoadImage``/``LoadVolume``, the first of the spec) given
    ``options`` over the recorded ones, e.g. ``{"allow_gaps": True}`` to read a series with missing slices.
    Unknown option names are refused with the reader's own and the closest match."""
    if not options:
        return preprocess
    spec = preprocess.spec
    TRANSFORMS.check({**spec[0], **options}, where="reader_options")  # unknown names refused, closest named
    spec[0] = {**spec[0], **options}
    return Pipeline(spec)


def parse_reader_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["allow_gaps=true", "modalities=[\"CT\"]"]`` (``--reader-option key=value``) as a dict; values are
    read as JSON (``true``, ``1.5``, ``["CT"]``), else kept as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--reader-option '{pair}': expected key=value, e.g. allow_gaps=true")
        try:
            options[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            options[key.strip()] = text
    return options


def add_reader_arguments(parser: argparse.ArgumentParser) -> None:
    """``--allow-gaps`` and ``--reader-option KEY=VALUE`` for the tools that run a model over scans: options of
    the reading step (``LoadImage``/``LoadVolume``) of the model's recorded preprocessing, read by
    :func:`reader_options`."""
    parser.add_argument("--allow-gaps", action="store_true",
                        help="read DICOM series with missing slices, interpolating them (LoadVolume allow_gaps)")
    parser.add_argument("--reader-option", action="append", default=[], metavar="KEY=VALUE",
                        help="override an option of the recorded reader (LoadImage/LoadVolume), value as JSON, "
                             "e.g. --reader-option voi=linear; repeatable")


def reader_options(args: argparse.Namespace) -> dict[str, Any]:
    """The reader overrides given by :func:`add_reader_arguments`' options."""
    options = parse_reader_options(args.reader_option)
    if args.allow_gaps:
        options["allow_gaps"] = True
    return options


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
            row = {"path": item.path, "study_id": item.study_id or "", "view": item.view or "",
                   "error": item.error or ""}
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
