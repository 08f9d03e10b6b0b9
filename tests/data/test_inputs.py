"""mmvl.data.inputs: every file and folder under an input is a scan or an error row (nested series folders,
NIfTI beside them, several series in one folder, DICOMDIR exports), and reader options given at inference."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet

from mmvl.data.inputs import find_inputs, parse_reader_options, with_reader_options
from mmvl.data.transforms import Pipeline
from mmvl.errors import ConfigError, DataError
from tests.conftest import make_phantom, write_ct_series, write_dicom


def _nifti(path: Path, shape=(12, 10, 6)) -> Path:
    nibabel.save(nibabel.Nifti1Image(make_phantom(shape), np.diag([0.8, 0.7, 2.5, 1.0])), str(path))
    return path


def write_exam_tree(root: Path) -> Path:
    """``series_a/`` and ``series_b/`` (DICOM slice folders of 6 and 5 slices), ``ct3.nii.gz``, a stray DICOM at
    the top, a text file, and ``more/`` holding a third series (4 slices) beside a NIfTI file."""
    write_ct_series(root / "series_a", make_phantom((12, 10, 6), seed=1), seed=1)
    write_ct_series(root / "series_b", make_phantom((12, 10, 5), seed=2), seed=2)
    _nifti(root.joinpath("ct3.nii.gz"))
    write_dicom(root / "stray.dcm", np.zeros((8, 8), np.uint16))
    (root / "notes.txt").write_text("not an image\n")
    write_ct_series(root / "more" / "series_c", make_phantom((12, 10, 4), seed=3), seed=3)
    _nifti(root / "more" / "ct4.nii")
    return root


@pytest.fixture
def exam_tree(tmp_path) -> Path:
    return write_exam_tree(tmp_path / "exam")


def _rows(items, root: Path) -> dict[str, str | None]:
    return {Path(item.path).relative_to(root).as_posix(): item.error for item in items}


def test_a_3d_model_finds_every_series_and_nifti_and_reports_the_rest(exam_tree):
    rows = _rows(find_inputs([exam_tree], volumes=True), exam_tree)
    scans = sorted(name for name, error in rows.items() if error is None)
    assert scans == ["ct3.nii.gz", "more/ct4.nii", "more/series_c", "series_a", "series_b"]
    assert len(rows) == 7  # five scans, two error rows: nothing seen is left out
    assert "single DICOM slice" in rows["stray.dcm"]
    assert rows["notes.txt"].startswith("unsupported kind: not a DICOM")
    # the series found read as volumes with their own slice counts
    pipeline = Pipeline([dict(type="LoadVolume")])
    assert [pipeline(exam_tree / name)["image"].shape[-1] for name in ("series_a", "series_b", "more/series_c")] \
        == [6, 5, 4]


def test_a_2d_model_lists_every_file_with_its_reason(exam_tree):
    items = find_inputs([exam_tree])
    assert len(items) == 6 + 5 + 4 + 4  # 15 slices, the stray DICOM, two NIfTI files and the text file
    errors = [item.error for item in items if item.error]
    assert len(errors) == 3 and sum("3D volume (NIfTI)" in e for e in errors) == 2


def test_several_series_in_one_folder_are_one_input_each(tmp_path):
    first = write_ct_series(tmp_path / "mixed", make_phantom((12, 10, 6), seed=1), seed=1)
    second = write_ct_series(tmp_path / "mixed", make_phantom((12, 10, 4), seed=2), seed=2)
    items = find_inputs([tmp_path / "mixed"], volumes=True)
    assert sorted(item.fields["series_uid"] for item in items) == sorted([first["series_uid"], second["series_uid"]])
    pipeline = Pipeline([dict(type="LoadVolume")])
    depths = {item.fields["series_uid"]: pipeline(item.path, **item.fields)["image"].shape[-1] for item in items}
    assert depths == {first["series_uid"]: 6, second["series_uid"]: 4}


def write_dicomdir_export(source: Path, out: Path, depths=(6, 5)) -> list[dict]:
    """A CD/PACS export: series written by ``FileSet.add`` + ``write`` (PTxxxxxx/STxxxxxx/SExxxxxx/IMxxxxxx with a
    DICOMDIR at the top)."""
    series = [write_ct_series(source / f"s{i}", make_phantom((12, 10, depth), seed=i), seed=i)
              for i, depth in enumerate(depths)]
    file_set = FileSet()
    for number, written in enumerate(series, 1):
        for path in written["paths"]:
            ds = pydicom.dcmread(path)
            ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
            ds.SeriesNumber = number
            file_set.add(ds)
    file_set.write(out)
    return series


def test_a_dicomdir_export_is_read_for_its_series(tmp_path):
    series = write_dicomdir_export(tmp_path / "source", tmp_path / "cd")
    assert (tmp_path / "cd" / "DICOMDIR").is_file()
    volumes = find_inputs([tmp_path / "cd"], volumes=True)
    assert len(volumes) == 2 and not any(item.error for item in volumes)
    assert sorted(item.fields["series_uid"] for item in volumes) == sorted(s["series_uid"] for s in series)
    pipeline = Pipeline([dict(type="LoadVolume")])
    assert sorted(pipeline(item.path, **item.fields)["image"].shape[-1] for item in volumes) == [5, 6]
    # the DICOMDIR file given itself, and a 2D model: one input per image, the index is no row of its own
    assert len(find_inputs([tmp_path / "cd" / "DICOMDIR"], volumes=True)) == 2
    images = find_inputs([tmp_path / "cd"])
    assert len(images) == 11 and not any(item.error for item in images)
    assert not any(Path(item.path).name == "DICOMDIR" for item in images)


def test_a_damaged_dicomdir_and_an_empty_folder_are_error_rows(tmp_path):
    write_dicom(tmp_path / "cd" / "DICOMDIR", np.zeros((4, 4), np.uint16))  # a DICOM file, but no index
    (tmp_path / "empty").mkdir()
    rows = find_inputs([tmp_path / "cd", tmp_path / "empty"], volumes=True)
    assert len(rows) == 2 and "DICOMDIR cannot be read" in rows[0].error
    assert rows[1].error.startswith("no scans found in this folder")


def test_reader_options_override_the_recorded_reader(tmp_path):
    written = write_ct_series(tmp_path / "gapped", make_phantom((12, 10, 8)), instance_order="position")
    written["paths"][3].unlink()  # one slice missing in the middle
    pipeline = Pipeline([dict(type="LoadVolume")])
    with pytest.raises(DataError, match="missing slice"):
        pipeline(tmp_path / "gapped")
    allowed = with_reader_options(pipeline, parse_reader_options(["allow_gaps=true"]))
    assert allowed.spec[0] == {"type": "LoadVolume", "allow_gaps": True}
    assert allowed(tmp_path / "gapped")["image"].shape[-1] == 8  # the missing slice interpolated
    assert with_reader_options(pipeline, {}) is pipeline
    with pytest.raises(ConfigError, match="Did you mean 'allow_gaps'"):
        with_reader_options(pipeline, {"allow_gap": True})
    assert parse_reader_options(["modalities=[\"CT\"]", "voi=linear"]) == {"modalities": ["CT"], "voi": "linear"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_reader_options(["allow_gaps"])
