"""3D MONAI pipelines, the preprocessing spec round trip (2D and 3D), and cached vs uncached datasets."""

from __future__ import annotations

import json

import nibabel
import numpy as np
import pytest

from mmvl.data.datasets import ManifestDataset
from mmvl.data.transforms import Pipeline, load_preprocess, save_preprocess

EVAL_3D = [
    dict(type="LoadVolume", modalities=("CT",)),
    dict(type="Orient", axcodes="RAS"),
    dict(type="Resample", spacing=(1.5, 1.5, 3.0)),
    dict(type="IntensityWindow", low=-1000.0, high=1000.0),
    dict(type="CropOrPad", size=(8, 8, 6)),
    dict(type="Normalize", mean=0.5, std=0.25),
]
TRAIN_3D = EVAL_3D[:-1] + [dict(type="RandomAugment3D", rotate=15.0, scale=0.1), EVAL_3D[-1]]
EVAL_2D = [dict(type="LoadImage"), dict(type="ResizePad", size=16), dict(type="Normalize", mean=0.5, std=0.25)]
TRAIN_2D = EVAL_2D[:2] + [dict(type="RandomAugment2D")] + EVAL_2D[2:]


@pytest.fixture
def ct_study(tmp_path, ct_series):
    """One oblique CT study as a DICOM series and as NIfTI with the same voxels and world coordinates."""
    write, phantom = ct_series
    hu = phantom((12, 10, 8))
    series = write(tmp_path / "series", hu, row_dir=(1, 0, 0), col_dir=(0, 0.9659258, -0.2588190))
    nibabel.save(nibabel.Nifti1Image(hu, series["affine"]), tmp_path / "volume.nii.gz")
    return tmp_path / "series", tmp_path / "volume.nii.gz", hu


def test_series_and_nifti_give_the_same_tensor(ct_study):
    series, nifti, _ = ct_study
    from_series = Pipeline(EVAL_3D[:1] + EVAL_3D[1:])(series)
    from_nifti = Pipeline([dict(type="LoadVolume")] + EVAL_3D[1:])(nifti)
    assert from_series["image"].shape == (1, 8, 8, 6) and from_series["image"].dtype == np.float32
    np.testing.assert_allclose(from_series["image"], from_nifti["image"], atol=1e-4)
    assert from_series["meta"]["orientation"] == "RAS"
    assert from_series["meta"]["spacing"] == pytest.approx([1.5, 1.5, 3.0])


def test_hu_window_maps_to_unit_range(ct_study):
    series, _, hu = ct_study
    out = Pipeline([dict(type="LoadVolume"), dict(type="IntensityWindow", low=-500.0, high=300.0)])(series)
    expected = np.clip((hu - -500.0) / 800.0, 0, 1)
    np.testing.assert_allclose(out["image"][0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="must exceed"):
        Pipeline([dict(type="LoadVolume"), dict(type="IntensityWindow", low=10, high=0)])


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_spec_saved_as_json_rebuilds_the_identical_pipeline(tmp_path, kind, ct_study, make_dicom):
    if kind == "3d":
        spec, source = EVAL_3D, ct_study[0]
    else:
        spec = EVAL_2D
        source = make_dicom("x.dcm", np.random.default_rng(0).integers(0, 4000, (20, 13)).astype(np.uint16))
    training_time = Pipeline(spec)(source)["image"]
    save_preprocess(tmp_path / "preprocess.json", spec)
    payload = json.loads((tmp_path / "preprocess.json").read_text())
    assert payload["input"] == kind and payload["pipeline"] == json.loads(json.dumps(spec))
    rebuilt = load_preprocess(tmp_path / "preprocess.json")(source)["image"]
    np.testing.assert_array_equal(training_time, rebuilt)


def test_3d_augmentation_is_seeded(ct_study):
    series, _, _ = ct_study
    pipeline = Pipeline(TRAIN_3D)
    first, again, other = pipeline(series, seed=1), pipeline(series, seed=1), pipeline(series, seed=2)
    np.testing.assert_array_equal(first["image"], again["image"])
    assert first["image"].shape == other["image"].shape == (1, 8, 8, 6)
    assert not np.array_equal(first["image"], other["image"])
    assert pipeline.split == 5 and pipeline.kind == "3d"


def _manifest(tmp_path, sources, name="m.jsonl"):
    rows = [{"image": str(s), "report": f"FINDINGS: case {i}.", "split": "train", "study_id": f"s{i}"}
            for i, s in enumerate(sources)]
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / name


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_cached_datasets_match_uncached(tmp_path, kind, ct_study, make_dicom, monkeypatch):
    if kind == "3d":
        nifti = ct_study[1]
        sources = [ct_study[0], nifti]
        spec = TRAIN_3D
    else:
        rng = np.random.default_rng(1)
        sources = [make_dicom(f"{i}.dcm", rng.integers(0, 4000, (20, 13)).astype(np.uint16)) for i in range(3)]
        spec = TRAIN_2D
    manifest = _manifest(tmp_path, sources)
    plain = ManifestDataset(manifest, spec)
    memory = ManifestDataset(manifest, spec, cache="memory")
    disk = ManifestDataset(manifest, spec, cache="disk", cache_dir=tmp_path / "cache")
    expected = [plain[(index, 7)]["image"] for index in range(len(sources))]
    for index in range(len(sources)):
        for dataset in (memory, disk):
            np.testing.assert_array_equal(dataset[(index, 7)]["image"], expected[index])
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(sources)
    memory[(0, 7)]["image"].add_(100.0)  # a caller writing into an item must not change the cache
    np.testing.assert_array_equal(memory[(0, 7)]["image"], expected[0])
    evaluating = ManifestDataset(manifest, spec[: Pipeline(spec).split], cache="memory")
    evaluating[0]["image"].add_(100.0)
    np.testing.assert_array_equal(evaluating[0]["image"], plain.load(0)["image"].numpy())

    # a second run reads the disk cache without touching the files
    import mmvl.data.io
    import mmvl.data.volume

    def refuse(*args, **kwargs):
        raise AssertionError("read a file despite the cache")

    monkeypatch.setattr(mmvl.data.volume, "read_volume", refuse)
    monkeypatch.setattr(mmvl.data.io, "read_image", refuse)
    monkeypatch.setattr("mmvl.data.transforms.read_image", refuse)
    again = ManifestDataset(manifest, spec, cache="disk", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again[(0, 7)]["image"], expected[0])


def test_disk_cache_misses_after_the_file_changes(tmp_path, make_dicom):
    path = make_dicom("a.dcm", np.full((8, 8), 100, dtype=np.uint16), WindowCenter=500, WindowWidth=1000)
    manifest = _manifest(tmp_path, [path])
    before = ManifestDataset(manifest, EVAL_2D, cache="disk", cache_dir=tmp_path / "cache")[0]["image"]
    make_dicom("a.dcm", np.full((8, 8), 900, dtype=np.uint16), WindowCenter=500, WindowWidth=1000)
    after = ManifestDataset(manifest, EVAL_2D, cache="disk", cache_dir=tmp_path / "cache")[0]["image"]
    assert not np.array_equal(before, after)


def test_cache_records_bad_files_and_skips_them(tmp_path, make_dicom):
    good = make_dicom("good.dcm", np.ones((8, 8), dtype=np.uint16))
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    manifest = _manifest(tmp_path, [good, bad])
    for cache in ("memory", "disk"):
        dataset = ManifestDataset(manifest, EVAL_2D, cache=cache, cache_dir=tmp_path / cache, on_error="skip")
        assert "image" in dataset[0]
        skipped = dataset[1]["skipped"]
        assert skipped["path"] == str(bad) and "bad.dcm" in skipped["reason"] and skipped["index"] == 1
    with pytest.raises(ValueError, match="cache must be one of"):
        ManifestDataset(manifest, EVAL_2D, cache="ssd")
