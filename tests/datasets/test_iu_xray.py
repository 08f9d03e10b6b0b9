"""The IU X-ray (Open-I) converter (datasets/iu_xray.py) on a fake Open-I tree built here: hand-written report XMLs,
plus a few real even-numbered ones from torchxrayvision's NLMCXR_reports.tgz when it is installed."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmvl.errors import DataError, MMVLError
from tests.conftest import load_script

iu_xray = load_script("iu_xray")


def report_xml(number: int, sections: dict[str, str], major: list[str], images: list[str],
               automatic: list[str] = ()) -> str:
    """An ecgen-radiology XML as Open-I writes it (the elements the converter reads, in their places)."""
    abstract = "".join(f'<AbstractText Label="{label}">{text}</AbstractText>\n' for label, text in sections.items())
    mesh = "".join(f"<major>{term}</major>" for term in major) + "".join(
        f"<automatic>{term}</automatic>" for term in automatic)
    parents = "".join(f'<parentImage id="{image}"><figureId>F{i}</figureId><caption>Chest, 2 views</caption>'
                      f"<panel type=\"single\"><url>/hadoop/{image}.jpg</url></panel></parentImage>"
                      for i, image in enumerate(images, start=1))
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/><uId id="CXR{number}"/>'
            f'<pmcId id="{number}"/><docSource>CXR</docSource><IUXRId id="{number}"/>'
            f"<MedlineCitation><Article><Abstract>\n{abstract}</Abstract></Article></MedlineCitation>"
            f"<MeSH>{mesh}</MeSH>{parents}</eCitation>")


HAND_WRITTEN = {
    # number: (sections, MeSH major, automatic, images)
    9002: ({"COMPARISON": "XXXX", "INDICATION": "XXXX-year-old with cough.",
            "FINDINGS": "Clear lung XXXX bilaterally. Heart size normal. No pneumothorax.",
            "IMPRESSION": "No acute cardiopulmonary abnormality."},
           ["normal"], [], ["CXR9002_IM-9002-1001", "CXR9002_IM-9002-2001", "CXR9002_IM-9002-3001"]),
    9004: ({"INDICATION": "Dyspnea.", "IMPRESSION": "Small right pleural effusion."},
           ["Pleural Effusion/right/small"], ["effusion"], ["CXR9004_IM-9004-1001"]),
    9006: ({"COMPARISON": "None.", "INDICATION": "Pain."}, ["normal"], [], ["CXR9006_IM-9006-1001"]),  # no text
    9008: ({"FINDINGS": "Normal chest."}, ["normal"], [], []),  # no image listed
    9010: ({"FINDINGS": "Stable cardiomegaly."}, ["Cardiomegaly"], [], ["CXR9010_IM-9010-1001"]),  # PNG absent
}
DICOM_VIEWS = {"CXR9002_IM-9002-1001": "PA", "CXR9002_IM-9002-2001": "LL", "CXR9002_IM-9002-3001": "PA"}
TSNE_VIEWS = {"CXR9002_IM-9002-1001": "PA", "CXR9002_IM-9002-3001": "L", "CXR9004_IM-9004-1001": "PA"}


def real_even_reports(count: int = 3) -> list[tuple[str, bytes]]:
    """A few even-numbered report XMLs from torchxrayvision's copy (odd ones are never read), or none."""
    tgz = iu_xray.torchxrayvision_file(iu_xray.REPORTS_TGZ)
    if tgz is None:
        return []
    picked = []
    with tarfile.open(tgz, "r:gz") as archive:
        for member in archive:
            number = Path(member.name).stem
            if member.isfile() and number.isdigit() and int(number) % 2 == 0:
                picked.append((member.name, archive.extractfile(member).read()))
                if len(picked) == count:
                    break
    return picked


def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(path)


@pytest.fixture
def open_i(tmp_path):
    """``(root, real)``: root/ecgen-radiology/*.xml, root/NLMCXR_png/*.png (in a subfolder), the two view CSVs;
    ``real`` the real even-numbered reports included."""
    root = tmp_path / "openi"
    xml_dir = root / "ecgen-radiology"
    xml_dir.mkdir(parents=True)
    for number, (sections, major, automatic, images) in HAND_WRITTEN.items():
        (xml_dir / f"{number}.xml").write_text(report_xml(number, sections, major, images, automatic))
        for image in images:
            if number != 9010:
                write_png(root / "NLMCXR_png" / "part1" / f"{image}.png")
    real = []
    for name, data in real_even_reports():
        report = iu_xray.parse_report(data, name)
        assert report.report_id % 2 == 0
        (xml_dir / Path(name).name).write_bytes(data)
        for image in report.images:
            write_png(root / "NLMCXR_png" / f"{image}.png")
        real.append(report)
    (root / "dicom.csv").write_text("imageid,Rows,View Position\n" + "".join(
        f"{image},2048,{view}\n" for image, view in DICOM_VIEWS.items()) + "CXR9004_IM-9004-1001,2048,\n")
    (root / "tsne.csv").write_text("imageid,tsne-view\n" + "".join(
        f"{image},{view}\n" for image, view in TSNE_VIEWS.items()))
    return root, real


def convert(root: Path, out: Path, **options):
    options.setdefault("dicom_metadata", root / "dicom.csv")
    options.setdefault("tsne_views", root / "tsne.csv")
    return iu_xray.convert(out, reports=root, progress=False, **options)


def read_rows(path: Path) -> dict[int, dict]:
    return {row["report_id"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_study_rows_with_views_mesh_and_clean_text(open_i, tmp_path):
    root, real = open_i
    counts = convert(root, tmp_path / "out", images=root / "NLMCXR_png")
    rows = read_rows(tmp_path / "out" / "manifest.jsonl")
    assert rows[9002] == {
        "image": [f"../openi/NLMCXR_png/part1/CXR9002_IM-9002-{n}001.png" for n in (1, 2, 3)],
        # DICOM PA (t-SNE agrees), DICOM LL (no t-SNE), DICOM PA against t-SNE lateral: unknown
        "views": ["PA", "LL", None],
        "report": "Clear lung bilaterally. Heart size normal. No pneumothorax. No acute cardiopulmonary abnormality.",
        "mesh": {"major": ["normal"], "automatic": []},
        "report_id": 9002, "split": rows[9002]["split"], "study_id": "CXR9002",
    }
    assert rows[9004]["report"] == "Small right pleural effusion."  # impression alone
    assert rows[9004]["views"] == ["PA"]  # blank ViewPosition: the t-SNE view
    assert rows[9004]["mesh"] == {"major": ["Pleural Effusion/right/small"], "automatic": ["effusion"]}
    assert 9006 not in rows and 9008 not in rows and 9010 not in rows
    assert counts["skipped"] == {"empty_report": 1, "no_image": 1, "missing_image": 1}
    assert counts["rows"] == 2 + len(real) and counts["images"] == 4 + sum(len(r.images) for r in real)
    for report in real:  # real text: findings then impression, placeholders gone, every PNG listed
        row = rows[report.report_id]
        assert "XXXX" not in row["report"] and row["report"] == report.text()
        assert row["mesh"]["major"] == report.mesh_major and len(row["image"]) == len(report.images)
    for name in ("train", "val", "test"):  # the split files hold the manifest's rows of that split
        split_rows = read_rows(tmp_path / "out" / f"{name}.jsonl")
        assert split_rows == {k: row for k, row in rows.items() if row["split"] == name}


def test_reports_only_and_tgz_and_seeded_splits(open_i, tmp_path):
    root, real = open_i
    tgz = tmp_path / "reports.tgz"
    with tarfile.open(tgz, "w:gz") as archive:
        for path in sorted((root / "ecgen-radiology").glob("*.xml")):
            data = path.read_bytes()
            info = tarfile.TarInfo(f"ecgen-radiology/{path.name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    counts = iu_xray.convert(tmp_path / "text", reports=tgz, reports_only=True, progress=False)
    rows = read_rows(tmp_path / "text" / "manifest.jsonl")
    assert set(rows) == {9002, 9004, 9008, 9010} | {r.report_id for r in real}  # no images needed
    assert all("image" not in row and "views" not in row for row in rows.values())
    assert rows[9008]["report"] == "Normal chest." and counts["skipped"]["empty_report"] == 1
    # splits depend on the report number and the seed only
    convert(root, tmp_path / "same", reports_only=True)
    from_folder = read_rows(tmp_path / "same" / "manifest.jsonl")
    assert {k: r["split"] for k, r in from_folder.items()} == {k: r["split"] for k, r in rows.items()}
    many = [iu_xray.hashed_split(f"iu_xray:0:{n}", 0.1, 0.2) for n in range(2000)]
    assert 0.15 < many.count("test") / 2000 < 0.25 and 0.05 < many.count("val") / 2000 < 0.15
    reseeded = [iu_xray.hashed_split(f"iu_xray:1:{n}", 0.1, 0.2) for n in range(2000)]
    assert reseeded != many


def test_parity_filter_and_errors(open_i, tmp_path):
    root, _real = open_i
    (root / "ecgen-radiology" / "9001.xml").write_text(report_xml(9001, {"FINDINGS": "x."}, [], []))
    assert 9001 not in {r.report_id for r in iu_xray.read_reports(root, parity="even")}
    assert {r.report_id for r in iu_xray.read_reports(root, parity="odd")} == {9001}
    with pytest.raises(MMVLError, match="--reports-only"):
        iu_xray.convert(tmp_path / "x", reports=root, progress=False)
    with pytest.raises(MMVLError, match="sections"):
        iu_xray.convert(tmp_path / "x", reports=root, reports_only=True, sections=["history"], progress=False)
    (root / "ecgen-radiology" / "bad.xml").write_text("<eCitation><pmcId/></eCitation>")
    with pytest.raises(DataError, match="pmcId"):
        iu_xray.read_reports(root)
    with pytest.raises(DataError, match="not found"):
        iu_xray.read_reports(tmp_path / "missing.tgz")


def test_torchxrayvision_copy_is_found_without_importing_it():
    import sys

    path = iu_xray.torchxrayvision_file(iu_xray.REPORTS_TGZ)
    if importlib.util.find_spec("torchxrayvision") is None:
        assert path is None
    else:
        assert path is not None and path.name == "NLMCXR_reports.tgz"
        assert "torchxrayvision" not in sys.modules
