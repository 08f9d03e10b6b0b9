"""datasets/synthetic.py: DICOM validity, determinism, manifest and splits, reports, visible findings."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

N_IMAGES = 60
SIZE = 64
SEED = 0
MANIFEST_KEYS = {"image", "report", "labels", "split", "study_id", "masks"}
# Header attributes that identify a patient or a study; none may appear in a manifest.
IDENTIFIER_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyID",
)

# What a report may call each finding, and the words that negate a sentence.
MENTIONS = {
    "pleural effusion": r"effusion|pleural fluid",
    "cardiomegaly": r"cardiomegaly|heart is (?:\w+ )?enlarged|enlarge(?:d|ment of the) cardiac silhouette"
    r"|cardiac silhouette is enlarged",
    "pneumothorax": r"pneumothora|pleural line|pleural air",
    "nodule": r"nodul|rounded opacity",
}
NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def synthetic() -> ModuleType:
    path = Path(__file__).parents[2] / "datasets" / "synthetic.py"
    spec = importlib.util.spec_from_file_location("mmvl_datasets_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(synthetic, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic_cxr")
    manifest = synthetic.generate(out, n=N_IMAGES, size=SIZE, seed=SEED)
    assert manifest == out / "manifest.jsonl"
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def rows(dataset) -> list[dict]:
    return read_jsonl(dataset / "manifest.jsonl")


@pytest.fixture(scope="module")
def headers(dataset, rows) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(dataset / row["image"]) for row in rows]


def display(ds: pydicom.Dataset) -> np.ndarray:
    """The intended reader, written independently: rescale, linear window to [0, 1], invert MONOCHROME1."""
    values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    image = np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
    return 1.0 - image if ds.PhotometricInterpretation == "MONOCHROME1" else image


@pytest.fixture(scope="module")
def images(headers) -> list[np.ndarray]:
    return [display(ds) for ds in headers]


def zone_mean(image: np.ndarray, x_range: tuple[float, float], y_range: tuple[float, float]) -> float:
    """Mean over a box given in units of half the image height from the centre (x right, y down)."""
    rows, columns = image.shape
    x = (np.arange(columns) - (columns - 1) / 2) / (rows / 2)
    y = (np.arange(rows) - (rows - 1) / 2) / (rows / 2)
    in_x = (x >= x_range[0]) & (x <= x_range[1])
    in_y = (y >= y_range[0]) & (y <= y_range[1])
    return float(image[np.ix_(in_y, in_x)].mean())


def costophrenic_means(image: np.ndarray) -> tuple[float, float]:
    """Mean brightness of the lateral lung bases: (image left = patient right, image right = patient left)."""
    return zone_mean(image, (-0.64, -0.5), (0.35, 0.5)), zone_mean(image, (0.5, 0.64), (0.35, 0.5))


def heart_and_thorax(image: np.ndarray) -> tuple[float, float]:
    """Widths (in half image heights) of the bright run through the heart and of the dark lungs beside it,
    each read off the column profile of a band of rows, as a radiologist would, crudely."""
    rows, columns = image.shape
    x = (np.arange(columns) - (columns - 1) / 2) / (rows / 2)
    y = (np.arange(rows) - (rows - 1) / 2) / (rows / 2)
    bright = image[(y >= 0.15) & (y <= 0.32)].mean(axis=0) > 0.55
    left = right = int(np.argmin(np.abs(x - 0.1)))
    while left > 0 and bright[left - 1]:
        left -= 1
    while right < columns - 1 and bright[right + 1]:
        right += 1
    lungs = np.flatnonzero((image[(y >= 0.0) & (y <= 0.2)].mean(axis=0) < 0.33) & (np.abs(x) < 0.85))
    return (right - left + 1) / (rows / 2), (lungs.max() - lungs.min() + 1) / (rows / 2)


def dark_fraction(image: np.ndarray) -> float:
    """Largest fraction, over the two upper lung fields, of pixels darker than any aerated lung."""
    rows, columns = image.shape
    x = (np.arange(columns) - (columns - 1) / 2) / (rows / 2)
    y = (np.arange(rows) - (rows - 1) / 2) / (rows / 2)
    x, y = np.meshgrid(x, y)
    fractions = []
    for sign in (-1, 1):
        field = (sign * x > 0.2) & (sign * x < 0.65) & (y > -0.7) & (y < 0.0)
        fractions.append(float((image[field] < 0.12).mean()))
    return max(fractions)


def auc(positives, negatives) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    positives, negatives = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float((positives > negatives).mean() + 0.5 * (positives == negatives).mean())


def labels_of(rows: list[dict], name: str) -> np.ndarray:
    return np.array([row["labels"][name] for row in rows], dtype=bool)


def sentences(report: str) -> list[str]:
    return [part for part in re.split(r"(?<=[.;])\s+|\n", report) if part.strip()]


def asserted(report: str, finding: str) -> bool:
    """True when a sentence names ``finding`` (or a synonym) without a negation."""
    pattern = re.compile(MENTIONS[finding], re.IGNORECASE)
    return any(pattern.search(sentence) and not NEGATION.search(sentence) for sentence in sentences(report))


# ---------------------------------------------------------------------------------------------------------


def test_files_are_valid_dicom_with_varied_encodings(dataset, rows, headers):
    assert len(headers) == N_IMAGES
    photometric, nontrivial_rescale, modalities, widths = set(), 0, set(), set()
    for row, ds in zip(rows, headers):
        assert (dataset / row["image"]).read_bytes()[128:132] == b"DICM"
        assert ds.SOPClassUID in (DigitalXRayImageStorageForPresentation, ComputedRadiographyImageStorage)
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.Modality == ("DX" if ds.SOPClassUID == DigitalXRayImageStorageForPresentation else "CR")
        assert (ds.BitsAllocated, ds.PixelRepresentation, ds.SamplesPerPixel) == (16, 0, 1)
        assert 12 <= ds.BitsStored <= 16 and ds.HighBit == ds.BitsStored - 1
        assert ds.Rows == SIZE and ds.Columns in (SIZE, round(SIZE * 0.875))
        assert len(ds.PixelSpacing) == 2 and float(ds.PixelSpacing[0]) > 0
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns) and pixels.dtype == np.uint16
        assert int(pixels.max()) <= 2**ds.BitsStored - 1
        assert float(ds.WindowWidth) > 1
        # Air outside the body lies beyond the window, so clipping matters.
        values = pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        low, high = (
            float(ds.WindowCenter) - float(ds.WindowWidth) / 2,
            float(ds.WindowCenter) + float(ds.WindowWidth) / 2,
        )
        outside = (
            (values < low).mean() if ds.PhotometricInterpretation == "MONOCHROME2" else (values > high).mean()
        )
        assert outside > 0.01
        assert str(ds.PatientName).startswith("SYNTH^")
        photometric.add(ds.PhotometricInterpretation)
        modalities.add(ds.Modality)
        widths.add(ds.Columns)
        nontrivial_rescale += float(ds.RescaleSlope) != 1.0 or float(ds.RescaleIntercept) != 0.0
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert modalities == {"DX", "CR"}
    assert len(widths) == 2  # some images are narrower than tall
    assert nontrivial_rescale > N_IMAGES // 2


def test_same_seed_same_bytes_and_prefix_stable(synthetic, tmp_path):
    first = synthetic.generate(tmp_path / "a", n=12, size=48, seed=3).parent
    second = synthetic.generate(tmp_path / "b", n=12, size=48, seed=3).parent
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    n_masks = sum(len(row["masks"]) for row in read_jsonl(first / "manifest.jsonl"))
    assert n_masks >= 5 and len(files) == 12 + 5 + n_masks  # images, manifest, three splits, README, masks
    assert files == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative

    # Sample i does not depend on n.
    shorter = synthetic.generate(tmp_path / "short", n=10, size=48, seed=3).parent
    assert read_jsonl(shorter / "manifest.jsonl") == read_jsonl(first / "manifest.jsonl")[:10]
    assert (shorter / "images" / "000009.dcm").read_bytes() == (first / "images" / "000009.dcm").read_bytes()

    other = synthetic.generate(tmp_path / "c", n=12, size=48, seed=4).parent
    assert (other / "manifest.jsonl").read_bytes() != (first / "manifest.jsonl").read_bytes()
    assert (other / "images" / "000000.dcm").read_bytes() != (first / "images" / "000000.dcm").read_bytes()


def test_manifest_rows_and_splits(synthetic, dataset, rows):
    assert len(rows) == N_IMAGES
    for index, row in enumerate(rows):
        assert set(row) == MANIFEST_KEYS
        assert row["image"] == f"images/{index:06d}.dcm" and (dataset / row["image"]).is_file()
        assert row["study_id"] == f"syn{index:06d}"
        assert set(row["labels"]) == set(synthetic.FINDINGS)
        assert set(row["labels"].values()) <= {0, 1}
        assert row["split"] in ("train", "val", "test")
    by_split = {split: read_jsonl(dataset / f"{split}.jsonl") for split in ("train", "val", "test")}
    assert {split: len(part) for split, part in by_split.items()} == {"train": 48, "val": 6, "test": 6}
    for split, part in by_split.items():
        assert part == [row for row in rows if row["split"] == split]
    # Every finding occurs, and some studies are normal.
    for name in synthetic.FINDINGS:
        assert 5 <= labels_of(rows, name).sum() <= N_IMAGES - 5, name
    assert any(not any(row["labels"].values()) for row in rows)
    assert (dataset / "README.md").read_text(encoding="utf-8").startswith("# Synthetic chest X-ray set")


def test_small_sets_still_have_val_and_test(synthetic, tmp_path):
    rows = read_jsonl(synthetic.generate(tmp_path / "ten", n=10, size=32, seed=7))
    assert sorted(row["split"] for row in rows) == ["test"] + ["train"] * 8 + ["val"]


@pytest.mark.parametrize(("arguments", "message"), [({"n": 0}, "n must be"), ({"size": 16}, "size must be")])
def test_bad_arguments_raise(synthetic, tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        synthetic.generate(tmp_path, **arguments)


def test_no_identifiers_in_manifests(dataset, headers):
    identifiers = {str(ds.data_element(keyword).value) for ds in headers for keyword in IDENTIFIER_KEYWORDS}
    assert any(value.startswith("SYNTH^PATIENT") for value in identifiers)
    for path in dataset.glob("*.jsonl"):
        text = path.read_text(encoding="utf-8")
        leaked = sorted(value for value in identifiers if value in text)
        assert not leaked, f"{path.name} contains {leaked[:3]}"


def test_reports_agree_with_labels(synthetic, rows):
    named = dict.fromkeys(synthetic.FINDINGS, 0)
    for row in rows:
        report = row["report"]
        assert "FINDINGS:" in report and "IMPRESSION:" in report
        for name, positive in row["labels"].items():
            assert asserted(report, name) == bool(positive), (name, report)
            named[name] += positive and name in report.lower()
        if not any(row["labels"].values()):
            impression = report.split("IMPRESSION:")[1]
            assert re.search(r"\bno\b|normal", impression, re.IGNORECASE), report
    # The label words themselves appear in most positive reports, so zero-shot prompts can work.
    for name in synthetic.FINDINGS:
        assert named[name] >= 0.6 * labels_of(rows, name).sum(), name


def test_effusion_brightens_the_lung_bases_on_the_reported_side(rows, images):
    means = np.array([costophrenic_means(image) for image in images])
    positive = labels_of(rows, "pleural effusion")
    feature = means.max(axis=1)
    assert auc(feature[positive], feature[~positive]) > 0.9
    assert feature[positive].mean() - feature[~positive].mean() > 0.15
    # Laterality: the report's side is the brighter base (patient right is image left).
    unilateral = 0
    for row, (right, left) in zip(rows, means):
        side = re.search(r"\b(right|left|bilateral)\b[^.]*(?:effusion|pleural fluid)", row["report"])
        if row["labels"]["pleural effusion"] and side and side.group(1) != "bilateral":
            assert (right > left) == (side.group(1) == "right"), row["report"]
            unilateral += 1
    assert unilateral >= 5


def test_cardiomegaly_widens_the_heart(rows, images):
    # Effusions blur the heart border into the lung bases, so compare hearts in effusion-free images.
    clear = ~labels_of(rows, "pleural effusion")
    enlarged = labels_of(rows, "cardiomegaly")
    assert (enlarged & clear).sum() >= 5 and (~enlarged & clear).sum() >= 5
    widths = np.array(
        [heart_and_thorax(image) if keep else (np.nan, np.nan) for image, keep in zip(images, clear)]
    )
    heart = widths[:, 0]
    assert heart[enlarged & clear].min() > heart[~enlarged & clear].max()
    # Drawn as 0.58-0.68 vs 0.36-0.44; thresholding the soft edges at 64 px reads them a little smaller.
    ratio = widths[:, 0] / widths[:, 1]
    assert np.median(ratio[enlarged & clear]) > 0.5
    assert np.median(ratio[~enlarged & clear]) < 0.45


def test_pneumothorax_shows_air_darker_than_lung(rows, images):
    positive = labels_of(rows, "pneumothorax")
    dark = np.array([dark_fraction(image) for image in images])
    assert auc(dark[positive], dark[~positive]) > 0.95
    assert np.median(dark[positive]) > 0.1 > np.median(dark[~positive])


# -- real report text: --reports iu_xray -------------------------------------------------------------------
def iu_xml(number: int, findings: str, impression: str) -> str:
    """The parts of an Open-I ecgen-radiology XML the reader uses (see tests/datasets/test_iu_xray.py)."""
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><uId id="CXR{number}"/><pmcId id="{number}"/>'
            f'<MedlineCitation><Article><Abstract><AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText></Abstract></Article></MedlineCitation>'
            f"<MeSH><major>normal</major></MeSH></eCitation>")


IU_REPORTS = {  # number: (findings, impression, the drawable findings the labeller reads)
    8002: ("Clear lung XXXX bilaterally. Heart size normal. No pneumothorax or pleural effusion.",
           "No acute disease.", {}),
    8003: ("Large left pleural effusion.", "Effusion.", None),  # odd: never read
    8004: ("The heart is enlarged. Small right pleural effusion.", "Cardiomegaly and effusion.",
           {"cardiomegaly": 1, "pleural effusion": 1}),
    8006: ("Rounded opacity in the right upper lobe may represent a nodule.", "Possible nodule.", {"nodule": -1}),
    8008: ("", "", {}),  # no text: skipped
    8010: ("Small apical pneumothorax on the left.", "Left pneumothorax.", {"pneumothorax": 1}),
}


def test_real_reports_pair_with_images_drawing_what_they_say(synthetic, tmp_path):
    folder = tmp_path / "openi" / "ecgen-radiology"
    folder.mkdir(parents=True)
    for number, (findings, impression, _) in IU_REPORTS.items():
        (folder / f"{number}.xml").write_text(iu_xml(number, findings, impression))
    rows = read_jsonl(synthetic.generate(tmp_path / "out", n=4, size=48, seed=1, reports="iu_xray",
                                         reports_source=tmp_path / "openi"))
    assert [row["report_id"] for row in rows] == [8002, 8004, 8006, 8010]  # even, with text, in order
    for index, row in enumerate(rows):
        findings, impression, read = IU_REPORTS[row["report_id"]]
        assert row["report"] == f"FINDINGS: {findings}\nIMPRESSION: {impression}"
        assert row["labels"] == {name: read.get(name, 0) for name in synthetic.FINDINGS}
        case, *_ = synthetic._make_sample(1, index, 48, synthetic.iu_reports(tmp_path / "openi")[index])
        assert case.labels == {name: read.get(name, 0) for name in synthetic.FINDINGS}  # what is drawn
    assert rows[2]["labels"]["nodule"] == -1  # "may represent", "possible": drawn, unknown for AUROC
    card = (tmp_path / "out" / "README.md").read_text()
    assert "even-numbered Indiana University" in card
    with pytest.raises(ValueError, match="n=5 but only 4 even-numbered IU reports"):
        synthetic.generate(tmp_path / "more", n=5, size=48, reports="iu_xray", reports_source=tmp_path / "openi")
    with pytest.raises(ValueError, match="reports must be one of"):
        synthetic.generate(tmp_path / "bad", n=2, size=48, reports="mimic")


def test_the_installed_iu_reports_feed_the_real_text_demo(synthetic):
    if importlib.util.find_spec("torchxrayvision") is None:  # never imported: installed without its dependencies
        pytest.skip("pip install --no-deps torchxrayvision (make install does)")
    reports = synthetic.iu_reports()
    assert len(reports) > 1900 and all(report.report_id % 2 == 0 for report in reports)
    counts = {name: sum(report.labels[name] == 1 for report in reports) for name in synthetic.FINDINGS}
    assert counts["cardiomegaly"] > 150 and counts["pleural effusion"] > 50 and counts["nodule"] > 50


def test_masks_cover_what_is_drawn(dataset, rows, images):
    """Each finding's mask (a PNG on the DICOM's pixel grid) is where the phantom drew it: inside it the image is
    brighter (fluid, heart, nodules) or darker (pneumothorax air) than in the 3-pixel band just above it (lung for
    an effusion's meniscus; below it lie the dense upper abdomen and diaphragm)."""
    from PIL import Image
    from scipy import ndimage

    seen = {name: 0 for name in MENTIONS}
    for row, image in zip(rows, images):
        drawn = {name for name, value in row["labels"].items() if value}
        assert set(row["masks"]) == drawn, row["study_id"]
        for name, relative in row["masks"].items():
            assert relative == f"masks/{row['study_id'][3:]}_{name.replace(' ', '_')}.png"
            mask = np.asarray(Image.open(dataset / relative))
            assert mask.shape == image.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
            inside = mask == 255
            above = ndimage.binary_dilation(inside, iterations=3) & (np.cumsum(inside, axis=0) == 0)
            assert inside.sum() >= 4 and above.any()
            contrast = image[inside].mean() - image[above].mean()
            if name == "pneumothorax":
                assert contrast < -0.2, (row["study_id"], name, contrast)
            else:
                assert contrast > 0.04, (row["study_id"], name, contrast)
            seen[name] += 1
    assert min(seen.values()) >= 5, seen
