"""datasets/synthetic_ct.py: DICOM series and NIfTI agree voxel for voxel in world coordinates, determinism,
manifests and splits, reports against labels, findings visible where the reports say, no identifiers leak."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.affines import apply_affine
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

ROOT = Path(__file__).parents[2]
N_STUDIES = 12
SIZE = 48
SLICES = 24
SEED = 26  # a seed whose first 12 studies hold every label, orientation, InstanceNumber order and encoding
MANIFEST_KEYS = {"image", "report", "labels", "split", "study_id", "masks"}
IDENTIFIER_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StudyID",
)
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])

# What a report may call each finding, and the words that negate a sentence.
MENTIONS = {
    "lung nodule": r"nodul|mass\b",
    "pleural effusion": r"effusion|pleural fluid|fluid",
    "emphysema": r"emphysem|bulla|bullous",
    "cardiomegaly": r"cardiomegaly|heart is (?:\w+ )?enlarged|heart size is increased|enlarged heart",
    "consolidation": r"consolidation",
}
NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def synthetic_ct() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mmvl_datasets_synthetic_ct", ROOT / "datasets" / "synthetic_ct.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(synthetic_ct, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic_ct")
    manifests = synthetic_ct.generate_ct(out, n=N_STUDIES, size=SIZE, slices=SLICES, seed=SEED)
    assert manifests == {"nifti": out / "manifest_nifti.jsonl", "dicom": out / "manifest_dicom.jsonl"}
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def rows(dataset) -> dict[str, list[dict]]:
    return {name: read_jsonl(dataset / f"manifest_{name}.jsonl") for name in ("nifti", "dicom")}


@pytest.fixture(scope="module")
def studies(synthetic_ct) -> list:
    return [synthetic_ct.sample_study(SEED, index) for index in range(N_STUDIES)]


@pytest.fixture(scope="module")
def images(dataset, rows) -> list[nib.Nifti1Image]:
    return [nib.load(dataset / row["image"]) for row in rows["nifti"]]


@pytest.fixture(scope="module")
def series(dataset, rows) -> list[dict[str, list[pydicom.Dataset]]]:
    """Per study: SeriesInstanceUID -> its files (datasets carry their file name in ``filename``)."""
    folders = []
    for row in rows["dicom"]:
        groups = defaultdict(list)
        for path in sorted((dataset / row["image"]).iterdir()):
            ds = pydicom.dcmread(path)
            groups[ds.SeriesInstanceUID].append(ds)
        folders.append(dict(groups))
    return folders


def main_series(groups: dict[str, list[pydicom.Dataset]], row: dict) -> list[pydicom.Dataset]:
    return groups[row["series_uid"]] if "series_uid" in row else next(iter(groups.values()))


def dicom_volume(datasets: list[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray, list[pydicom.Dataset]]:
    """The intended reader, written independently of the generator: sort the slices by ImagePositionPatient along
    the normal of ImageOrientationPatient, rescale to HU; returns (HU [slice, row, column], LPS mm of every voxel
    centre [slice, row, column, 3], the sorted datasets)."""
    orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    row_cosines, column_cosines = orientation[:3], orientation[3:]
    normal = np.cross(row_cosines, column_cosines)
    ordered = sorted(datasets, key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ordered])
    positions = np.array([ds.ImagePositionPatient for ds in ordered], dtype=float)
    row_spacing, column_spacing = (float(v) for v in ordered[0].PixelSpacing)
    rows, columns = np.arange(hu.shape[1]), np.arange(hu.shape[2])
    world = (
        positions[:, None, None, :]
        + columns[None, None, :, None] * column_spacing * row_cosines
        + rows[None, :, None, None] * row_spacing * column_cosines
    )
    return hu, world, ordered


def nifti_values(image: nib.Nifti1Image, world_lps: np.ndarray, exact: bool = True) -> np.ndarray:
    """HU of the NIfTI voxels at scanner (LPS) points; with ``exact`` the points must be voxel centres, otherwise
    the nearest voxel is taken (NaN outside the volume)."""
    data = np.asanyarray(image.dataobj)
    ijk = apply_affine(np.linalg.inv(image.affine), world_lps * LPS_TO_RAS)
    index = np.rint(ijk).astype(int)
    if exact:
        np.testing.assert_allclose(ijk, index, atol=1e-3)
        return data[index[..., 0], index[..., 1], index[..., 2]]
    inside = np.all((index >= 0) & (index < data.shape), axis=-1)
    index = np.where(inside[..., None], index, 0)
    return np.where(inside, data[index[..., 0], index[..., 1], index[..., 2]], np.nan)


def body_points(study, points) -> np.ndarray:
    """Scanner (LPS) coordinates of points given in the study's body coordinates."""
    return np.asarray(study.centre) + np.asarray(points, dtype=float)


def labels_of(rows: list[dict], name: str) -> np.ndarray:
    return np.array([row["labels"][name] for row in rows], dtype=bool)


def sentences(report: str) -> list[str]:
    return [part for part in re.split(r"(?<=[.;])\s+|\n", report) if part.strip()]


def asserted(report: str, finding: str) -> bool:
    """True when a sentence names ``finding`` (or a synonym) without a negation."""
    pattern = re.compile(MENTIONS[finding], re.IGNORECASE)
    return any(pattern.search(sentence) and not NEGATION.search(sentence) for sentence in sentences(report))


# ---------------------------------------------------------------------------------------------------------
# Files and geometry
# ---------------------------------------------------------------------------------------------------------


def test_nifti_files_hold_int16_hu_with_a_scanner_affine(dataset, rows, images):
    slice_spacings, pixel_spacings = [], []
    for row, image in zip(rows["nifti"], images):
        raw = gzip.decompress((dataset / row["image"]).read_bytes())
        assert struct.unpack_from("<ff", raw, 112) == (1.0, 0.0)  # scl_slope, scl_inter
        assert image.get_data_dtype() == np.int16
        header = image.header
        assert int(header["qform_code"]) == int(header["sform_code"]) == 1
        np.testing.assert_allclose(image.get_qform(), image.affine, atol=1e-3)
        np.testing.assert_allclose(image.get_sform(), image.affine, atol=1e-4)
        assert header.get_xyzt_units()[0] == "mm"
        data = np.asanyarray(image.dataobj)
        assert data.shape[:2] == (SIZE, SIZE) and data.shape[2] >= 4
        assert -1024 <= data.min() and data.max() <= 3071
        assert (data < -950).mean() > 0.1 and (data > 400).any()  # air around the body, bone inside
        zooms = header.get_zooms()
        assert zooms[0] == pytest.approx(zooms[1])
        pixel_spacings.append(float(zooms[0]))
        slice_spacings.append(float(zooms[2]))
    # Spacing differs between studies, so a pipeline must resample.
    assert len({round(value, 3) for value in slice_spacings}) == N_STUDIES
    assert max(slice_spacings) / min(slice_spacings) > 2.5
    assert max(pixel_spacings) / min(pixel_spacings) > 1.1
    # 0.6-0.9 mm at 512 x 512 scaled to the matrix; 1.0-5.0 mm slices scaled so a 3 mm one gives SLICES slices.
    assert 0.6 * 512 / SIZE - 1e-3 <= min(pixel_spacings) and max(pixel_spacings) <= 0.9 * 512 / SIZE + 1e-3
    scale = 300.0 / (SLICES * 3.0)
    assert 1.0 * scale - 1e-3 <= min(slice_spacings) and max(slice_spacings) <= 5.0 * scale + 1e-3


def test_dicom_series_hold_the_nifti_voxels_after_sorting_by_position(dataset, rows, images, series):
    seen = defaultdict(set)
    for row, image, groups in zip(rows["dicom"], images, series):
        assert ("series_uid" in row) == (len(groups) == 2), row["image"]
        datasets = main_series(groups, row)
        for ds in datasets:
            assert Path(ds.filename).read_bytes()[128:132] == b"DICM"
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == CTImageStorage
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "CT" and ds.RescaleType == "HU" and float(ds.RescaleSlope) == 1.0
            assert (ds.BitsAllocated, ds.SamplesPerPixel, ds.HighBit) == (16, 1, ds.BitsStored - 1)
            assert str(ds.PatientName).startswith("SYNTH^CT^")
        hu, world, ordered = dicom_volume(datasets)
        # The slices are evenly spaced along the normal, one SliceThickness apart.
        normal = np.cross(*np.reshape(np.array(ordered[0].ImageOrientationPatient, dtype=float), (2, 3)))
        steps = np.diff([np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal) for ds in ordered])
        np.testing.assert_allclose(steps, float(ordered[0].SliceThickness), atol=1e-3)
        # Every DICOM voxel centre is a NIfTI voxel centre with the same HU, and together they are all of them.
        assert hu.size == np.asanyarray(image.dataobj).size
        np.testing.assert_array_equal(nifti_values(image, world), hu)
        np.testing.assert_array_equal(nifti_values(nib.as_closest_canonical(image), world), hu)

        # What makes this study hard to read naively.
        names = [Path(ds.filename).name for ds in ordered]
        assert names != sorted(names)
        numbers = tuple(int(ds.InstanceNumber) for ds in ordered)
        ascending = tuple(range(1, len(numbers) + 1))
        assert tuple(sorted(numbers)) == ascending
        seen["instance order"].add({ascending: "increasing", ascending[::-1]: "decreasing"}.get(numbers, "mixed"))
        row_cosines = np.array(ordered[0].ImageOrientationPatient[:3], dtype=float)
        if np.allclose(np.abs(normal), [0, 0, 1]):
            seen["orientation"].add(f"axial {ordered[0].PatientPosition} rows {row_cosines[0]:+.0f}")
        elif np.allclose(np.abs(normal), [0, 1, 0]):
            seen["orientation"].add("coronal")
        else:
            assert 5 < np.degrees(np.arccos(abs(normal[2]))) < 20
            seen["orientation"].add("oblique")
        seen["slices along the normal"].add(bool(np.dot(image.affine[:3, 2] * LPS_TO_RAS, normal) > 0))
        seen["encoding"].add(
            (int(ordered[0].PixelRepresentation), int(ordered[0].BitsStored), int(ordered[0].RescaleIntercept))
        )
    assert seen["instance order"] == {"increasing", "decreasing", "mixed"}
    assert seen["orientation"] == {"axial HFS rows +1", "axial FFS rows -1", "coronal", "oblique"}
    assert seen["slices along the normal"] == {True, False}
    assert seen["encoding"] == {(0, 12, -1024), (0, 16, -1024), (1, 16, 0), (1, 16, -1024)}


def test_foreign_localizer_series_shares_the_folder(rows, series):
    with_localizer = 0
    for row, groups in zip(rows["dicom"], series):
        datasets = [ds for group in groups.values() for ds in group]
        assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
        assert len({ds.StudyInstanceUID for ds in datasets}) == len({ds.FrameOfReferenceUID for ds in datasets}) == 1
        if "series_uid" not in row:
            continue
        with_localizer += 1
        (localizer,) = (group for uid, group in groups.items() if uid != row["series_uid"])
        assert len(localizer) == 2 and {int(ds.InstanceNumber) for ds in localizer} == {1, 2}
        assert all(ds.ImageType[2] == "LOCALIZER" for ds in localizer)
        main = groups[row["series_uid"]]
        assert (localizer[0].Rows, localizer[0].Columns) == (main[0].Rows, main[0].Columns)
        # A reader that does not group by series would stack non-parallel images into the volume.
        assert {tuple(ds.ImageOrientationPatient) for ds in localizer} != {tuple(main[0].ImageOrientationPatient)}
    assert with_localizer >= 1


# ---------------------------------------------------------------------------------------------------------
# Determinism, manifests, arguments, identifiers, CLI
# ---------------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_prefix_stable(synthetic_ct, tmp_path):
    def files(folder: Path) -> dict[Path, bytes]:
        return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}

    first = files(synthetic_ct.generate_ct(tmp_path / "a", n=3, size=32, slices=8, seed=5)["nifti"].parent)
    second = files(synthetic_ct.generate_ct(tmp_path / "b", n=3, size=32, slices=8, seed=5)["nifti"].parent)
    assert first == second
    volumes = [path for path in first if path.suffix == ".gz" and path.parts[0] == "nifti"]
    assert len(volumes) == 3 and sum(path.suffix == ".dcm" for path in first) >= 12
    listed = read_jsonl(tmp_path / "a" / "manifest_nifti.jsonl")
    assert {path for path in first if path.parts[0] == "masks"} == {
        Path(relative) for row in listed for relative in row["masks"].values()}

    # Study i does not depend on n; another seed gives other volumes.
    shorter = synthetic_ct.generate_ct(tmp_path / "short", n=2, size=32, slices=8, seed=5)
    for manifest in shorter.values():
        assert read_jsonl(manifest) == read_jsonl(tmp_path / "a" / manifest.name)[:2]
    assert files(tmp_path / "short" / "dicom" / "ct000001") == files(tmp_path / "a" / "dicom" / "ct000001")
    other = synthetic_ct.generate_ct(tmp_path / "c", n=1, size=32, slices=8, seed=6, formats=("nifti",))
    assert not (tmp_path / "c" / "dicom").exists() and set(other) == {"nifti"}
    assert (tmp_path / "c" / "nifti" / "ct000000.nii.gz").read_bytes() != first[Path("nifti/ct000000.nii.gz")]


def test_manifest_rows_and_splits(synthetic_ct, dataset, rows):
    nifti, dicom = rows["nifti"], rows["dicom"]
    assert len(nifti) == len(dicom) == N_STUDIES
    for index, (row, dicom_row) in enumerate(zip(nifti, dicom)):
        assert set(row) == MANIFEST_KEYS and set(dicom_row) - {"series_uid"} == MANIFEST_KEYS
        assert row["study_id"] == f"ct{index:06d}"
        assert row["image"] == f"nifti/ct{index:06d}.nii.gz" and (dataset / row["image"]).is_file()
        assert dicom_row["image"] == f"dicom/ct{index:06d}" and (dataset / dicom_row["image"]).is_dir()
        assert {key: value for key, value in dicom_row.items() if key not in ("image", "series_uid")} == {
            key: value for key, value in row.items() if key != "image"
        }
        assert set(row["labels"]) == set(synthetic_ct.FINDINGS) and set(row["labels"].values()) <= {0, 1}
    for name, format_rows in rows.items():
        by_split = {split: read_jsonl(dataset / f"{split}_{name}.jsonl") for split in ("train", "val", "test")}
        for split, part in by_split.items():
            assert part == [row for row in format_rows if row["split"] == split]
    assert sorted(row["split"] for row in nifti[:10]) == ["test"] + ["train"] * 8 + ["val"]
    for name in synthetic_ct.FINDINGS:
        assert 2 <= labels_of(nifti, name).sum() <= N_STUDIES - 2, name
    assert any(not any(row["labels"].values()) for row in nifti)
    assert (dataset / "README.md").read_text(encoding="utf-8").startswith("# Synthetic chest CT set")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n": 0}, "n must be"),
        ({"size": 16}, "size must be"),
        ({"slices": 2}, "slices must be"),
        ({"seed": -1}, "seed must be"),
        ({"formats": ("png",)}, "formats must be"),
    ],
)
def test_bad_arguments_raise(synthetic_ct, tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        synthetic_ct.generate_ct(tmp_path, **arguments)


def test_no_identifiers_outside_the_dicom_headers(dataset, rows, series):
    headers = [ds for groups in series for group in groups.values() for ds in group]
    identifiers = {str(ds.data_element(keyword).value) for ds in headers for keyword in IDENTIFIER_KEYWORDS}
    assert any(value.startswith("SYNTH^CT^") for value in identifiers)
    texts = {path.name: path.read_text(encoding="utf-8") for path in [*dataset.glob("*.jsonl"), dataset / "README.md"]}
    texts |= {
        row["image"]: gzip.decompress((dataset / row["image"]).read_bytes())[:352].decode("latin-1")
        for row in rows["nifti"]
    }
    for name, text in texts.items():
        leaked = sorted(value for value in identifiers if value in text)
        assert not leaked, f"{name} contains {leaked[:3]}"
    # Series UIDs appear only as the `series_uid` of the DICOM rows that need one.
    series_uids = {ds.SeriesInstanceUID for ds in headers}
    allowed = {row["series_uid"] for row in rows["dicom"] if "series_uid" in row}
    for name, text in texts.items():
        found = {uid for uid in series_uids if uid in text}
        assert found <= allowed and (not found or "dicom" in name), name


def test_cli_main_and_synthetic_kind_ct(synthetic_ct, tmp_path, capsys):
    synthetic_ct.main(
        ["--out", str(tmp_path / "main"), "--n", "2", "--size", "32", "--slices", "8", "--formats", "nifti"]
    )
    assert "studies written: 2" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "main" / "manifest_nifti.jsonl")) == 2
    assert not (tmp_path / "main" / "manifest_dicom.jsonl").exists()
    with pytest.raises(SystemExit):
        synthetic_ct.main(["--out", str(tmp_path / "bad"), "--size", "8"])

    # `python datasets/synthetic.py --kind ct` from the repository root, as the README tells users to run it.
    out = tmp_path / "kind_ct"
    command = [sys.executable, "datasets/synthetic.py", "--kind", "ct", "--out", str(out), "--n", "1", "--size", "32"]
    result = subprocess.run([*command, "--slices", "8"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert read_jsonl(out / "manifest_dicom.jsonl")[0]["image"] == "dicom/ct000000"
    assert (out / "nifti" / "ct000000.nii.gz").is_file()


# ---------------------------------------------------------------------------------------------------------
# Reports and findings
# ---------------------------------------------------------------------------------------------------------


def test_reports_agree_with_labels(synthetic_ct, rows, studies):
    for row, study in zip(rows["nifti"], studies):
        report = row["report"]
        assert "FINDINGS:" in report and "IMPRESSION:" in report
        assert row["labels"] == study.labels
        for name, positive in row["labels"].items():
            assert asserted(report, name) == bool(positive), (name, report)
        findings = report.split("FINDINGS:")[1].split("IMPRESSION:")[0]
        for nodule in study.nodules:  # size and lobe of every nodule
            assert f"{nodule.diameter_mm:.0f} mm" in findings and nodule.lobe in findings, report
        if study.effusion_side:
            effusion = next(s for s in sentences(findings) if re.search(MENTIONS["pleural effusion"], s))
            side = "bilateral|both" if study.effusion_side == "bilateral" else study.effusion_side
            assert re.search(side, effusion), report
        if study.consolidation is not None:
            assert study.consolidation.lobe in findings, report
        if not any(row["labels"].values()):
            assert re.search(r"\bno\b|normal", report.split("IMPRESSION:")[1], re.IGNORECASE), report


def test_nodules_are_soft_tissue_blobs_inside_lung(rows, studies, images):
    """Image-only detector: voxels above -600 HU with aerated lung (below -650 HU) at 24 or more of their 26
    neighbours about 26 mm away. Nodules are such blobs; normal lung, hila, domes and mediastinum give none."""
    for row, study, image in zip(rows["nifti"], studies, images):
        data = np.asanyarray(image.dataobj).astype(np.float32)
        zooms = np.array(image.header.get_zooms()[:3])
        pad = 6
        padded = np.pad(data, pad)
        aerated = np.zeros(data.shape, int)
        for direction in np.ndindex(3, 3, 3):
            if direction == (1, 1, 1):
                continue
            unit = (np.array(direction) - 1.0) / np.linalg.norm(np.array(direction) - 1.0)
            offset = np.rint(26.0 * unit / zooms)
            offset = np.clip(np.where((unit != 0) & (offset == 0), np.sign(unit), offset), -pad, pad).astype(int)
            aerated += padded[tuple(slice(pad + o, pad + o + n) for o, n in zip(offset, data.shape))] < -650
        blobs = int(((data > -600) & (aerated >= 24)).sum())
        if row["labels"]["lung nodule"]:
            assert blobs >= 1, row["study_id"]
            for nodule in study.nodules:
                assert nifti_values(image, body_points(study, nodule.centre), exact=False) > -400, nodule
        elif not row["labels"]["consolidation"]:  # a consolidation's edge can leave a sliver in lung
            assert blobs == 0, row["study_id"]


def test_effusions_are_dependent_fluid_on_the_reported_side(synthetic_ct, rows, studies, images):
    """Mean HU of the posterior, basal part of each pleural space: fluid (about 10 HU) instead of lung."""
    wet, dry = [], []
    for row, study, image in zip(rows["nifti"], studies, images):
        if row["labels"]["consolidation"]:  # a dependent consolidation is as dense as fluid
            continue
        for side in ("right", "left"):
            cx, cy, half_width, half_depth = synthetic_ct._hemithorax_frame(study, side)
            top = study.dome_right if side == "right" else study.dome_left
            angle, radius, height = np.meshgrid(
                np.radians(np.linspace(60, 120, 7)), np.linspace(0.7, 0.92, 4), np.linspace(10, 50, 5)
            )
            posterior = [
                cx + radius * half_width * np.cos(angle),
                cy + radius * half_depth * np.sin(angle),
                top + height,
            ]
            mean = float(np.nanmean(nifti_values(image, body_points(study, np.stack(posterior, -1)), exact=False)))
            (wet if study.effusion_side in (side, "bilateral") else dry).append(mean)
    assert len(wet) >= 2 and len(dry) >= 8
    assert min(wet) > -400 > max(dry)


def test_emphysema_raises_the_low_attenuation_area(rows, studies, images):
    """LAA-950: the fraction of lung voxels (below -600 HU inside the ribs) under -950 HU."""
    laa = []
    for study, image in zip(studies, images):
        data = np.asanyarray(image.dataobj)
        ijk = np.stack(np.meshgrid(*map(np.arange, data.shape), indexing="ij"), -1)
        body = apply_affine(image.affine, ijk) * LPS_TO_RAS - np.asarray(study.centre)
        inside = (body[..., 0] / study.cavity_a) ** 2 + (body[..., 1] / study.cavity_b) ** 2 < 0.9
        lung = inside & (data < -600) & (body[..., 2] > study.dome_left) & (body[..., 2] < study.apex_z)
        laa.append(float((data[lung] < -950).mean()))
    laa = np.array(laa)
    positive = labels_of(rows["nifti"], "emphysema")
    assert laa[positive].min() > 0.03 > 0.01 > laa[~positive].max()


def test_cardiomegaly_widens_the_heart(rows, studies, images):
    """Width of the non-lung run through the heart's centre, left to right, over the inner thoracic width."""
    ratios = []
    for study, image in zip(studies, images):
        hx, hy, hz = study.heart_centre
        x = np.arange(-1.05 * study.cavity_a, 1.05 * study.cavity_a, 1.0)
        line = np.stack([x, np.full_like(x, hy), np.full_like(x, hz)], -1)
        lung = nifti_values(image, body_points(study, line), exact=False) < -500
        centre = left = right = int(np.argmin(np.abs(x - hx)))
        assert not lung[centre]
        while left > 0 and not lung[left - 1]:
            left -= 1
        while right < len(x) - 1 and not lung[right + 1]:
            right += 1
        ratios.append((x[right] - x[left]) / (2 * study.cavity_a))
    ratios = np.array(ratios)
    clear = ~labels_of(rows["nifti"], "consolidation")  # consolidation next to the heart widens the run
    enlarged = labels_of(rows["nifti"], "cardiomegaly")
    assert (enlarged & clear).sum() >= 1 and (~enlarged & clear).sum() >= 5
    assert ratios[enlarged].min() > 0.58 > ratios[~enlarged & clear].max()


def test_consolidation_is_soft_tissue_density_in_the_reported_lobe(rows, studies, images):
    for row, study, image in zip(rows["nifti"], studies, images):
        if not row["labels"]["consolidation"]:
            assert study.consolidation is None
            continue
        (x, y, z), radii = study.consolidation.centre, study.consolidation.radii
        assert study.consolidation.side == ("right" if x < 0 else "left")
        offsets = np.array([[0, 0, 0], [8, 0, 0], [-8, 0, 0], [0, 8, 0], [0, -8, 0]], dtype=float)
        values = nifti_values(image, body_points(study, np.add((x, y, z), offsets)), exact=False)
        assert np.nanmedian(values) > -200 and min(radii) >= 24, row["study_id"]


def test_masks_lie_on_what_is_drawn_in_the_volumes_geometry(dataset, rows, images):
    """Each finding's mask is a uint8 NIfTI with the volume's shape and affine, present exactly for the drawn
    findings, and the HU inside it are the finding's: soft tissue for nodules, heart and consolidation, fluid for
    effusions, near air for bullae."""
    expected = {"lung nodule": (-300, 120), "pleural effusion": (-150, 80), "cardiomegaly": (-60, 100),
                "consolidation": (-250, 100), "emphysema": (-1100, -800)}  # mean HU inside; edges blur partly
    seen = set()
    for row, dicom_row, image in zip(rows["nifti"], rows["dicom"], images):
        assert dicom_row["masks"] == row["masks"]
        assert set(row["masks"]) == {name for name, value in row["labels"].items() if value}, row["study_id"]
        data = np.asanyarray(image.dataobj).astype(np.float32)
        for name, relative in row["masks"].items():
            mask_image = nib.load(dataset / relative)
            assert np.allclose(mask_image.affine, image.affine) and mask_image.shape == image.shape
            mask = np.asanyarray(mask_image.dataobj)
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
            assert mask.sum() >= 3, (row["study_id"], name)
            low, high = expected[name]
            assert low < data[mask == 1].mean() < high, (row["study_id"], name, data[mask == 1].mean())
            seen.add(name)
    assert seen == set(expected)
