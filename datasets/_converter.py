"""What the converter scripts in ``datasets/`` share: CSV reading, hashed splits, the manifest writer, the summary.

Not a converter itself: ``chexpert.py``, ``ct_rate.py`` and ``dicom_folder.py`` import it from beside them.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

try:
    import mmvl  # noqa: F401
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmvl.data.deid import (
    DEFAULT_OPTIONS,
    OPTIONS,
    BurnedInAnnotationError,
    Deidentifier,
    burned_in_file_reason,
    check_options,
)
from mmvl.data.manifest import too_wide_for_root
from mmvl.errors import DataError, MMVLError

# ``--deidentify`` (pseudonyms, keyed UIDs and date shifts, PS3.15 Annex E copies of DICOMs) is mmvl.data.deid's
# Deidentifier; the converters import it from here.
REPORT_NAME = "deidentification_report.json"

SPLIT_NAMES = ("train", "val", "test")


def read_csv(path: str | os.PathLike, required: Sequence[str], hint: str = "") -> Iterator[dict[str, str]]:
    """Rows of a CSV (or gzip CSV) as dicts with ``""`` for missing cells; the ``required`` columns must exist.

    ``hint`` ends the "not found" message (where to get the file). A UTF-8 byte order mark, as Excel writes
    it, is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"CSV file not found{'; ' + hint if hint else ''}")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [name for name in required if name not in columns]
            if missing:
                raise DataError(path, f"missing column(s) {missing}; found {columns}. Is this the right CSV?")
            for row in reader:
                yield {name: row.get(name) or "" for name in columns}
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:  # truncated gzip, binary file
        raise DataError(path, f"cannot read CSV: {err}") from err


def parse_label(
    text: str, path: str | os.PathLike, line: int, column: str, allowed: Sequence[float] = (1.0, 0.0)
) -> float | None:
    """A label cell as a number from ``allowed``, or None when blank; anything else is a DataError."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in allowed:
        expected = ", ".join(f"{number:g}" for number in allowed)
        raise DataError(path, f"line {line}, {column!r}: {text!r} is not one of {expected} or empty")
    return value


def hashed_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (SHA-256), so a key's split never depends on row order."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def hashed_split(key: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """``"test"`` for about ``test_fraction`` of keys, ``"val"`` for about ``val_fraction``, else ``"train"``."""
    value = hashed_fraction(key)
    if value < test_fraction:
        return "test"
    return "val" if value < test_fraction + val_fraction else "train"


def check_fractions(val_fraction: float, test_fraction: float = 0.0) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise MMVLError(f"{name}={value}: must be at least 0 and below 1")
    if val_fraction + test_fraction >= 1.0:
        raise MMVLError(f"val_fraction + test_fraction = {val_fraction + test_fraction}: leave some for train")


def manifest_path(out: str | os.PathLike) -> Path:
    """``out`` itself when it names a ``.jsonl`` file, else ``out/manifest.jsonl``."""
    out = Path(out)
    return out if out.suffix == ".jsonl" else out / "manifest.jsonl"


class ManifestWriter:
    """Writes a manifest and ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` beside it, one JSON row a line.

    Use it as a context manager: rows go to ``.tmp`` files that replace the targets when the block ends
    normally and are removed when it raises, so only a finished conversion replaces an earlier manifest.
    """

    def __init__(self, out: str | os.PathLike):
        self.path = manifest_path(out)
        self.folder = Path(os.path.abspath(self.path.parent))
        self.split_paths = {name: self.folder / f"{name}.jsonl" for name in SPLIT_NAMES}
        if Path(os.path.abspath(self.path)) in self.split_paths.values():
            raise MMVLError(f"out={out}: the per-split files take that name; call the manifest manifest.jsonl")
        self.rows_per_split = Counter(dict.fromkeys(SPLIT_NAMES, 0))
        self.studies: set[str] = set()
        self.image_root: str | None = None  # the deepest folder holding every image written
        self._handles: dict[Path, TextIO] = {}

    def __enter__(self) -> ManifestWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        for target in (self.path, *self.split_paths.values()):
            self._handles[target] = open(f"{target}.tmp", "w", encoding="utf-8")
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        for target, handle in self._handles.items():
            handle.close()
            if exc_type is None:
                os.replace(f"{target}.tmp", target)
            else:
                os.remove(f"{target}.tmp")

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` relative to the manifest's folder, with forward slashes."""
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        self.image_root = parent if self.image_root is None else os.path.commonpath([self.image_root, parent])
        return Path(os.path.relpath(path, self.folder)).as_posix()

    @property
    def data_root(self) -> str | None:
        """The ``data.root`` training needs when images lie outside the manifest's folder (mmvl refuses manifest
        paths outside their root): the images' common folder, never wider (see :func:`data_root`)."""
        return data_root(self.image_root, self.folder)["data_root"]

    @property
    def rows(self) -> int:
        return sum(self.rows_per_split.values())

    def write(self, row: Mapping) -> None:
        """Append ``row`` (which has ``split`` and ``study_id``) to the manifest and to its split's file."""
        line = json.dumps(row, ensure_ascii=False) + "\n"
        self._handles[self.path].write(line)
        self._handles[self.split_paths[row["split"]]].write(line)
        self.rows_per_split[row["split"]] += 1
        self.studies.add(row["study_id"])

    def require_rows(self, source: str | os.PathLike, skipped: Mapping[str, int]) -> None:
        """Raise (so that nothing is written) when every candidate was skipped: an empty manifest is a mistake."""
        if not self.rows:
            reasons = ", ".join(f"{reason} {number}" for reason, number in skipped.items() if number) or "none"
            raise DataError(source, f"no rows to write (skipped: {reasons}); check the paths and options")

    def counts(self, skipped: Mapping[str, int], **extra) -> dict:
        """``{"rows", "studies", "splits": {split: rows}, "skipped": {reason: n}, **extra, "manifest"}``."""
        return {
            "rows": self.rows,
            "studies": len(self.studies),
            "splits": dict(self.rows_per_split),
            "skipped": dict(skipped),
            **extra,
            "manifest": str(self.path),
            **data_root(self.image_root, self.folder),
        }


def data_root(image_folder: str | None, out_dir: str | os.PathLike) -> dict[str, str | None]:
    """``{"data_root": ...}``: the ``data.root`` training needs, the common folder of the images written
    (``image_folder``) when it lies outside the manifest's folder, else None. Never a folder wider than that, nor
    ``/``, a system folder or the home folder (:func:`mmvl.data.manifest.too_wide_for_root`): then it is None and
    ``data_root_problem`` says why."""
    out_dir = str(out_dir)
    if image_folder is None or os.path.commonpath([image_folder, out_dir]) == out_dir:
        return {"data_root": None}
    if too_wide_for_root(image_folder):
        return {"data_root": None, "data_root_problem": (
            f"images lie outside the manifest's folder and their common folder, {image_folder}, is too wide for a "
            "safe data.root (it would let training read system or home files): keep the images in one data folder "
            "and convert again, or train with data.allow_outside_root=True if you trust this manifest")}
    return {"data_root": image_folder}


def _extension(name: str) -> str:
    """``".nii.gz"`` for a gzipped NIfTI, else the last suffix (``".jpg"``, ``".dcm"``; ``""`` for none)."""
    return ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix


def deidentified_copy(
    deidentifier: Deidentifier, source: Path, original: str, study_id: str, folder: Path, dicom: bool = False
) -> Path | None:
    """The file a ``--deidentify`` row points at: ``folder/deidentified/<study_id>/<pseudonym of original><ext>``.

    ``original`` is the source's path as the dataset names it (it carries the ids). A DICOM is rewritten to
    PS3.15 Annex E by ``Deidentifier.copy_dicom`` (None when refused for burnt-in text: the de-identification
    report lists it by its pseudonymous path); any other file is hard-linked (copied where the file system
    cannot link), replacing what a previous run left there. The MIMIC-CXR, CheXpert and CT-RATE converters use it.
    """
    target = folder / "deidentified" / study_id / (deidentifier.pseudonym(original, "") + _extension(source.name))
    if dicom:
        return copy_dicom_or_none(deidentifier, source, target, study_id, folder)
    if target.exists() and os.path.samefile(source, target):
        return target  # linked by an earlier run
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, partial)
    os.replace(partial, target)
    return target


def copy_dicom_or_none(deidentifier: Deidentifier, source: Path, target: Path, study_id: str,
                       folder: Path) -> Path | None:
    """``deidentifier.copy_dicom`` into ``target``; None when the image is refused for burnt-in text, which the
    report lists by ``target``'s pseudonymous path below ``folder``."""
    label = Path(os.path.relpath(target, folder)).as_posix()
    try:
        return deidentifier.copy_dicom(source, target, study_id, label=label)
    except BurnedInAnnotationError:
        target.unlink(missing_ok=True)  # a copy an earlier run (allowing burnt-in images) left
        return None


def refused_series(deidentifier: Deidentifier, paths: Iterable[Path], series: Path, folder: Path) -> bool:
    """True (and the series listed in the report by its pseudonymous folder) when any file of a series may show
    text in its pixels and burnt-in images are not allowed: checked before copying, so no slice of it is."""
    reasons = sorted({burned_in_file_reason(path) for path in paths} - {None})
    if not reasons or deidentifier.allow_burned_in:
        return False
    deidentifier.report.refuse(reasons[0], Path(os.path.relpath(series, folder)).as_posix() + "/")
    shutil.rmtree(series, ignore_errors=True)  # what an earlier run allowing burnt-in images left
    return True


def deid_options(text: str) -> list[str]:
    """``--deid-options``: a comma list of ``mmvl.data.deid.OPTIONS``, or ``none`` for the Basic Profile alone."""
    try:
        return list(check_options([] if text.strip().lower() == "none" else comma_list(text)))
    except MMVLError as err:  # argparse: usage error, exit code 2
        raise argparse.ArgumentTypeError(str(err)) from None


def add_dicom_deid_arguments(parser: argparse.ArgumentParser) -> None:
    """``--deid-options`` and ``--allow-burned-in``, for converters whose ``--deidentify`` rewrites DICOMs."""
    parser.add_argument("--deid-options", type=deid_options, default=list(DEFAULT_OPTIONS),
                        help="with --deidentify: PS3.15 options on top of the Basic Profile, comma-separated, or "
                        f"'none' ({', '.join(OPTIONS)}; default {','.join(DEFAULT_OPTIONS)})")
    parser.add_argument("--allow-burned-in", action="store_true",
                        help="with --deidentify: copy images that may show text in their pixels (BurnedInAnnotation "
                        "YES, secondary captures) too, checked by eye first; by default they are refused and listed")


def write_deid_report(deidentifier: Deidentifier | None, folder: Path) -> dict:
    """``{"deidentification": report, "deidentification_report": path}`` after DICOMs were de-identified (the
    report, written to ``folder``, holds counts and pseudonymous paths only), else ``{}``."""
    if deidentifier is None or not (deidentifier.report.files or deidentifier.report.refused):
        return {}
    path = Path(folder) / REPORT_NAME
    deidentifier.report.write(path)
    return {"deidentification": deidentifier.report.to_dict(), "deidentification_report": str(path)}


def deid_summary(counts: Mapping) -> str:
    """The summary's de-identification line ("" when no DICOM was de-identified)."""
    report = counts.get("deidentification")
    if not report:
        return ""
    refused = sum(len(labels) for labels in report["refused"].values())
    return (f"  de-identified {sum(report['files'].values())} DICOM files ({'; '.join(report['profile'])}); "
            f"refused {refused} that may show text in their pixels (--allow-burned-in copies them); report: "
            f"{counts['deidentification_report']}")


def progress_bar(items: Iterable, enabled: bool, **tqdm_options) -> tqdm:
    """A tqdm bar over ``items``, silent when ``enabled`` is false or MMVL_NO_PROGRESS=1 (as in the tests)."""
    quiet = not enabled or os.environ.get("MMVL_NO_PROGRESS") == "1"
    return tqdm(items, disable=quiet, **tqdm_options)


def format_summary(counts: Mapping, unit: str) -> str:
    """The counts returned by a converter as a few readable lines; ``unit`` names a row ("images")."""
    splits = ", ".join(f"{name} {number}" for name, number in counts["splits"].items())
    skipped = ", ".join(f"{reason} {number}" for reason, number in counts["skipped"].items()) or "none"
    text = (
        f"wrote {counts['rows']} {unit} from {counts['studies']} studies to {counts['manifest']}\n"
        f"  per split: {splits}\n"
        f"  skipped {unit}: {skipped}"
    )
    if counts.get("data_root"):
        text += ("\n  images lie outside the manifest's folder: train with --cfg-options "
                 f"data.root={counts['data_root']} (mmvl reads manifest images only inside their data root)")
    if counts.get("data_root_problem"):
        text += f"\n  {counts['data_root_problem']}"
    return text


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_common_arguments(parser: argparse.ArgumentParser, section_names: Sequence[str] = ()) -> None:
    """``--out``, ``--sections`` and ``--no-progress``, which every converter takes."""
    parser.add_argument("--out", required=True, help="output folder, or the manifest's .jsonl path")
    choices = f", from {','.join(section_names)}" if section_names else ""
    parser.add_argument(
        "--sections",
        type=comma_list,
        default=["findings", "impression"],
        help=f"report sections used as text, in order{choices} (default findings,impression)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(convert: Callable[..., dict], options: Mapping) -> dict:
    """``convert(**options)``, parsed arguments named as its parameters; an MMVLError exits with its message."""
    options = dict(options)
    options["progress"] = not options.pop("no_progress")
    try:
        return convert(**options)
    except MMVLError as err:
        sys.exit(f"error: {err}")
