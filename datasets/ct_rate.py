"""Convert CT-RATE (chest CT volumes with reports and 18 abnormality labels) to an mmvl manifest for 3D models.

One JSONL row per reconstruction (NIfTI volume), carrying the rescale slope/intercept and voxel spacing of
CT-RATE's metadata CSVs, which the NIfTI headers lack. See ``datasets/ct_rate.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    from mmvl.data.reports import report_text
    from mmvl.errors import DataError, MMVLError
except ImportError:  # run as `python datasets/ct_rate.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(HERE.parent))
    from mmvl.data.reports import report_text
    from mmvl.errors import DataError, MMVLError
if str(HERE) not in sys.path:  # imported by path (as the tests do): find _converter.py beside this script
    sys.path.insert(0, str(HERE))
from _converter import (  # noqa: E402
    Deidentifier,
    ManifestWriter,
    add_common_arguments,
    check_fractions,
    deidentified_copy,
    format_summary,
    hashed_split,
    parse_label,
    progress_bar,
    read_csv,
    run_cli,
)

# The 18 abnormalities of multi_abnormality_labels/*_predicted_labels.csv (Hamamci et al., 2024), predicted
# from the reports by their RadBERT classifier.
ABNORMALITIES = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
# (volume folder, reports CSV, labels CSV, metadata CSV, mmvl split): CT-RATE's validation set is mmvl's test.
SOURCES = (
    (
        "train",
        "radiology_text_reports/train_reports.csv",
        "multi_abnormality_labels/train_predicted_labels.csv",
        "metadata/train_metadata.csv",
        "train",
    ),
    (
        "valid",
        "radiology_text_reports/validation_reports.csv",
        "multi_abnormality_labels/valid_predicted_labels.csv",
        "metadata/validation_metadata.csv",
        "test",
    ),
)
# Report section (mmvl.data.reports name) -> (header it is given, reports CSV column).
SECTIONS = {
    "history": ("CLINICAL INFORMATION", "ClinicalInformation_EN"),
    "technique": ("TECHNIQUE", "Technique_EN"),
    "findings": ("FINDINGS", "Findings_EN"),
    "impression": ("IMPRESSION", "Impressions_EN"),
}
METADATA_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")
RECONSTRUCTIONS = ("first", "all")
SKIP_REASONS = ("other_reconstruction", "empty_report", "missing_metadata", "missing_volume")
HINT = "download it from huggingface.co/datasets/ibrahimhamamci/CT-RATE (see datasets/ct_rate.md)"
# train_1_a_1.nii.gz: patient train_1, scan (study) train_1_a, reconstruction 1.
VOLUME_NAME = re.compile(r"(?P<scan>(?:train|valid)_\d+_[a-z]+)_(?P<reconstruction>\d+)(?:\.nii(?:\.gz)?)?")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_volume_name(text: str, path: Path, line: int) -> tuple[str, int]:
    """``"train_1_a_1.nii.gz"`` -> ``("train_1_a", 1)``: the scan and the reconstruction number."""
    match = VOLUME_NAME.fullmatch(text.strip())
    if match is None:
        raise DataError(path, f"line {line}, 'VolumeName': {text!r} is not like train_1_a_1.nii.gz")
    return match["scan"], int(match["reconstruction"])


def find_dataset(root: str | os.PathLike) -> Path:
    """The CT-RATE ``dataset`` folder: ``root`` itself or ``root/dataset``."""
    root = Path(root)
    for folder in (root, root / "dataset"):
        if (folder / "radiology_text_reports").is_dir():
            return folder
    raise DataError(root, f"no radiology_text_reports folder here; pass CT-RATE's dataset folder, or {HINT}")


def read_labels(path: Path) -> dict[str, dict[str, int]]:
    """Volume (``train_1_a_1``) -> ``{abnormality (lower case): 0 or 1}``, blanks left out."""
    labels: dict[str, dict[str, int]] = {}
    for line, row in enumerate(read_csv(path, ("VolumeName", *ABNORMALITIES), HINT), start=2):
        scan, reconstruction = parse_volume_name(row["VolumeName"], path, line)
        values = {column.lower(): parse_label(row[column], path, line, column) for column in ABNORMALITIES}
        labels[f"{scan}_{reconstruction}"] = {
            column: int(value) for column, value in values.items() if value is not None
        }
    return labels


def _number(row: dict[str, str], column: str, path: Path, line: int, count: int = 1) -> list[float]:
    """``count`` numbers from one metadata cell ("1.0", or "[0.75, 0.75]" for XYSpacing)."""
    numbers = NUMBER.findall(row[column])
    if len(numbers) != count:
        raise DataError(path, f"line {line}, {column!r}: {row[column]!r} is not {count} number(s)")
    return [float(number) for number in numbers]


def read_metadata(path: Path) -> dict[str, dict]:
    """Volume -> ``{"spacing": [x, y, z] mm, "rescale": {"slope", "intercept"}}`` from a metadata CSV."""
    metadata: dict[str, dict] = {}
    for line, row in enumerate(read_csv(path, METADATA_COLUMNS, HINT), start=2):
        scan, reconstruction = parse_volume_name(row["VolumeName"], path, line)
        # XYSpacing is in-plane (x, y), ZSpacing between slices; CT-CLIP resamples with exactly these.
        spacing = _number(row, "XYSpacing", path, line, 2) + _number(row, "ZSpacing", path, line)
        if min(spacing) <= 0:
            raise DataError(path, f"line {line}: spacing {spacing} must be positive (mm)")
        (slope,) = _number(row, "RescaleSlope", path, line)  # (0028,1053)
        (intercept,) = _number(row, "RescaleIntercept", path, line)  # (0028,1052)
        metadata[f"{scan}_{reconstruction}"] = {
            "spacing": spacing,
            "rescale": {"slope": slope, "intercept": intercept},
        }
    return metadata


def read_reports(path: Path, sections: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
    """Scan -> ``[(reconstruction, report text)]`` sorted by reconstruction; scans in CSV order."""
    columns = [SECTIONS[name][1] for name in sections]
    scans: dict[str, list[tuple[int, str]]] = {}
    for line, row in enumerate(read_csv(path, ("VolumeName", *columns), HINT), start=2):
        scan, reconstruction = parse_volume_name(row["VolumeName"], path, line)
        # Rebuilt with section headers so that report_text cleans and orders it as it does any report.
        text = "\n".join(
            f"{SECTIONS[name][0]}: {row[column].strip()}"
            for name, column in zip(sections, columns)
            if row[column].strip()
        )
        scans.setdefault(scan, []).append((reconstruction, report_text(text, sections) if text else ""))
    return {scan: sorted(volumes) for scan, volumes in scans.items()}


def convert(
    root: str | os.PathLike,
    out: str | os.PathLike,
    reconstructions: str = "first",
    val_fraction: float = 0.05,
    sections: Sequence[str] = ("findings", "impression"),
    check_files: bool = True,
    progress: bool = True,
    deidentify: bool = False,
    pseudonym_key: str | os.PathLike | None = None,
) -> dict:
    """Write the manifest (``out``: a ``.jsonl`` path or a folder) and ``train/val/test.jsonl``; return counts.

    ``root`` is CT-RATE's ``dataset`` folder (or the folder holding it). ``reconstructions="first"`` keeps
    the lowest-numbered usable reconstruction of each scan, ``"all"`` every one. ``val_fraction`` of the
    train patients (by a hash of ``train_<n>``) become "val"; CT-RATE's validation set is "test". Returns
    ``{"rows", "studies", "splits", "skipped": {reason: volumes}, "manifest", "data_root"}``; reasons are
    ``SKIP_REASONS``.

    ``deidentify``: ``study_id`` becomes a stable pseudonym of the scan (``train_1_a``) and rows point at hard
    links (or copies) under ``<manifest folder>/deidentified/<study pseudonym>/``, named by a pseudonym of the
    volume's path, so no volume, scan or patient name is written; the key is ``pseudonym_key`` (default
    ``<manifest folder>/pseudonym.key``, see ``_converter.Deidentifier``). The val split is still drawn from the
    patient. The volumes must be on disk (no ``check_files=False``).
    """
    if reconstructions not in RECONSTRUCTIONS:
        raise MMVLError(f"reconstructions={reconstructions!r}: choose one of {RECONSTRUCTIONS}")
    if isinstance(sections, str):
        sections = (sections,)
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown or not sections:
        raise MMVLError(f"sections={list(sections)}: choose from {list(SECTIONS)}")
    check_fractions(val_fraction)
    if deidentify and not check_files:
        raise MMVLError("deidentify links every volume into the output folder: they must be on disk (check_files)")
    dataset = find_dataset(root)
    skipped = Counter(dict.fromkeys(SKIP_REASONS, 0))
    deidentifier = None
    with ManifestWriter(out) as writer:
        for folder, reports_csv, labels_csv, metadata_csv, source_split in SOURCES:
            scans = read_reports(dataset / reports_csv, sections)
            labels_of = read_labels(dataset / labels_csv)
            metadata_of = read_metadata(dataset / metadata_csv)
            bar = progress_bar(scans.items(), progress, total=len(scans), desc=f"CT-RATE {folder}", unit="scan")
            for scan, volumes in bar:
                patient = scan.rsplit("_", 1)[0]  # train_1_a -> train_1
                kept = False
                for reconstruction, text in volumes:
                    if kept and reconstructions == "first":
                        skipped["other_reconstruction"] += 1
                        continue
                    name = f"{scan}_{reconstruction}"
                    if not text:
                        skipped["empty_report"] += 1
                        continue
                    if name not in metadata_of:
                        skipped["missing_metadata"] += 1
                        continue
                    # dataset/train/train_1/train_1_a/train_1_a_1.nii.gz
                    path = dataset / folder / patient / scan / f"{name}.nii.gz"
                    if check_files and not path.is_file():
                        skipped["missing_volume"] += 1
                        continue
                    study_id = scan
                    if deidentify:
                        if deidentifier is None:
                            deidentifier = Deidentifier(pseudonym_key or writer.folder / "pseudonym.key")
                        study_id = deidentifier.pseudonym(scan)
                        original = path.relative_to(dataset).as_posix()  # train/train_1/train_1_a/train_1_a_1.nii.gz
                        path = deidentified_copy(deidentifier, path, original, study_id, writer.folder)
                    writer.write(
                        {
                            "image": writer.relative(path),
                            "report": text,
                            "labels": labels_of.get(name, {}),
                            # by the original patient: the same split with or without --deidentify
                            "split": hashed_split(patient, val_fraction) if source_split == "train" else source_split,
                            "study_id": study_id,
                            **metadata_of[name],
                        }
                    )
                    kept = True
        writer.require_rows(dataset, skipped)
    return writer.counts(skipped)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert CT-RATE chest CT volumes with reports and abnormality labels to an mmvl manifest.",
        epilog="Rows hold image (a .nii.gz relative to the manifest), report, labels, split, study_id, spacing "
        "and rescale; no patient data (and, with --deidentify, no volume or scan name). CT-RATE's validation set "
        "becomes the test split. See datasets/ct_rate.md.",
    )
    parser.add_argument("root", help="CT-RATE's dataset folder (holding train/, valid/, radiology_text_reports/)")
    parser.add_argument(
        "--reconstructions",
        choices=RECONSTRUCTIONS,
        default="first",
        help="one volume per scan (the lowest-numbered reconstruction present), or all (default first)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="fraction of train patients put in val, by a hash of the patient (train_<n>) (default 0.05)",
    )
    parser.add_argument(
        "--check-files",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip (and count) volumes not on disk (default on; --no-check-files for a partial download)",
    )
    parser.add_argument("--deidentify", action="store_true",
                        help="pseudonymous study ids, and rows pointing at hard links (or copies) under "
                        "<out>/deidentified/ named by pseudonyms: no volume, scan or patient name in the manifest "
                        "(needs the volumes on disk)")
    parser.add_argument("--pseudonym-key", help="secret key file for --deidentify's stable pseudonyms "
                        "(default <out>/pseudonym.key, created when missing; keep it private)")
    add_common_arguments(parser, section_names=list(SECTIONS))
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    counts = run_cli(convert, vars(build_parser().parse_args(argv)))
    print(format_summary(counts, "volumes"))
    return counts


if __name__ == "__main__":
    main()
