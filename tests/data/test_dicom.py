from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from mmvl.data.dicom import read_dicom_image
from mmvl.data.io import read_image
from mmvl.errors import DataError, DicomError

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def expected_window(stored, slope, intercept, center, width):
    """PS3.3 C.11.2.1.2.1 written out independently of mmvl: piecewise, element by element."""
    out = np.empty(stored.shape, dtype=np.float64)
    for index, value in np.ndenumerate(stored):
        x = value * slope + intercept
        if x <= center - 0.5 - (width - 1) / 2:
            out[index] = 0.0
        elif x > center - 0.5 + (width - 1) / 2:
            out[index] = 1.0
        else:
            out[index] = (x - (center - 0.5)) / (width - 1) + 0.5
    return out


@pytest.fixture
def ramp():
    return (np.arange(16 * 20, dtype=np.uint16).reshape(16, 20) * 13) % 4096


def test_rescale_and_window_match_the_standard(make_dicom, ramp):
    path = make_dicom("w.dcm", ramp, BitsStored=12, HighBit=11, RescaleSlope=2.0, RescaleIntercept=-1024.0,
                      WindowCenter=1500.0, WindowWidth=3001.0)
    image, meta = read_dicom_image(path)
    assert image.dtype == np.float32 and image.shape == (16, 20)
    np.testing.assert_allclose(image, expected_window(ramp, 2.0, -1024.0, 1500.0, 3001.0), atol=1e-6)
    assert 0 < (image == 0).sum() and 0 < (image == 1).sum()  # the window clips at both ends
    ops = [step["op"] for step in meta["preprocessing"]]
    assert ops == ["rescale", "window"]
    assert meta["preprocessing"][0] == {"op": "rescale", "slope": 2.0, "intercept": -1024.0}


def test_monochrome1_is_inverted(make_dicom, ramp):
    kwargs = dict(RescaleSlope=1.0, RescaleIntercept=0.0, WindowCenter=2000.0, WindowWidth=2000.0)
    mono2, _ = read_dicom_image(make_dicom("m2.dcm", ramp, **kwargs))
    mono1, meta = read_dicom_image(make_dicom("m1.dcm", ramp, PhotometricInterpretation="MONOCHROME1", **kwargs))
    np.testing.assert_allclose(mono1, 1.0 - expected_window(ramp, 1.0, 0.0, 2000.0, 2000.0), atol=1e-6)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert meta["preprocessing"][-1] == {"op": "invert", "reason": "MONOCHROME1"}


def test_multivalued_window_picks_the_requested_preset(make_dicom, ramp):
    path = make_dicom("mv.dcm", ramp, WindowCenter=[500.0, 2000.0], WindowWidth=[1000.0, 4000.0])
    second, _ = read_dicom_image(path, window_index=1)
    np.testing.assert_allclose(second, expected_window(ramp, 1.0, 0.0, 2000.0, 4000.0), atol=1e-6)


def test_without_window_falls_back_to_minmax_and_voi_minmax_ignores_window(make_dicom, ramp):
    values = ramp * 0.5 - 100.0
    expected = (values - values.min()) / (values.max() - values.min())
    plain, meta = read_dicom_image(make_dicom("p.dcm", ramp, RescaleSlope=0.5, RescaleIntercept=-100.0))
    np.testing.assert_allclose(plain, expected, atol=1e-6)
    assert meta["preprocessing"][-1] == {"op": "minmax"}
    windowed = make_dicom("q.dcm", ramp, RescaleSlope=0.5, RescaleIntercept=-100.0, WindowCenter=10.0,
                          WindowWidth=20.0)
    forced, _ = read_dicom_image(windowed, voi="minmax")
    np.testing.assert_allclose(forced, expected, atol=1e-6)
    with pytest.raises(DicomError, match="VOILUTSequence"):
        read_dicom_image(windowed, voi="lut")


def test_multiframe_takes_the_requested_frame(make_dicom):
    frames = np.stack([np.full((8, 8), 100 * (i + 1), dtype=np.uint16) for i in range(3)])
    frames[:, 0, 0] = 0  # give each frame a range so min-max is defined
    path = make_dicom("mf.dcm", frames)
    for frame in range(3):
        image, meta = read_dicom_image(path, frame=frame)
        assert meta["n_frames"] == 3 and meta["frame"] == frame
        assert image[1, 1] == pytest.approx(1.0) and image[0, 0] == 0.0
    with pytest.raises(DicomError, match="frame 5 requested but the file has 3"):
        read_dicom_image(path, frame=5)


def test_metadata_carries_no_patient_identifiers(make_dicom, ramp):
    _, meta = read_dicom_image(make_dicom("phi.dcm", ramp))
    assert "SECRET" not in repr(meta)


def test_bad_files_raise_errors_naming_the_file(tmp_path, make_dicom, ramp):
    not_dicom = tmp_path / "junk.dcm"
    not_dicom.write_bytes(b"this is not a dicom file at all" * 10)
    with pytest.raises(DicomError) as err:
        read_dicom_image(not_dicom)
    assert str(not_dicom) in str(err.value)
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "missing.dcm")
    truncated = make_dicom("t.dcm", ramp)
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(DicomError, match=str(truncated)):
        read_dicom_image(truncated)
    no_pixels = PYDICOM_FILES / "rtplan.dcm"
    with pytest.raises(DicomError, match="no \\(7FE0,0010\\) PixelData"):
        read_dicom_image(no_pixels)


def test_reads_bundled_pydicom_files_like_pydicom():
    from pydicom.pixels import apply_modality_lut

    path = PYDICOM_FILES / "CT_small.dcm"
    image, meta = read_dicom_image(path)
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    np.testing.assert_allclose(image, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    assert meta["modality"] == "CT" and meta["spacing"] == pytest.approx([0.661468, 0.661468])


def test_png_8_and_16_bit(tmp_path):
    from PIL import Image

    eight = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    Image.fromarray(eight).save(tmp_path / "a.png")
    image, _ = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(image, eight / 255.0, atol=1e-6)
    sixteen = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(sixteen).save(tmp_path / "b.png")
    image, _ = read_image(tmp_path / "b.png")
    np.testing.assert_allclose(image, sixteen / 65535.0, atol=1e-6)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported 2D image format"):
        read_image(tmp_path / "c.txt")


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_implicit.dcm",
                                  "MR_small_bigendian.dcm"])
def test_compressed_and_other_transfer_syntaxes_decode_like_the_plain_file(name):
    plain, _ = read_dicom_image(PYDICOM_FILES / "MR_small.dcm")
    image, meta = read_dicom_image(PYDICOM_FILES / name)
    np.testing.assert_array_equal(image, plain)
    assert meta["modality"] == "MR" and meta["orientation"] == pytest.approx([1, 0, 0, 0, 1, 0], abs=1e-3)


def test_undecodable_transfer_syntax_says_what_to_install():
    from mmvl.data.dicom import decoder_support

    support = decoder_support()
    jpeg_ls = support["JPEG-LS Lossless Image Compression"]
    if jpeg_ls["available"]:  # a plugin is installed here: then it must decode
        plain, _ = read_dicom_image(PYDICOM_FILES / "MR_small.dcm")
        np.testing.assert_array_equal(read_dicom_image(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm")[0], plain)
        return
    with pytest.raises(DicomError) as err:
        read_dicom_image(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm")
    message = str(err.value)
    assert "MR_small_jpeg_ls_lossless.dcm" in message and "JPEG-LS Lossless" in message
    assert "pylibjpeg-libjpeg" in message and "install one of" in message
    assert support["RLE Lossless"]["available"] and support["Explicit VR Little Endian"]["available"]


def test_bundled_multiframe_takes_the_requested_frame():
    ds = pydicom.dcmread(PYDICOM_FILES / "rtdose.dcm")
    frames = ds.pixel_array.astype(np.float64)
    for index in (0, 7, -1):
        image, meta = read_dicom_image(PYDICOM_FILES / "rtdose.dcm", frame=index, voi="minmax")
        expected = frames[index]
        expected = (expected - expected.min()) / max(expected.max() - expected.min(), 1e-12)
        np.testing.assert_allclose(image, expected, atol=1e-6)
        assert meta["n_frames"] == 15 and image.shape == (ds.Rows, ds.Columns)
    with pytest.raises(DicomError, match="frame 15 requested but the file has 15 frame"):
        read_dicom_image(PYDICOM_FILES / "rtdose.dcm", frame=15)


def test_modality_rule_and_empty_image(make_dicom):
    path = make_dicom("us.dcm", np.ones((4, 4), dtype=np.uint16), Modality="US")
    with pytest.raises(DicomError, match="modality 'US' but this pipeline expects \\['CR', 'DX'\\]"):
        read_dicom_image(path, modalities=("CR", "DX"))
    empty = make_dicom("empty.dcm", np.zeros((0, 0), dtype=np.uint16))
    with pytest.raises(DicomError, match="empty image"):
        read_dicom_image(empty)
