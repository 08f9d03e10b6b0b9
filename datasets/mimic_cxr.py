"""Convert MIMIC-CXR (DICOM 2.0.0 or JPG 2.0.0) with its reports and CheXpert labels to an mmvl manifest.

MIMIC-CXR is credentialed-access PhysioNet data: download it yourself, then see ``datasets/mimic_cxr.md``.
Writes one JSONL row per study (its images as a list, with their ViewPositions), plus ``train.jsonl``, ``val.jsonl``
and ``test.jsonl`` beside it.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

try:
    from mmvl.data.reports import report_text
    from mmvl.errors import DataError, MMVLError
except ImportError:  # run as `python datasets/mimic_cxr.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mmvl.data.reports import report_text
    from mmvl.errors import DataError, MMVLError
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (as the tests do): find _converter.py beside this script
    sys.path.insert(0, str(HERE))
from _converter import (  # noqa: E402
    DEFAULT_OPTIONS,
    Deidentifier,
    add_dicom_deid_arguments,
    check_options,
    data_root,
    deid_summary,
    deidentified_copy,
    format_summary,
    write_deid_report,
)

# The 14 CheXpert observations of mimic-cxr-2.0.0-chexpert.csv.gz (Irvin et al., AAAI 2019).
CHEXPERT_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
SPLITS = {"train": "train", "validate": "val", "test": "test"}  # official split name -> mmvl split
UNCERTAIN_POLICIES = ("ones", "zeros", "drop")  # what a CheXpert -1.0 (uncertain) becomes
EXTENSIONS = ("jpg", "dcm")  # MIMIC-CXR-JPG 2.0.0 JPEGs, or the MIMIC-CXR 2.0.0 DICOMs they were made from
SKIP_REASONS = ("other_view", "no_split", "missing_report", "empty_report", "missing_image")

METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "split")
CHEXPERT_ID_COLUMNS = ("subject_id", "study_id")


def read_csv(path: str | os.PathLike, required: Sequence[str]) -> Iterator[dict[str, str]]:
    """Rows of a CSV or gzip CSV as dicts; the file must exist and have the ``required`` columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "CSV file not found; download it from PhysioNet (see datasets/mimic_cxr.md)")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [name for name in required if name not in columns]
            if missing:
                raise DataError(path, f"missing column(s) {missing}; found {columns}. Is this the right CSV?")
            yield from reader
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:  # truncated gzip, binary file
        raise DataError(path, f"cannot read CSV: {err}") from err


def _strip_prefix(value: str, prefix: str) -> str:
    """``"s50414267"`` or ``"50414267"`` -> ``"50414267"``: the CSVs hold plain integers, folders a prefix."""
    value = value.strip()
    return value[1:] if value[:1].lower() == prefix else value


def _files_dir(root: str | os.PathLike, what: str) -> Path:
    """The ``files/`` folder of a PhysioNet download, given the download root or ``files/`` itself."""
    root = Path(root)
    if (root / "files").is_dir():
        return root / "files"
    if root.is_dir():
        return root
    raise DataError(root, f"{what} folder not found; pass the folder that holds files/p10, files/p11, ...")


def _read_split(path: str | os.PathLike) -> dict[str, str]:
    """dicom_id -> mmvl split name ("train", "val", "test")."""
    split_of: dict[str, str] = {}
    for line, row in enumerate(read_csv(path, SPLIT_COLUMNS), start=2):
        name = row["split"].strip().lower()
        if name not in SPLITS:
            raise DataError(path, f"line {line}: split {row['split']!r} is not one of {sorted(SPLITS)}")
        split_of[row["dicom_id"].strip()] = SPLITS[name]
    return split_of


def _read_chexpert(path: str | os.PathLike) -> tuple[list[str], dict[str, tuple[float | None, ...]]]:
    """Label names (lower case) and, per study id, one value per label: 1.0, 0.0, -1.0 or None (blank)."""
    rows = read_csv(path, CHEXPERT_ID_COLUMNS)
    first = next(rows, None)
    if first is None:
        return [], {}
    columns = [name for name in first if name not in CHEXPERT_ID_COLUMNS]
    if not columns:
        raise DataError(path, f"no label columns besides {CHEXPERT_ID_COLUMNS}; expected {CHEXPERT_LABELS}")
    by_study: dict[str, tuple[float | None, ...]] = {}
    for line, row in enumerate(itertools.chain([first], rows), start=2):
        values: list[float | None] = []
        for name in columns:
            text = (row[name] or "").strip()
            try:
                value = float(text) if text else None
            except ValueError:
                value = 2.0  # reported below
            if value not in (None, 1.0, 0.0, -1.0):
                raise DataError(path, f"line {line}, {name!r}: {text!r} is not 1.0, 0.0, -1.0 or empty")
            values.append(value)
        by_study[_strip_prefix(row["study_id"], "s")] = tuple(values)
    return [name.lower() for name in columns], by_study


def apply_uncertain_policy(
    names: Sequence[str], values: Sequence[float | None], uncertain: str
) -> dict[str, int]:
    """``{label: 0 or 1}``: blanks are left out; -1.0 becomes 1 ("ones"), 0 ("zeros") or nothing ("drop")."""
    labels: dict[str, int] = {}
    for name, value in zip(names, values):
        if value is None or (value == -1.0 and uncertain == "drop"):
            continue
        if value == -1.0:
            labels[name] = 1 if uncertain == "ones" else 0
        else:
            labels[name] = int(value)
    return labels


def convert(
    images: str | os.PathLike,
    reports: str | os.PathLike,
    metadata: str | os.PathLike,
    split: str | os.PathLike,
    out: str | os.PathLike,
    chexpert: str | os.PathLike | None = None,
    views: Sequence[str] | None = None,
    ext: str = "jpg",
    sections: Sequence[str] = ("findings", "impression"),
    uncertain: str = "drop",
    limit: int | None = None,
    progress: bool = True,
    deidentify: bool = False,
    pseudonym_key: str | os.PathLike | None = None,
    deid_options: Sequence[str] = DEFAULT_OPTIONS,
    allow_burned_in: bool = False,
) -> dict:
    """Write the manifest ``out`` (and ``train/val/test.jsonl`` in its folder); return the counts.

    ``images`` and ``reports`` are the download roots holding ``files/p10/...`` (or those ``files/`` folders).
    One row per study: ``image`` lists the study's images and ``views`` their ViewPosition (metadata CSV;
    None where blank), in metadata order. ``views`` keeps only those ViewPosition values (e.g. ``("PA", "AP")``;
    None keeps all); ``limit`` stops after that many rows (studies). Returns ``{"rows", "studies", "images",
    "splits": {split: rows}, "skipped": {reason: images}, "manifest", "data_root"}``; skip reasons are
    ``SKIP_REASONS``.

    ``deidentify``: ``study_id`` becomes a stable pseudonym of ``s<study>`` and rows point at copies under
    ``<manifest folder>/deidentified/<study pseudonym>/`` (hard links to the JPEGs, DICOMs rewritten to PS3.15
    Annex E by ``mmvl.data.deid.Deidentifier`` with ``deid_options``), named by a pseudonym of their PhysioNet
    path, so no subject, study or dicom id is written; the key is ``pseudonym_key`` (default ``<manifest
    folder>/pseudonym.key``). DICOMs that may show text in their pixels are left out unless ``allow_burned_in``;
    ``deidentification_report.json`` beside the manifest counts what was done and lists them.
    """
    check_options(deid_options)  # a misspelt option is an error even before the first DICOM
    if ext not in EXTENSIONS:
        raise MMVLError(f"ext={ext!r}: choose one of {EXTENSIONS}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise MMVLError(f"uncertain={uncertain!r}: choose one of {UNCERTAIN_POLICIES}")
    if limit is not None and limit < 1:
        raise MMVLError(f"limit={limit}: must be a positive number of rows")
    out = Path(out)
    split_paths = {name: Path(os.path.abspath(out.parent)) / f"{name}.jsonl" for name in SPLITS.values()}
    if Path(os.path.abspath(out)) in split_paths.values():
        raise MMVLError(f"out={out}: the per-split files take that name; call the manifest manifest.jsonl")
    image_files = _files_dir(images, "images")
    report_files = _files_dir(reports, "reports")
    keep_views = None if views is None else {view.strip().upper() for view in views if view.strip()}

    split_of = _read_split(split)
    label_names, labels_of = _read_chexpert(chexpert) if chexpert is not None else ([], {})
    # study -> (subject, [(dicom_id, view)]), in metadata order; one report per study.
    studies: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for row in read_csv(metadata, METADATA_COLUMNS):
        study = _strip_prefix(row["study_id"], "s")
        subject = _strip_prefix(row["subject_id"], "p")
        dicom = (row["dicom_id"].strip(), row["ViewPosition"].strip())
        studies.setdefault(study, (subject, []))[1].append(dicom)

    out_dir = Path(os.path.abspath(out.parent))
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out, *split_paths.values()]
    handles = {path: open(f"{path}.tmp", "w", encoding="utf-8") for path in targets}
    rows_per_split = Counter({name: 0 for name in SPLITS.values()})
    skipped = Counter({reason: 0 for reason in SKIP_REASONS})
    studies_written: set[str] = set()
    images_written = 0
    image_folder: str | None = None  # the common folder of the images written
    deidentifier = None
    quiet = not progress or os.environ.get("MMVL_NO_PROGRESS") == "1"
    bar = tqdm(studies.items(), total=len(studies), desc="MIMIC-CXR", unit="study", disable=quiet)
    try:
        for study, (subject, dicoms) in bar:
            if limit is not None and sum(rows_per_split.values()) >= limit:
                break
            candidates = []
            for dicom_id, view in dicoms:
                if keep_views is not None and view.upper() not in keep_views:
                    skipped["other_view"] += 1
                elif dicom_id not in split_of:
                    skipped["no_split"] += 1
                else:
                    candidates.append((dicom_id, view))
            if not candidates:
                continue
            # files/p10/p10000032/s50414267/<dicom_id>.dcm and files/p10/p10000032/s50414267.txt
            study_dir = Path(f"p{subject[:2]}", f"p{subject}", f"s{study}")
            report_path = report_files / study_dir.with_name(f"s{study}.txt")
            if not report_path.is_file():
                skipped["missing_report"] += len(candidates)
                continue
            text = report_text(report_path.read_text(encoding="utf-8", errors="replace"), sections)
            if not text:
                skipped["empty_report"] += len(candidates)
                continue
            present = [(dicom_id, view) for dicom_id, view in candidates
                       if (image_files / study_dir / f"{dicom_id}.{ext}").is_file()]
            skipped["missing_image"] += len(candidates) - len(present)
            if not present:
                continue
            # the official split, by dicom_id (the same with or without --deidentify); PhysioNet splits by
            # subject, so the images of one study never disagree unless the CSV is not the official one
            splits = sorted({split_of[dicom_id] for dicom_id, _view in present})
            if len(splits) > 1:
                raise DataError(split, f"study s{study} has images in splits {splits}; one study, one split. "
                                       "Is this the official mimic-cxr-2.0.0-split.csv.gz?")
            study_id = f"s{study}"
            if deidentify:
                if deidentifier is None:
                    deidentifier = Deidentifier(pseudonym_key or out_dir / "pseudonym.key", options=deid_options,
                                                allow_burned_in=allow_burned_in)
                study_id = deidentifier.pseudonym(study_id)
            paths, views_written = [], []
            for dicom_id, view in present:
                image_path = image_files / study_dir / f"{dicom_id}.{ext}"
                if deidentify:
                    original = (study_dir / image_path.name).as_posix()  # p10/p10000032/s50414267/<dicom_id>.jpg
                    image_path = deidentified_copy(deidentifier, image_path, original, study_id, out_dir, ext == "dcm")
                    if image_path is None:  # refused for burnt-in text: listed in the de-identification report
                        continue
                views_written.append(view)
                folder = os.path.dirname(os.path.abspath(image_path))
                image_folder = folder if image_folder is None else os.path.commonpath([image_folder, folder])
                paths.append(Path(os.path.relpath(os.path.abspath(image_path), out_dir)).as_posix())
            if not paths:
                continue
            row: dict = {"image": paths, "report": text}
            if chexpert is not None:  # a study the labeller skipped gets no labels, not all-negative ones
                values = labels_of.get(study, ())
                row["labels"] = apply_uncertain_policy(label_names, values, uncertain)
            # (0018,5101) ViewPosition as the metadata CSV gives it; None where it is blank
            row.update(split=splits[0], study_id=study_id, views=[view or None for view in views_written])
            line = json.dumps(row, ensure_ascii=False) + "\n"
            handles[out].write(line)
            handles[split_paths[row["split"]]].write(line)
            rows_per_split[row["split"]] += 1
            studies_written.add(study)
            images_written += len(paths)
    except BaseException:
        bar.close()
        for path, handle in handles.items():
            handle.close()
            os.remove(f"{path}.tmp")
        raise
    bar.close()
    for path, handle in handles.items():  # only a finished conversion replaces an earlier manifest
        handle.close()
        os.replace(f"{path}.tmp", path)
    return {
        "rows": sum(rows_per_split.values()),
        "studies": len(studies_written),
        "images": images_written,
        "splits": dict(rows_per_split),
        "skipped": dict(skipped),
        "manifest": str(out),
        **data_root(image_folder, out_dir),
        **write_deid_report(deidentifier, out_dir),
    }


def study_summary(counts: dict, unit: str) -> str:
    """``format_summary`` for a manifest of one row per study: rows are studies, each of ``counts["images"]``
    files (``unit``: "images", "series") is one view, and skips are counted in ``unit``."""
    _first_line, rest = format_summary(counts, unit).split("\n", 1)
    return (f"wrote {counts['rows']} studies ({counts['images']} {unit}) to {counts['manifest']}\n"
            + rest.replace("per split:", "studies per split:", 1))


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert MIMIC-CXR / MIMIC-CXR-JPG with reports and CheXpert labels to an mmvl manifest.",
        epilog="One row per study: image (a list, relative to the manifest), views (their ViewPosition), report, "
        "labels, split and study_id; "
        "no subject_id and no DICOM header data (and, with --deidentify, no PhysioNet id at all). "
        "See datasets/mimic_cxr.md.",
    )
    parser.add_argument("--images", required=True, help="download root holding files/p10/... with the images")
    parser.add_argument("--reports", required=True, help="mimic-cxr-reports root holding files/p10/...txt")
    parser.add_argument("--metadata", required=True, help="mimic-cxr-2.0.0-metadata.csv.gz")
    parser.add_argument("--split", required=True, help="mimic-cxr-2.0.0-split.csv.gz")
    parser.add_argument("--chexpert", help="mimic-cxr-2.0.0-chexpert.csv.gz (no labels without it)")
    parser.add_argument(
        "--views", type=_comma_list, help="ViewPosition values to keep, e.g. PA,AP (default all)"
    )
    parser.add_argument("--ext", choices=EXTENSIONS, default="jpg", help="image file type (default jpg)")
    parser.add_argument(
        "--sections",
        type=_comma_list,
        default=["findings", "impression"],
        help="report sections used as text, in order (default findings,impression)",
    )
    parser.add_argument(
        "--uncertain",
        choices=UNCERTAIN_POLICIES,
        default="drop",
        help="CheXpert -1.0 (uncertain) becomes 1, 0, or is left out (default drop)",
    )
    parser.add_argument("--limit", type=int, help="stop after this many studies (for a quick try)")
    parser.add_argument("--deidentify", action="store_true",
                        help="pseudonymous study ids, and rows pointing at copies under <out folder>/deidentified/ "
                        "named by pseudonyms (hard links to JPEGs; DICOMs de-identified to DICOM PS3.15 Annex E, "
                        "see tools/deidentify.py): no subject, study or dicom id in the manifest")
    parser.add_argument("--pseudonym-key", help="secret key file for --deidentify's stable pseudonyms "
                        "(default <out folder>/pseudonym.key, created when missing; keep it private)")
    add_dicom_deid_arguments(parser)
    parser.add_argument("--out", required=True, help="manifest to write, e.g. data/mimic_cxr/manifest.jsonl")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        counts = convert(
            images=args.images,
            reports=args.reports,
            metadata=args.metadata,
            split=args.split,
            out=args.out,
            chexpert=args.chexpert,
            views=args.views,
            ext=args.ext,
            sections=args.sections,
            uncertain=args.uncertain,
            limit=args.limit,
            progress=not args.no_progress,
            deidentify=args.deidentify,
            pseudonym_key=args.pseudonym_key,
            deid_options=args.deid_options,
            allow_burned_in=args.allow_burned_in,
        )
    except MMVLError as err:
        sys.exit(f"error: {err}")
    print(study_summary(counts, "images"))
    if counts.get("data_root_problem"):
        print(f"  {counts['data_root_problem']}")
    if deid_summary(counts):
        print(deid_summary(counts))
    return counts


if __name__ == "__main__":
    main()
