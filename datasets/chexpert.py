"""Convert CheXpert (v1.0 or v1.0-small), with CheXpert Plus reports when given, to an mmvl manifest.

One JSONL row per study (its radiographs as a list, with their views): ``train.csv`` gives train and a
patient-level val split, ``valid.csv`` gives test. See ``datasets/chexpert.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent
try:
    from mmvl.data.reports import report_text
    from mmvl.errors import DataError, MMVLError
except ImportError:  # run as `python datasets/chexpert.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(HERE.parent))
    from mmvl.data.reports import report_text
    from mmvl.errors import DataError, MMVLError
if str(HERE) not in sys.path:  # imported by path (as the tests do): find the modules beside this script
    sys.path.insert(0, str(HERE))
from _converter import (  # noqa: E402
    Deidentifier,
    ManifestWriter,
    add_common_arguments,
    check_fractions,
    deidentified_copy,
    hashed_split,
    parse_label,
    progress_bar,
    read_csv,
    run_cli,
)
from mimic_cxr import (  # noqa: E402
    CHEXPERT_LABELS,
    UNCERTAIN_POLICIES,
    apply_uncertain_policy,
    study_summary,
)

RELEASE_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
SOURCES = (("train.csv", "train"), ("valid.csv", "test"))  # CheXpert's validation set is mmvl's test split
SPLIT_FOLDERS = ("train", "valid", "test")
VIEWS = ("frontal", "all")
LABEL_COLUMNS = tuple(sorted(CHEXPERT_LABELS))
CSV_COLUMNS = ("Path", "Frontal/Lateral", "AP/PA", *LABEL_COLUMNS)
PLUS_COLUMNS = ("path_to_image", "report")  # df_chexpert_plus_240401.csv
CHEXPERT_VALUES = (1.0, 0.0, -1.0)  # positive, negative, uncertain; blank is unknown
SKIP_REASONS = ("other_view", "missing_report", "empty_report", "missing_image")
HINT = "download CheXpert from the Stanford AIMI site (see datasets/chexpert.md)"


def image_key(path: str) -> PurePosixPath:
    """An image's path below the release folder, as both CSVs can name it.

    ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` (train.csv) and
    ``train/patient00001/study1/view1_frontal.jpg`` (CheXpert Plus) both give
    ``train/patient00001/study1/view1_frontal.jpg``, whatever the release folder is called.
    """
    parts = PurePosixPath(path.strip().replace("\\", "/")).parts
    if parts and parts[0] not in SPLIT_FOLDERS:
        parts = parts[1:]
    if len(parts) != 4:
        raise ValueError(f"{path!r} is not <release>/<split>/<patient>/<study>/<view file>")
    return PurePosixPath(*parts)


def find_release(root: str | os.PathLike) -> Path:
    """The folder holding train.csv and valid.csv: ``root`` itself or its CheXpert-v1.0(-small) folder."""
    root = Path(root)
    for folder in (root, *(root / name for name in RELEASE_FOLDERS)):
        if (folder / "train.csv").is_file():
            return folder
    raise DataError(root, f"no train.csv here; pass the {' or '.join(RELEASE_FOLDERS)} folder, or {HINT}")


def read_reports(path: str | os.PathLike, sections: Sequence[str], progress: bool) -> dict[str, str]:
    """CheXpert Plus reports: image path below the release folder, without extension -> report text."""
    reports: dict[str, str] = {}
    rows = read_csv(path, PLUS_COLUMNS, hint="download CheXpert Plus (see datasets/chexpert.md)")
    for line, row in enumerate(progress_bar(rows, progress, desc="CheXpert Plus", unit="report"), start=2):
        try:
            key = image_key(row["path_to_image"])
        except ValueError as err:
            raise DataError(path, f"line {line}, 'path_to_image': {err}") from err
        # The PNG release names its images .png where train.csv says .jpg: match without the extension.
        reports[str(key.with_suffix(""))] = report_text(row["report"], sections)
    return reports


@dataclass
class Study:
    """The kept images of one study, in CSV order, with their views, report texts and label values."""

    patient: str
    source_split: str
    images: list[tuple[Path, str, str | None]] = field(default_factory=list)  # (file, key below release, view)
    reports: list[str | None] = field(default_factory=list)  # per image: CheXpert Plus text, None when absent
    values: list[list[float | None]] = field(default_factory=list)  # per image: one value per LABEL_COLUMNS

    def report(self) -> str | None:
        """The first non-empty report of its images; "" when they have only empty ones, None when none has one."""
        texts = [text for text in self.reports if text is not None]
        return next((text for text in texts if text), "" if texts else None)

    def label_values(self) -> tuple[list[float | None], int]:
        """One value per label, and how many labels its images disagree on. CheXpert labels a study's report,
        so its images normally agree; a blank is unknown and yields to a value, a disagreement is left unknown."""
        merged: list[float | None] = []
        conflicts = 0
        for values in zip(*self.values):
            given = set(values) - {None}
            conflicts += len(given) > 1
            merged.append(given.pop() if len(given) == 1 else None)
        return merged, conflicts


def view_of(row: dict[str, str]) -> str | None:
    """The view in (0018,5101) ViewPosition terms: CheXpert's AP/PA column (AP, PA, LL...), else its Frontal/Lateral
    (LATERAL, or FRONTAL for a frontal image of unknown projection), upper case; None when both are blank."""
    return (row["AP/PA"].strip() or row["Frontal/Lateral"].strip()).upper() or None


def convert(
    root: str | os.PathLike,
    out: str | os.PathLike,
    reports: str | os.PathLike | None = None,
    views: str = "frontal",
    uncertain: str = "drop",
    val_fraction: float = 0.05,
    sections: Sequence[str] = ("findings", "impression"),
    allow_missing_report: bool = False,
    progress: bool = True,
    deidentify: bool = False,
    pseudonym_key: str | os.PathLike | None = None,
) -> dict:
    """Write the manifest (``out``: a ``.jsonl`` path or a folder) and ``train/val/test.jsonl``; return counts.

    ``root`` is the CheXpert-v1.0-small (or CheXpert-v1.0) folder or its parent; ``reports`` the CheXpert
    Plus CSV. ``val_fraction`` of the train.csv patients (by a hash of the patient id) become "val";
    valid.csv is "test". Rows without a report are skipped unless ``allow_missing_report``, which keeps them
    with ``"report": ""``. One row per study: ``image`` lists its images in CSV order and ``views`` their views
    (:func:`view_of`); its report is the first non-empty CheXpert Plus report of its images, its labels those of
    its images (see ``Study.label_values``). Returns ``{"rows", "studies", "images", "splits", "skipped": {reason:
    images}, "without_report": rows, "label_conflicts": labels left unknown, "manifest", "data_root"}``; skip
    reasons are ``SKIP_REASONS``.

    ``deidentify``: ``study_id`` becomes a stable pseudonym of ``<patient>_<study>`` and rows point at hard
    links (or copies) under ``<manifest folder>/deidentified/<study pseudonym>/``, named by a pseudonym of the
    image's path, so no patient id is written; the key is ``pseudonym_key`` (default ``<manifest
    folder>/pseudonym.key``, see ``_converter.Deidentifier``). The val split is still drawn from the patient id.
    """
    if views not in VIEWS:
        raise MMVLError(f"views={views!r}: choose one of {VIEWS}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise MMVLError(f"uncertain={uncertain!r}: choose one of {UNCERTAIN_POLICIES}")
    check_fractions(val_fraction)
    if reports is None and not allow_missing_report:
        raise MMVLError(
            "CheXpert has no reports of its own: pass the CheXpert Plus CSV (--reports "
            "df_chexpert_plus_240401.csv), or --allow-missing-report for images and labels only"
        )
    release = find_release(root)
    report_of = read_reports(reports, sections, progress) if reports is not None else {}
    label_names = [name.lower() for name in LABEL_COLUMNS]
    skipped = Counter(dict.fromkeys(SKIP_REASONS, 0))
    studies: dict[tuple[str, str, str], Study] = {}  # (split folder, patient, study) -> Study, in CSV order
    for csv_name, source_split in SOURCES:
        csv_path = release / csv_name
        rows = read_csv(csv_path, CSV_COLUMNS, hint=HINT)
        for line, row in enumerate(progress_bar(rows, progress, desc=csv_name, unit="image"), start=2):
            if views == "frontal" and row["Frontal/Lateral"].strip().lower() != "frontal":
                skipped["other_view"] += 1
                continue
            try:
                key = image_key(row["Path"])
            except ValueError as err:
                raise DataError(csv_path, f"line {line}, 'Path': {err}") from err
            values = [parse_label(row[name], csv_path, line, name, CHEXPERT_VALUES) for name in LABEL_COLUMNS]
            split_folder, patient, study_name, _view_file = key.parts
            study = studies.setdefault((split_folder, patient, study_name), Study(patient, source_split))
            study.images.append((release / key, str(key), view_of(row)))
            study.reports.append(report_of.get(str(key.with_suffix(""))))
            study.values.append(values)

    without_report = images_written = label_conflicts = 0
    deidentifier = None
    with ManifestWriter(out) as writer:
        for (_split_folder, patient, study_name), study in studies.items():
            text = study.report()
            if not text and not allow_missing_report:
                skipped["missing_report" if text is None else "empty_report"] += len(study.images)
                continue
            present = [(image, key, view) for image, key, view in study.images if image.is_file()]
            skipped["missing_image"] += len(study.images) - len(present)
            if not present:
                continue
            values, conflicts = study.label_values()
            label_conflicts += conflicts
            without_report += not text
            study_id = f"{patient}_{study_name}"
            if deidentify:
                if deidentifier is None:
                    deidentifier = Deidentifier(pseudonym_key or writer.folder / "pseudonym.key")
                study_id = deidentifier.pseudonym(study_id)
            paths = [
                writer.relative(deidentified_copy(deidentifier, image, key, study_id, writer.folder)
                                if deidentify else image)
                for image, key, _view in present
            ]
            images_written += len(paths)
            writer.write(
                {
                    "image": paths,
                    "report": text or "",
                    "labels": apply_uncertain_policy(label_names, values, uncertain),
                    # by the original patient id: the same split with or without --deidentify
                    "split": hashed_split(patient, val_fraction) if study.source_split == "train"
                    else study.source_split,
                    "study_id": study_id,
                    "views": [view for _image, _key, view in present],
                }
            )
        writer.require_rows(release, skipped)
    return writer.counts(skipped, images=images_written, without_report=without_report,
                         label_conflicts=label_conflicts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert CheXpert (with CheXpert Plus reports) to an mmvl manifest.",
        epilog="One row per study: image (a list, relative to the manifest), views, report, labels, split and "
        "study_id; no age, "
        "sex or other patient data (and, with --deidentify, no patient id). valid.csv becomes the test split. "
        "See datasets/chexpert.md.",
    )
    parser.add_argument("root", help="the CheXpert-v1.0-small (or CheXpert-v1.0) folder, or the folder holding it")
    parser.add_argument("--reports", help="CheXpert Plus df_chexpert_plus_240401.csv, matched on the image path")
    parser.add_argument(
        "--allow-missing-report",
        action="store_true",
        help="keep images without a report (report is empty), e.g. for zero-shot evaluation",
    )
    parser.add_argument(
        "--views", choices=VIEWS, default="frontal", help="frontal images only, or all (default frontal)"
    )
    parser.add_argument(
        "--uncertain",
        choices=UNCERTAIN_POLICIES,
        default="drop",
        help="CheXpert -1.0 (uncertain) becomes 1, 0, or is left out (default drop)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="fraction of train.csv patients put in val, by a hash of the patient id (default 0.05)",
    )
    parser.add_argument("--deidentify", action="store_true",
                        help="pseudonymous study ids, and rows pointing at hard links (or copies) under "
                        "<out>/deidentified/ named by pseudonyms: no patient or study id in the manifest")
    parser.add_argument("--pseudonym-key", help="secret key file for --deidentify's stable pseudonyms "
                        "(default <out>/pseudonym.key, created when missing; keep it private)")
    add_common_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    counts = run_cli(convert, vars(build_parser().parse_args(argv)))
    print(study_summary(counts, "images"))
    if counts["without_report"]:
        print(f"  studies kept without a report: {counts['without_report']}")
    if counts["label_conflicts"]:
        print(f"  labels left unknown because a study's images disagree on them: {counts['label_conflicts']}")
    return counts


if __name__ == "__main__":
    main()
