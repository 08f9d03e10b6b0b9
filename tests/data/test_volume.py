"""3D readers: DICOM series assembly (order, geometry, HU, gaps, foreign series) and NIfTI, against independent
computations with pydicom and nibabel; MONAI's PydicomReader compared where it is right and where it is not."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from mmvl.data.transforms import Pipeline
from mmvl.data.volume import read_dicom_series, read_nifti, read_volume
from mmvl.errors import DataError, DicomError

NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
OBLIQUE = (0.0, np.cos(np.deg2rad(15)), -np.sin(np.deg2rad(15)))


@pytest.mark.parametrize(
    "row_dir, col_dir, order",
    [((1, 0, 0), (0, 1, 0), "reversed"),  # axial, InstanceNumber against position
     ((1, 0, 0), (0, 0, -1), "shuffled"),  # coronal
     ((1, 0, 0), OBLIQUE, "shuffled")],  # axial tilted by 15 degrees
    ids=["axial", "coronal", "oblique"],
)
def test_series_assembled_by_position_with_foreign_series(tmp_path, row_dir, col_dir, order, ct_series):
    write_ct_series, phantom = ct_series
    hu = phantom()
    series = write_ct_series(tmp_path / "s", hu, row_dir=row_dir, col_dir=col_dir, instance_order=order)
    write_ct_series(tmp_path / "s", phantom((12, 10, 2), seed=1), seed=7, SeriesDescription="scout")  # foreign
    (tmp_path / "s" / "notes.txt").write_text("not dicom")
    volume, meta = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(volume, hu)
    np.testing.assert_allclose(meta["affine"], series["affine"], atol=1e-6)
    assert meta["spacing"] == pytest.approx([0.8, 0.7, 2.5])
    assert meta["n_slices"] == 8 and meta["other_series"] == 1 and meta["units"] == "HU"
    assert meta["orientation"] == "".join(nibabel.aff2axcodes(series["affine"]))
    chosen, _ = read_dicom_series(tmp_path / "s", series_uid=series["series_uid"])
    np.testing.assert_array_equal(chosen, hu)


def test_series_hu_matches_pydicom_per_slice(tmp_path, ct_series):
    """Each slice's own rescale applies; checked slice by slice against pydicom's modality LUT."""
    write_ct_series, phantom = ct_series
    from pydicom.pixels import apply_modality_lut

    series = write_ct_series(tmp_path / "s", phantom(), instance_order="position")
    slope_path = series["paths"][3]
    ds = pydicom.dcmread(slope_path)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -3000
    ds.save_as(slope_path)
    volume, _ = read_dicom_series(tmp_path / "s")
    for k, path in enumerate(series["paths"]):
        ds = pydicom.dcmread(path)
        np.testing.assert_allclose(volume[:, :, k], apply_modality_lut(ds.pixel_array, ds).T)


def test_world_coordinates_agree_with_monai_pydicom_reader_on_a_well_ordered_series(tmp_path, ct_series):
    """Where MONAI's reader is right (InstanceNumber follows position, axial, one series), we agree with it."""
    write_ct_series, phantom = ct_series
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    hu = phantom()
    write_ct_series(tmp_path / "s", hu, instance_order="position", origin=(5.0, -3.0, 12.0))
    ours, meta = read_dicom_series(tmp_path / "s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai = LoadImage(reader=PydicomReader(), image_only=True)(str(tmp_path / "s"))
    np.testing.assert_array_equal(np.asarray(monai), hu)
    np.testing.assert_allclose(meta["affine"], np.asarray(monai.affine), atol=1e-5)


@pytest.mark.parametrize("limit", [None, 10])
def test_series_padding_becomes_the_lowest_tissue_value(tmp_path, ct_series, limit):
    """(0028,0120) PixelPaddingValue (and a (0028,0121) range) in stored units: those voxels take the lowest value
    of the others, computed here with numpy, instead of a modality-LUT value far below air."""
    write_ct_series, phantom = ct_series
    hu = phantom()
    corner = np.zeros(hu.shape, bool)
    corner[:3, :2, :] = True  # outside the scanned field of view, on every slice
    hu[corner] = -2048 + (np.arange(corner.sum()) % 11 if limit else 0)  # stored 0 (.. 10): the writer adds 2048
    write_ct_series(tmp_path / "s", hu, PixelPaddingValue=0, **({"PixelPaddingRangeLimit": limit} if limit else {}))
    volume, meta = read_dicom_series(tmp_path / "s")
    expected = hu.copy()
    expected[corner] = hu[~corner].min()
    np.testing.assert_array_equal(volume, expected)
    assert {"op": "mask_padding", "voxels": int(corner.sum()), "value": float(hu[~corner].min())} \
        in meta["preprocessing"]


def test_monai_pydicom_reader_orders_by_instance_number(tmp_path, ct_series):
    """Why mmvl assembles series itself: MONAI's reader stacks by InstanceNumber, so a series numbered
    against its positions comes out with scrambled slices. (If MONAI fixes this, switch to it.)"""
    write_ct_series, phantom = ct_series
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    hu = phantom()
    write_ct_series(tmp_path / "s", hu, instance_order="shuffled", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai = np.asarray(LoadImage(reader=PydicomReader(), image_only=True)(str(tmp_path / "s")))
    assert monai.shape == hu.shape and not np.array_equal(monai, hu)
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "s")[0], hu)


def test_gaps_duplicates_and_inconsistent_series(tmp_path, ct_series):
    write_ct_series, phantom = ct_series
    hu = phantom()
    series = write_ct_series(tmp_path / "gap", hu, instance_order="position")
    series["paths"][4].unlink()
    with pytest.raises(DicomError, match="1 missing slice"):
        read_dicom_series(tmp_path / "gap")
    volume, meta = read_dicom_series(tmp_path / "gap", allow_gaps=True)
    assert volume.shape == hu.shape and meta["gaps"][0]["missing_slices"] == 1
    np.testing.assert_allclose(volume[:, :, 4], (hu[:, :, 3] + hu[:, :, 5]) / 2)
    np.testing.assert_array_equal(volume[:, :, 5:], hu[:, :, 5:])

    series = write_ct_series(tmp_path / "dup", hu)
    shutil.copy(series["paths"][2], tmp_path / "dup" / "copy.dcm")
    ds = pydicom.dcmread(tmp_path / "dup" / "copy.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "dup" / "copy.dcm")
    with pytest.raises(DicomError, match="same position"):
        read_dicom_series(tmp_path / "dup")

    series = write_ct_series(tmp_path / "shape", hu)
    ds = pydicom.dcmread(series["paths"][1])
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(series["paths"][1])
    with pytest.raises(DicomError, match="PixelSpacing differs") as err:
        read_dicom_series(tmp_path / "shape")
    assert str(series["paths"][1]) in str(err.value)

    series = write_ct_series(tmp_path / "uneven", hu, instance_order="position")
    ds = pydicom.dcmread(series["paths"][5])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                               float(ds.ImagePositionPatient[2]) - 1.0]
    ds.save_as(series["paths"][5])
    with pytest.raises(DicomError, match="inconsistent slice spacing"):
        read_dicom_series(tmp_path / "uneven", allow_gaps=True)


def test_series_errors_name_the_problem(tmp_path, ct_series):
    write_ct_series, phantom = ct_series
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="no DICOM image files"):
        read_dicom_series(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        read_volume(tmp_path / "missing.nii.gz")
    series = write_ct_series(tmp_path / "mr", phantom(), modality="MR")
    with pytest.raises(DicomError, match="modality 'MR' but this pipeline expects \\['CT'\\]"):
        read_dicom_series(tmp_path / "mr", modalities=["CT"])
    with pytest.raises(DicomError, match="series_uid 1.2.3 not found"):
        read_dicom_series(tmp_path / "mr", series_uid="1.2.3")
    ds = pydicom.dcmread(series["paths"][0])
    del ds.ImagePositionPatient
    ds.save_as(series["paths"][0])
    with pytest.raises(DicomError, match="lacks ImagePositionPatient") as err:
        read_dicom_series(tmp_path / "mr")
    assert str(series["paths"][0]) in str(err.value)
    write_ct_series(tmp_path / "two", phantom(), seed=1)
    write_ct_series(tmp_path / "two", phantom(), seed=2)
    with pytest.raises(DicomError, match="2 series of equal size"):
        read_dicom_series(tmp_path / "two")
    truncated = write_ct_series(tmp_path / "cut", phantom())["paths"][2]
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(DicomError) as err:
        read_dicom_series(tmp_path / "cut")
    assert str(truncated) in str(err.value)


def test_bundled_ct_slice_reads_as_hounsfield_units(tmp_path):
    from pydicom.pixels import apply_modality_lut

    shutil.copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / "CT_small.dcm")
    volume, meta = read_volume(tmp_path)
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32).T
    np.testing.assert_array_equal(volume[:, :, 0], expected)
    assert volume.shape == (128, 128, 1) and meta["modality"] == "CT"
    assert -1100 < volume.min() < 0 < volume.max() < 3000  # air to bone
    assert meta["spacing"][:2] == pytest.approx([0.661468, 0.661468])
    assert meta["orientation"] == "".join(nibabel.aff2axcodes(np.asarray(meta["affine"])))


def test_nifti_matches_nibabel_and_reorients_to_ras():
    path = NIBABEL_DATA / "anatomical.nii"
    volume, meta = read_nifti(path)
    img = nibabel.load(path)
    np.testing.assert_allclose(volume, img.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(meta["affine"], img.affine)
    assert meta["orientation"] == "LAS" and meta["spacing"] == pytest.approx([2.0, 2.0, 2.0])
    ras = Pipeline([dict(type="LoadVolume"), dict(type="Orient", axcodes="RAS")]).load(path)
    canonical = nibabel.as_closest_canonical(img)
    np.testing.assert_allclose(ras["image"][0].numpy(), canonical.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(ras["meta"]["affine"], canonical.affine, atol=1e-5)
    assert ras["meta"]["orientation"] == "RAS"


def test_nifti_bad_input(tmp_path):
    with pytest.raises(DataError, match="expected a 3D volume, got shape \\(128, 96, 24, 2\\)"):
        read_nifti(NIBABEL_DATA / "example4d.nii.gz")
    nan_file = NIBABEL_DATA / "resampled_anat_moved.nii"
    with pytest.raises(DataError, match="NaN or infinite voxels; set nan_value"):
        read_nifti(nan_file)
    volume, meta = read_nifti(nan_file, nan_value=0.0)
    assert np.isfinite(volume).all() and meta["preprocessing"][-1]["op"] == "replace_nan"
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes((NIBABEL_DATA / "standard.nii.gz").read_bytes()[:-40])
    with pytest.raises(DataError, match="cannot read NIfTI") as err:
        read_nifti(truncated)
    assert str(truncated) in str(err.value)
    (tmp_path / "text.nii").write_text("hello")
    with pytest.raises(DataError, match="cannot read NIfTI"):
        read_nifti(tmp_path / "text.nii")


def test_manifest_overrides_for_spacing_and_rescale(tmp_path):
    img = nibabel.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    nibabel.save(img, tmp_path / "v.nii.gz")
    volume, meta = read_volume(tmp_path / "v.nii.gz", spacing=[0.75, 0.75, 1.5],
                               rescale={"slope": 2.0, "intercept": -1024.0})
    np.testing.assert_allclose(volume, np.arange(24).reshape(2, 3, 4) * 2.0 - 1024)
    assert meta["spacing"] == [0.75, 0.75, 1.5]
    np.testing.assert_allclose(np.asarray(meta["affine"])[:3, :3], np.diag([0.75, 0.75, 1.5]))
    with pytest.raises(DataError, match="three positive numbers"):
        read_volume(tmp_path / "v.nii.gz", spacing=[1.0, 0.0])


@pytest.mark.parametrize("cuts", [[30_000], [100, 348, 50_000]], ids=["two_members", "members_split_in_header"])
def test_multi_member_gzip_nifti_reads_like_nibabel(tmp_path, cuts):
    """Concatenated gzip members (RFC 1952 2.2; ``cat a.gz b.gz``, pigz -i, some PACS exports) are one valid
    file: nibabel reads them, and the size check counts all members, not the last one's ISIZE trailer."""
    import gzip

    raw = (NIBABEL_DATA / "anatomical.nii").read_bytes()
    bounds = [0, *cuts, len(raw)]
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(b"".join(gzip.compress(raw[a:b]) for a, b in zip(bounds, bounds[1:])))
    last_isize = int.from_bytes(path.read_bytes()[-4:], "little")
    assert last_isize == len(raw) - cuts[-1] < len(raw)  # what the old check trusted

    volume, meta = read_nifti(path)
    img = nibabel.load(path)
    np.testing.assert_array_equal(volume, img.get_fdata().astype(np.float32))
    np.testing.assert_array_equal(volume, read_nifti(NIBABEL_DATA / "anatomical.nii")[0])
    np.testing.assert_allclose(meta["affine"], img.affine)

    first = tmp_path / "first.nii.gz"  # without the last member: a complete trailer, too few bytes in all
    first.write_bytes(gzip.compress(raw[:cuts[-1]]))
    with pytest.raises(DataError, match=f"gzip stream decompresses to {cuts[-1]} bytes.*needs 67650"):
        read_nifti(first)
    cut = tmp_path / "cut.nii.gz"  # cut inside the last member: refused, by the size check or by nibabel
    cut.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(DataError, match="cannot read NIfTI") as err:
        read_nifti(cut)
    assert str(cut) in str(err.value)


def test_gzip_decompressed_size_counts_members_and_stops_early(tmp_path):
    import gzip

    from mmvl.data.volume import gzip_decompressed_size

    path = tmp_path / "m.gz"
    path.write_bytes(gzip.compress(bytes(5000)) + gzip.compress(b"x" * 3_000_000) + b"\0" * 16)  # zero padding
    assert gzip_decompressed_size(path) == 3_005_000
    assert 10 <= gzip_decompressed_size(path, stop_at=10, chunk=4096) <= 4096  # one chunk of output
    path.write_bytes(path.read_bytes()[:-200])  # cut inside the second member
    assert 5000 < gzip_decompressed_size(path) < 3_005_000


@pytest.mark.parametrize("name", ["anatomical.nii", "example_nifti2.nii.gz", "functional.nii", "standard.nii.gz",
                                  "reoriented_anat_moved.nii"])
def test_bundled_nibabel_examples_read_like_nibabel(name):
    img = nibabel.load(NIBABEL_DATA / name)
    expected = np.squeeze(img.get_fdata())
    if expected.ndim != 3:  # functional.nii is 4D: refused by name, never read wrongly
        with pytest.raises(DataError, match="expected a 3D volume"):
            read_nifti(NIBABEL_DATA / name)
        return
    volume, _ = read_nifti(NIBABEL_DATA / name)
    np.testing.assert_allclose(volume, expected, rtol=1e-6)
