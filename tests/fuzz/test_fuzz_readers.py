"""The readers on mutated real files: every outcome is an image or an mmvl DataError naming the file (for a
series folder: the folder or one of its slices), never another exception, a hang (10 s per input) or a dead
process. Targets: DICOM file, NIfTI, DICOM series folder, raster image. Bounded for CI (4,500 DICOM/NIfTI files,
about 20 s; 600 series folders and 1,000 raster files, about 5 s each); run
``python tests/fuzz/run_fuzz.py --minutes N`` for a long run."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import Reader, mutate, mutate_series, raster_seeds, seed_files, series_seeds, suffix_of

SEEDS = seed_files()
SERIES = series_seeds()
RASTER = raster_seeds()
OPERATIONS = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2**20), st.integers(0, 2**16)),
                      min_size=1, max_size=8)


@pytest.fixture(scope="module")
def reader():
    reader = Reader(timeout=10.0)
    yield reader
    reader.close()


def test_seed_files_found():
    assert len(SEEDS["dicom"]) >= 40, SEEDS["dicom"]
    assert len(SEEDS["nifti"]) >= 4, SEEDS["nifti"]


@pytest.mark.parametrize("kind", ["dicom", "nifti"])
def test_unmutated_seeds(reader, kind):
    """The seeds themselves: readable, or refused with a DataError (RGB, SR, deflated, 4D ...)."""
    outcomes = {path.name: reader.read(kind, path.read_bytes(), suffix_of(kind, path)) for path in SEEDS[kind]}
    bad = {name: o for name, o in outcomes.items() if o.status not in ("ok", "data_error")}
    assert not bad
    assert sum(o.status == "ok" for o in outcomes.values()) >= (10 if kind == "dicom" else 2)


@pytest.mark.parametrize("kind,examples", [("dicom", 3000), ("nifti", 1500)])
def test_mutated_files(reader, kind, examples):
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.sampled_from(SEEDS[kind]), operations=OPERATIONS)
    def check(seed, operations):
        outcome = reader.read(kind, mutate(seed.read_bytes(), operations), suffix_of(kind, seed))
        assert outcome.status in ("ok", "data_error"), f"{seed.name} {operations}: {outcome.status}\n{outcome.detail}"

    check()


def test_unmutated_series_and_raster_seeds_read(reader):
    for name, files in SERIES.items():
        assert reader.read("series", files, "_series").status == "ok", name
    for name, content in RASTER.items():
        assert reader.read("raster", content, suffix_of("raster", name)).status == "ok", name


def test_mutated_series_folders(reader):
    """A folder whose slices are mutated (one or two), one slice dropped, or one duplicated under a new name."""
    @settings(max_examples=600, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.sampled_from(sorted(SERIES)), target=st.integers(0, 7), folder_op=st.integers(0, 3),
           operations=OPERATIONS)
    def check(seed, target, folder_op, operations):
        outcome = reader.read("series", mutate_series(SERIES[seed], target, operations, folder_op), "_series")
        assert outcome.status in ("ok", "data_error"), (
            f"{seed} slice {target} folder_op {folder_op} {operations}: {outcome.status}\n{outcome.detail}")

    check()


def test_mutated_raster_images(reader):
    @settings(max_examples=1000, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.sampled_from(sorted(RASTER)), operations=OPERATIONS)
    def check(seed, operations):
        outcome = reader.read("raster", mutate(RASTER[seed], operations), suffix_of("raster", seed))
        assert outcome.status in ("ok", "data_error"), f"{seed} {operations}: {outcome.status}\n{outcome.detail}"

    check()


def test_regression_jp2_box_of_length_zero(reader):
    """Found by run_fuzz.py: a JP2 box of length 0 before the codestream made pydicom's JPEG 2000 header walk
    loop forever; it is now a DicomError."""
    seed = next(p for p in SEEDS["dicom"] if p.name == "GDCMJ2K_TextGBR.dcm")
    operations = [(1, 873683, 27996), (2, 401455, 24914), (4, 351703, 13258), (3, 483167, 61112),
                  (4, 540346, 42625), (4, 645916, 52844)]
    outcome = reader.read("dicom", mutate(seed.read_bytes(), operations), ".dcm")
    assert outcome.status == "data_error" and "JPEG 2000 box" in outcome.detail, outcome


@pytest.mark.parametrize("kind", ["dicom", "series", "raster"])
def test_harness_tells_hangs_crashes_and_wrong_errors_apart(monkeypatch, kind):
    """The outcomes the fuzz tests fail on are detected, for a file and for a folder of slices: a reader that
    sleeps, dies, raises a non-mmvl error or a DataError naming another file (a series may name its slice)."""
    import os
    import time

    from mmvl.errors import DataError
    from tests.fuzz import harness

    def misbehaving(path):
        if os.path.isdir(path):  # a series: the content of its one slice says what to do
            names = sorted(os.listdir(path))
            data = b"".join(open(os.path.join(path, name), "rb").read() for name in names)
            if data == b"slice":
                raise DataError(os.path.join(path, names[0]), "refused, naming the slice")
        else:
            data = open(path, "rb").read()
        if data == b"hang":
            time.sleep(60)
        elif data == b"crash":
            os._exit(3)
        elif data == b"wrong":
            raise ValueError("not an mmvl error")
        elif data == b"other":
            raise DataError("elsewhere.dcm", "names another file")
        elif data == b"bad":
            raise DataError(path, "refused")

    monkeypatch.setattr(harness, "READERS", {"dicom": misbehaving, kind: misbehaving})
    reader = harness.Reader(timeout=1.0)  # forks after the patch: the worker runs ``misbehaving``
    inputs = [b"fine", b"bad", b"hang", b"crash", b"wrong", b"other", b"fine"]
    expected = ["ok", "data_error", "hang", "crash", "wrong_error", "wrong_error", "ok"]
    if kind == "series":
        inputs, expected = [{"s0.dcm": data} for data in [*inputs, b"slice"]], [*expected, "data_error"]
    suffix = {"dicom": ".dcm", "series": "_series", "raster": ".png"}[kind]
    try:
        outcomes = [reader.read(kind, data, suffix).status for data in inputs]
    finally:
        reader.close()
    assert outcomes == expected
    assert reader.started == 3  # restarted after the hang and after the crash


def test_regression_nifti_affine_without_an_orientation(reader):
    """Found by run_fuzz.py (1.1 M inputs, 25 min): a sform whose third axis maps to no world direction made
    the orientation lookup raise TypeError; it is now a DataError naming the affine."""
    seed = next(p for p in SEEDS["nifti"] if p.name == "reoriented_anat_moved.nii")
    operations = [(2, 571732, 52691), (2, 745402, 21000), (1, 874755, 1861), (1, 342327, 2649)]
    outcome = reader.read("nifti", mutate(seed.read_bytes(), operations), ".nii")
    assert outcome.status == "data_error" and "degenerate or non-finite affine" in outcome.detail, outcome
