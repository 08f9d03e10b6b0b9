"""Import a hospital export: a folder tree of DICOM files plus a CSV of reports, joined into an mmvl manifest.

``--kind 2d`` writes one row per study (CSV key: its image files as a list, with their (0018,5101) ViewPosition),
``--kind 3d`` one row per series (its folder). Only the CSV key, the report, its labels and split, file paths and
view positions are written: no DICOM header value identifies anyone in the output. See ``datasets/dicom_folder.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

HERE = Path(__file__).resolve().parent
try:
    from mmvl.data.reports import report_text
    from mmvl.errors import DataError, MMVLError
except ImportError:  # run as `python datasets/dicom_folder.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(HERE.parent))
    from mmvl.data.reports import report_text
    from mmvl.errors import DataError, MMVLError
if str(HERE) not in sys.path:  # imported by path (as the tests do): find _converter.py beside this script
    sys.path.insert(0, str(HERE))
from _converter import (  # noqa: E402
    DEFAULT_OPTIONS,
    SPLIT_NAMES,
    Deidentifier,
    ManifestWriter,
    add_common_arguments,
    add_dicom_deid_arguments,
    check_fractions,
    check_options,
    comma_list,
    copy_dicom_or_none,
    deid_summary,
    format_summary,
    hashed_split,
    parse_label,
    progress_bar,
    read_csv,
    refused_series,
    run_cli,
    write_deid_report,
)
from mimic_cxr import study_summary  # noqa: E402

MATCHES = ("folder", "study_uid", "filename")
KINDS = ("2d", "3d")
# The only header attributes read; with specific_tags pydicom does not even keep the others (names, ids).
HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "NumberOfFrames", "ViewPosition"]
SPLIT_ALIASES = {
    **{name: name for name in SPLIT_NAMES},
    "training": "train",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "testing": "test",
}
FILE_SKIP_REASONS = {  # per file
    "2d": ("not_dicom", "unreadable", "no_pixel_data"),
    "3d": ("not_dicom", "unreadable", "no_pixel_data", "no_series_uid"),
}
SKIP_REASONS = {  # per image file (2d) or per series (3d)
    "2d": ("unmatched", "empty_report"),
    "3d": ("series_across_folders", "too_few_slices", "unmatched", "empty_report"),
}
DICOM_SUFFIXES = (".dcm", ".dicom")
UNREADABLE_EXAMPLES = 5  # unreadable files the summary names


@dataclass
class Report:
    text: str
    split: str | None
    labels: dict[str, int] | None
    masks: dict[str, Path] | None = None  # label -> mask file (PNG/TIFF for 2d, NIfTI for 3d); blank cells absent


@dataclass
class DicomFile:
    path: Path
    top_folder: str | None  # first folder below ROOT, None for a file directly in ROOT
    study_uid: str | None
    series_uid: str | None
    frames: int
    is_image: bool  # has the Image Pixel module, (0028,0010) Rows and (0028,0011) Columns
    view: str | None = None  # (0018,5101) ViewPosition: PA, AP, LATERAL, LL...; None when absent or blank


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then ``DICM``, whatever its name."""
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def read_header(path: Path, root: Path) -> DicomFile:
    """The few header values the join needs; raises whatever pydicom raises on a malformed header."""
    with warnings.catch_warnings():  # pydicom warns with element values quoted: keep them off the console
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        parts = path.relative_to(root).parts
        return DicomFile(
            path=path,
            top_folder=parts[0] if len(parts) > 1 else None,
            study_uid=str(ds.get("StudyInstanceUID", "")).strip() or None,
            series_uid=str(ds.get("SeriesInstanceUID", "")).strip() or None,
            frames=int(ds.get("NumberOfFrames") or 1),
            is_image="Rows" in ds and "Columns" in ds,
            view=str(ds.get("ViewPosition", "")).strip().upper() or None,
        )


def read_reports(
    path: str | os.PathLike,
    key_column: str,
    report_column: str,
    sections: Sequence[str],
    split_column: str | None,
    label_columns: Sequence[str],
    mask_columns: dict[str, str] | None = None,
) -> dict[str, Report]:
    """CSV key -> its report text (``report_text``), split (from ``split_column``), labels and mask files
    (``mask_columns``: label -> the column holding its mask's path, absolute or relative to the CSV's folder; a
    named file that does not exist is an error naming the line)."""
    mask_columns = mask_columns or {}
    required = [key_column, report_column, *([split_column] if split_column else []), *label_columns,
                *mask_columns.values()]
    reports: dict[str, Report] = {}
    first_line: dict[str, int] = {}
    for line, row in enumerate(read_csv(path, required), start=2):
        key = row[key_column].strip()
        if not key:
            raise DataError(path, f"line {line}: empty {key_column!r}; every report needs its key")
        if key in first_line:
            raise DataError(
                path, f"line {line}: {key_column} {key!r} is already on line {first_line[key]}; keys are unique"
            )
        first_line[key] = line
        split = None
        if split_column:
            split = SPLIT_ALIASES.get(row[split_column].strip().lower())
            if split is None:
                raise DataError(path, f"line {line}, {split_column!r}: {row[split_column]!r} is not train, val or test")
        labels = None
        if label_columns:
            values = {name: parse_label(row[name], path, line, name) for name in label_columns}
            labels = {name.lower(): int(value) for name, value in values.items() if value is not None}
        masks = {}
        for label, column in mask_columns.items():
            value = row[column].strip()
            if value:
                mask = Path(value) if os.path.isabs(value) else Path(path).parent / value
                if not mask.is_file():
                    raise DataError(path, f"line {line}, {column!r}: mask file {value!r} not found")
                masks[label.lower()] = mask
        reports[key] = Report(report_text(row[report_column], sections), split, labels, masks or None)
    return reports


def file_key(dicom: DicomFile, match: str) -> str | None:
    """The CSV key a file belongs to under ``match``; never a patient-identifying header value."""
    if match == "folder":
        return dicom.top_folder
    if match == "study_uid":
        return dicom.study_uid
    name = dicom.path.name  # "filename": the name without a .dcm/.dicom suffix (UID-named files keep their dots)
    return name[: -len(dicom.path.suffix)] if dicom.path.suffix.lower() in DICOM_SUFFIXES else name


def scan_tree(root: Path, skipped: Counter, progress: bool) -> tuple[list[DicomFile], list[str]]:
    """Every readable DICOM file below ``root`` (sorted) and a few unreadable examples; counts the others."""
    paths = sorted(Path(folder, name) for folder, _dirs, names in os.walk(root) for name in names)
    files: list[DicomFile] = []
    unreadable: list[str] = []
    for path in progress_bar(paths, progress, desc="DICOM headers", unit="file"):
        try:
            if not is_dicom(path):
                skipped["not_dicom"] += 1
                continue
            files.append(read_header(path, root))
        except Exception as err:  # pydicom raises many types (ValueError, NotImplementedError, ...) on bad headers
            skipped["unreadable"] += 1
            if len(unreadable) < UNREADABLE_EXAMPLES:  # the type only: a message may quote header values
                unreadable.append(f"{path.relative_to(root).as_posix()} ({type(err).__name__})")
    return files, unreadable


def convert(
    root: str | os.PathLike,
    reports: str | os.PathLike,
    out: str | os.PathLike,
    key_column: str = "study_id",
    report_column: str = "report",
    match: str = "folder",
    kind: str = "2d",
    split_column: str | None = None,
    label_columns: Sequence[str] = (),
    mask_columns: dict[str, str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_slices: int = 16,
    sections: Sequence[str] = ("findings", "impression"),
    progress: bool = True,
    deidentify: bool = False,
    pseudonym_key: str | os.PathLike | None = None,
    deid_options: Sequence[str] = DEFAULT_OPTIONS,
    allow_burned_in: bool = False,
) -> dict:
    """Write the manifest (``out``: a ``.jsonl`` path or a folder) and ``train/val/test.jsonl``; return counts.

    Files join report rows by ``match``: ``folder`` (the first folder below ``root`` is the key),
    ``study_uid`` (StudyInstanceUID is the key) or ``filename`` (the name without .dcm is the key; 2d only).
    Splits come from ``split_column``, else from a hash of the key. ``2d``: one row per key (a study), ``image``
    listing its files (sorted by path) and, where any has one, ``views`` their ViewPosition (None where absent).
    ``3d``: one row per series, so a key with several series has several rows with one ``study_id``. Returns
    ``{"rows", "studies", "images": files (2d) or series (3d), "splits", "skipped": {reason: files (2d) or series
    (3d)}, "skipped_files": {reason: files}, "unreadable_examples", "unused_reports", "manifest"}``; see
    ``SKIP_REASONS`` and ``FILE_SKIP_REASONS``.

    ``mask_columns`` (label -> CSV column of mask paths) adds ``masks`` (label -> path relative to the manifest)
    to the key's row: a 2d mask belongs to one image, so a 2d key with several images and a mask is an error
    (key each image with ``match="filename"``); a 3d mask (NIfTI, read onto each series through the affines) goes
    to every series of its key.

    ``deidentify``: rows point at copies de-identified to PS3.15 Annex E with ``deid_options`` under
    ``<manifest folder>/deidentified/`` (see ``mmvl.data.deid.Deidentifier``; one folder per study and series)
    and ``study_id`` is a stable pseudonym of the key, made with the secret in ``pseudonym_key`` (default
    ``<manifest folder>/pseudonym.key``). Images that may show text in their pixels are left out (a 3d series
    with any such slice as a whole) unless ``allow_burned_in``; ``deidentification_report.json`` beside the
    manifest counts what was done and lists them; the counts add it as ``deidentification``.
    """
    check_options(deid_options)  # a misspelt option is an error even before the first DICOM
    if match not in MATCHES:
        raise MMVLError(f"match={match!r}: choose one of {MATCHES}")
    if kind not in KINDS:
        raise MMVLError(f"kind={kind!r}: choose one of {KINDS}")
    if kind == "3d" and match == "filename":
        raise MMVLError("match='filename' names single files; a 3d series is matched by folder or study_uid")
    if min_slices < 1:
        raise MMVLError(f"min_slices={min_slices}: must be at least 1")
    check_fractions(val_fraction, test_fraction)
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "DICOM folder not found")
    report_of = read_reports(reports, key_column, report_column, sections, split_column, list(label_columns),
                             mask_columns)
    skipped_files = Counter(dict.fromkeys(FILE_SKIP_REASONS[kind], 0))
    files, unreadable = scan_tree(root, skipped_files, progress)

    images = [dicom for dicom in files if dicom.is_image]
    skipped_files["no_pixel_data"] = len(files) - len(images)  # SR, PR, KO, DICOMDIR: no Image Pixel module
    # Candidate rows: (SeriesInstanceUID or None for 2d, the files, the image path (3d), the key).
    if kind == "2d":  # a study's files, in path order; keys in order of their first file
        by_key: dict[str | None, list[DicomFile]] = {}
        for dicom in images:
            by_key.setdefault(file_key(dicom, match), []).append(dicom)
        candidates = [(None, members, None, key) for key, members in by_key.items()]
    else:
        skipped_files["no_series_uid"] = sum(dicom.series_uid is None for dicom in images)
        series: dict[str, list[DicomFile]] = {}
        for dicom in images:
            if dicom.series_uid is not None:
                series.setdefault(dicom.series_uid, []).append(dicom)
        # Every series each folder holds, non-image ones too: a reader given the folder sees them all.
        pairs = {(dicom.path.parent, dicom.series_uid) for dicom in files if dicom.series_uid}
        series_in = Counter(folder for folder, _uid in pairs)
        candidates = [
            (uid, members, members[0].path.parent, file_key(members[0], match)) for uid, members in series.items()
        ]

    skipped = Counter(dict.fromkeys(SKIP_REASONS[kind], 0))
    used_keys: set[str] = set()
    deidentifier = None
    written = 0  # image files (2d) or series (3d)
    with ManifestWriter(out) as writer:
        for series_uid, members, image, key in candidates:
            weight = len(members) if kind == "2d" else 1  # skips count files (2d) or series (3d)
            if series_uid is not None:
                if len({dicom.path.parent for dicom in members}) > 1:
                    skipped["series_across_folders"] += 1
                    continue
                if sum(dicom.frames for dicom in members) < min_slices:
                    skipped["too_few_slices"] += 1
                    continue
            report = report_of.get(key) if key is not None else None
            if report is None:
                skipped["unmatched"] += weight
                continue
            used_keys.add(key)
            if not report.text:
                skipped["empty_report"] += weight
                continue
            study_id = key
            if deidentify:
                if deidentifier is None:
                    deidentifier = Deidentifier(pseudonym_key or writer.folder / "pseudonym.key",
                                                options=deid_options, allow_burned_in=allow_burned_in)
                study_id = deidentifier.pseudonym(key)
            if kind == "2d":
                paths = [_deidentified_copy(deidentifier, [dicom], dicom.path, None, study_id, writer.folder)
                         if deidentify else dicom.path for dicom in members]
                members = [dicom for dicom, path in zip(members, paths) if path is not None]
                if not members:  # every image refused for burnt-in text: listed in the de-identification report
                    continue
                row = {"image": [writer.relative(path) for path in paths if path is not None], "report": report.text}
            else:
                if deidentify:
                    image = _deidentified_copy(deidentifier, members, image, series_uid, study_id, writer.folder)
                    if image is None:  # refused for burnt-in text: listed in the de-identification report
                        continue
                    series_uid = None  # the copy's folder holds this series alone
                row = {"image": writer.relative(image), "report": report.text}
            if report.labels is not None:
                row["labels"] = report.labels
            if report.masks is not None:
                if kind == "2d" and len(members) > 1:
                    raise DataError(reports, f"{key_column} {key!r} has masks but {len(members)} images, and a "
                                             "mask belongs to one image: key each image (--match filename)")
                row["masks"] = {label: writer.relative(mask) for label, mask in report.masks.items()}
            row["split"] = report.split or hashed_split(key, val_fraction, test_fraction)
            row["study_id"] = study_id
            if series_uid is not None and series_in[image] > 1:  # the loader must pick this series
                row["series_uid"] = series_uid
            if kind == "2d" and any(dicom.view for dicom in members):
                row["views"] = [dicom.view for dicom in members]
            writer.write(row)
            written += len(members) if kind == "2d" else 1
        writer.require_rows(root, {**skipped_files, **skipped})
    return writer.counts(
        skipped,
        images=written,
        skipped_files=dict(skipped_files),
        unreadable_examples=unreadable,
        unused_reports=len(report_of.keys() - used_keys),
        **write_deid_report(deidentifier, writer.folder),
    )


def _deidentified_copy(deidentifier: Deidentifier, members: list[DicomFile], image: Path, series_uid: str | None,
                       study_id: str, folder: Path) -> Path | None:
    """Copy a row's files to PS3.15 Annex E; returns what the row points at (the file, or the series folder), or
    None when refused for burnt-in text (a series as a whole, so no row points at a series with gaps)."""
    base = folder / "deidentified" / study_id
    if series_uid is None:  # 2d: one file
        target = base / (deidentifier.pseudonym(str(image), "") + ".dcm")
        return copy_dicom_or_none(deidentifier, image, target, study_id, folder)
    series = base / deidentifier.pseudonym(series_uid, "series-")
    if refused_series(deidentifier, [dicom.path for dicom in members], series, folder):
        return None
    for dicom in members:
        target = series / (deidentifier.pseudonym(str(dicom.path), "") + ".dcm")
        if copy_dicom_or_none(deidentifier, dicom.path, target, study_id, folder) is None:
            shutil.rmtree(series, ignore_errors=True)
            return None
    return series


def label_columns_map(text: str) -> dict[str, str]:
    """``"pleural effusion=effusion_mask,nodule=nodule_mask"`` -> ``{label: column}``."""
    pairs = {}
    for item in comma_list(text):
        label, sep, column = item.partition("=")
        if not sep or not label.strip() or not column.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not LABEL=COLUMN")
        pairs[label.strip()] = column.strip()
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Import a folder of DICOM files and a CSV of reports as an mmvl manifest.",
        epilog="Rows hold image (relative to the manifest; for 2d a list: one row per key), views (2d, from "
        "ViewPosition), report, labels, masks (--mask-columns), split, study_id (the CSV key) and, for a 3d "
        "folder holding several series, "
        "series_uid; never a name, id or date from the headers. "
        "See datasets/dicom_folder.md.",
    )
    parser.add_argument("root", help="folder searched recursively for DICOM files (with or without .dcm)")
    parser.add_argument("--reports", required=True, help="CSV with one row per key: key, report, ...")
    parser.add_argument("--key-column", default="study_id", help="CSV column holding the key (default study_id)")
    parser.add_argument("--report-column", default="report", help="CSV column holding the report (default report)")
    parser.add_argument(
        "--match",
        choices=MATCHES,
        default="folder",
        help="key = first folder below ROOT, StudyInstanceUID, or file name without .dcm (default folder)",
    )
    parser.add_argument("--kind", choices=KINDS, default="2d",
                        help="a row per study (its image files as a list), or per series (default 2d)")
    parser.add_argument("--split-column", help="CSV column holding train/val/test (default: hash of the key)")
    parser.add_argument("--label-columns", type=comma_list, default=[], help="CSV columns of 1/0/blank labels")
    parser.add_argument("--mask-columns", type=label_columns_map, default={},
                        help="LABEL=COLUMN,...: CSV columns holding each label's mask file (PNG/TIFF on the image's "
                        "pixels for 2d, NIfTI for 3d; relative to the CSV; blank: no mask) for segmentation")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="hashed split: share of keys in val")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="hashed split: share of keys in test")
    parser.add_argument("--min-slices", type=int, default=16, help="3d: skip series with fewer slices (default 16)")
    parser.add_argument("--deidentify", action="store_true",
                        help="point rows at copies de-identified to DICOM PS3.15 Annex E (see tools/deidentify.py) "
                        "under <out>/deidentified/, with pseudonymous study ids and UIDs")
    parser.add_argument("--pseudonym-key", help="secret key file for --deidentify's stable pseudonyms "
                        "(default <out>/pseudonym.key, created when missing; keep it private)")
    add_dicom_deid_arguments(parser)
    add_common_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    counts = run_cli(convert, vars(args))
    unit = "images" if args.kind == "2d" else "series"
    print(study_summary(counts, unit) if args.kind == "2d" else format_summary(counts, unit))
    print("  skipped files: " + ", ".join(f"{reason} {number}" for reason, number in counts["skipped_files"].items()))
    if counts["unreadable_examples"]:
        print("  unreadable, e.g.: " + "; ".join(counts["unreadable_examples"]))
    print(f"  reports matching no {unit}: {counts['unused_reports']}")
    if deid_summary(counts):
        print(deid_summary(counts))
    return counts


if __name__ == "__main__":
    main()
