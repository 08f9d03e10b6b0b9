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


def test_without_window_falls_back_to_a_percentile_window_and_voi_minmax_ignores_window(make_dicom, ramp):
    stored = ramp.copy()
    stored[0, 0] = 65000  # a hot pixel: a min-max stretch would squeeze the rest of the image into a sliver
    values = stored * 0.5 - 100.0
    low, high = np.percentile(values, [0.5, 99.5])
    expected = np.clip((values - low) / (high - low), 0, 1)
    plain, meta = read_dicom_image(make_dicom("p.dcm", stored, RescaleSlope=0.5, RescaleIntercept=-100.0))
    np.testing.assert_allclose(plain, expected, atol=1e-6)
    assert meta["preprocessing"][-1] == {"op": "percentile_window", "percentiles": [0.5, 99.5],
                                         "range": [pytest.approx(low), pytest.approx(high)]}
    assert high < 2100 < values.max()  # the hot pixel clips instead of setting the scale
    windowed = make_dicom("q.dcm", stored, RescaleSlope=0.5, RescaleIntercept=-100.0, WindowCenter=10.0,
                          WindowWidth=20.0)
    forced, meta = read_dicom_image(windowed, voi="minmax")
    np.testing.assert_allclose(forced, (values - values.min()) / (values.max() - values.min()), atol=1e-6)
    assert meta["preprocessing"][-1] == {"op": "minmax"}
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
    low, high = np.percentile(hu, [0.5, 99.5])  # no window in the file; no pixel equals its padding value
    np.testing.assert_allclose(image, np.clip((hu - low) / (high - low), 0, 1), atol=1e-6)
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


# -- quirks of real files, on pydicom's bundled files edited where no bundled file has the quirk -------------
def windowed_like_pydicom(ds) -> np.ndarray:
    """``pydicom.pixels.apply_windowing`` mapped from its output range (the stored value range) to [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_windowing

    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    out = apply_windowing(values, ds)
    bits = int(ds.BitsStored)
    y_min, y_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    return (out - y_min) / (y_max - y_min)


def edited_copy(tmp_path, name: str, **attributes) -> Path:
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    for key, value in attributes.items():
        setattr(ds, key, value)
    path = tmp_path / f"edited_{name}"
    ds.save_as(path)
    return path


def test_presentation_lut_shape_inverse_inverts_once(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    expected = windowed_like_pydicom(ds)
    image, meta = read_dicom_image(edited_copy(tmp_path, "MR_small.dcm", PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(image, 1.0 - expected, atol=1e-5)
    assert meta["preprocessing"][-1] == {"op": "invert", "reason": "PresentationLUTShape INVERSE"}
    identity, _ = read_dicom_image(edited_copy(tmp_path, "MR_small.dcm", PresentationLUTShape="IDENTITY"))
    np.testing.assert_allclose(identity, expected, atol=1e-5)
    # DX objects state MONOCHROME1 and INVERSE together (PS3.3 C.8.11.1.1.1): one inversion, not two
    both, _ = read_dicom_image(edited_copy(tmp_path, "MR_small.dcm", PresentationLUTShape="INVERSE",
                                           PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_allclose(both, 1.0 - expected, atol=1e-5)


def with_padded_border(tmp_path, name: str, padding: int, border: int = 12, limit: int | None = None
                       ) -> tuple[Path, np.ndarray]:
    """A copy of a bundled file whose outer ``border`` pixels hold ``padding``, as scanners pad outside the FOV."""
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    stored = ds.pixel_array.copy()
    stored[:border], stored[-border:], stored[:, :border], stored[:, -border:] = padding, padding, padding, padding
    ds.PixelData = stored.tobytes()
    vr = "SS" if ds.PixelRepresentation else "US"  # (0028,0120/0121) take the VR of the pixel values
    ds.add_new(0x00280120, vr, padding)  # PixelPaddingValue
    if limit is not None:
        ds.add_new(0x00280121, vr, limit)  # PixelPaddingRangeLimit
    path = tmp_path / f"padded_{name}"
    ds.save_as(path)
    return path, stored


def test_pixel_padding_is_background_and_left_out_of_the_fallback_window(tmp_path):
    from pydicom.pixels import apply_modality_lut

    path, stored = with_padded_border(tmp_path, "CT_small.dcm", -2000)  # CT_small states -2000, uses none
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(stored, ds).astype(np.float64)
    pad = stored == -2000
    low, high = np.percentile(hu[~pad], [0.5, 99.5])
    expected = np.where(pad, 0.0, np.clip((hu - low) / (high - low), 0, 1))
    image, meta = read_dicom_image(path)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert meta["preprocessing"][-1] == {"op": "mask_padding", "pixels": int(pad.sum())}
    with_padding_low = np.percentile(hu, 0.5)  # what the window would have been with the padding counted in
    assert with_padding_low == hu.min() < low

    # (0028,0121) PixelPaddingRangeLimit: everything from -2000 up to -1000 is padding too
    ranged, stored = with_padded_border(tmp_path, "CT_small.dcm", -2000, limit=-1000)
    stored_ranged = stored.copy()
    stored_ranged[20:24, 20:24] = -1500
    ds = pydicom.dcmread(ranged)
    ds.PixelData = stored_ranged.tobytes()
    ds.save_as(ranged)
    image, _ = read_dicom_image(ranged)
    pad = (stored_ranged >= -2000) & (stored_ranged <= -1000)
    hu = apply_modality_lut(stored_ranged, ds).astype(np.float64)
    low, high = np.percentile(hu[~pad], [0.5, 99.5])
    np.testing.assert_allclose(image, np.where(pad, 0.0, np.clip((hu - low) / (high - low), 0, 1)), atol=1e-6)


def test_pixel_padding_with_a_window_and_monochrome1(tmp_path):
    path, stored = with_padded_border(tmp_path, "MR_small.dcm", 0, border=8)
    expected = windowed_like_pydicom(pydicom.dcmread(path))
    pad = stored == 0
    image, _ = read_dicom_image(path)
    np.testing.assert_allclose(image, np.where(pad, 0.0, expected), atol=1e-5)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    mono1, _ = read_dicom_image(tmp_path / "mono1.dcm")
    np.testing.assert_allclose(mono1, np.where(pad, 0.0, 1.0 - expected), atol=1e-5)  # padding stays background


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_is_scaled_by_its_data_range_not_its_declared_depth(tmp_path, vr):
    """A vendor LUT declaring 16 bits per entry that holds 12-bit values (0..4095) must fill [0, 1]."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_voi_lut
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    entries, first = 2048, 100
    curve = np.round(4095 * np.sqrt(np.linspace(0, 1, entries))).astype(np.uint16)  # 12-bit data, gamma-like
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, first, 16])  # LUTDescriptor
    item.add_new(0x00283006, vr, curve.tobytes() if vr == "OW" else [int(v) for v in curve])  # LUTData
    ds.VOILUTSequence = Sequence([item])
    del ds.WindowCenter, ds.WindowWidth
    path = tmp_path / "vlut.dcm"
    ds.save_as(path)
    ds = pydicom.dcmread(path)

    image, meta = read_dicom_image(path)
    by_pydicom = apply_voi_lut(ds.pixel_array, ds, prefer_lut=True).astype(np.float64) / 4095
    by_numpy = curve[np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)] / 4095
    np.testing.assert_allclose(image, by_pydicom, atol=1e-6)
    np.testing.assert_allclose(image, by_numpy, atol=1e-6)
    assert image.max() == pytest.approx(by_numpy.max()) and image.max() > 0.9  # not 4095 / 65535 = 0.06
    assert meta["preprocessing"][-1] == {"op": "voi_lut", "bits": 16, "lut_range": [0.0, 4095.0]}


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_in_place_window_matches_the_standard_formulas(function):
    from mmvl.data.dicom import window_in_place, window_to_unit

    values = np.linspace(-1500.0, 2500.0, 4001).astype(np.float32)
    center, width = 300.0, 1200.0
    hu = values.astype(np.float64)
    expected = {  # PS3.3 C.11.2.1.2.1, C.11.2.1.3.2 and C.11.2.1.3.1, output range [0, 1]
        "LINEAR": np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1),
        "LINEAR_EXACT": np.clip((hu - center) / width + 0.5, 0, 1),
        "SIGMOID": 1 / (1 + np.exp(-4 * (hu - center) / width)),
    }[function]
    copied = window_to_unit(values, center, width, function)
    np.testing.assert_array_equal(values, hu.astype(np.float32))  # window_to_unit leaves its input alone
    np.testing.assert_allclose(copied, expected, atol=1e-6)
    in_place = window_in_place(values, center, width, function)
    assert in_place is values and values.dtype == np.float32
    np.testing.assert_array_equal(in_place, copied)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_jpeg2000_lossless_reads_as_the_uncompressed_file(name, tmp_path):
    """JPEG 2000 DICOM (many PACS exports) decodes through pydicom's pylibjpeg plugin, an mmvl dependency: the
    lossless copy of a bundled file (re-encoded here by the same plugin) gives the uncompressed file's image."""
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(PYDICOM_FILES / name)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(tmp_path / name)
    assert pydicom.dcmread(tmp_path / name).file_meta.TransferSyntaxUID == JPEG2000Lossless
    compressed, _ = read_dicom_image(tmp_path / name)
    plain, _ = read_dicom_image(PYDICOM_FILES / name)
    np.testing.assert_array_equal(compressed, plain)  # lossless: the same stored values, the same arithmetic


def test_native_fast_path_reads_every_bundled_file_as_pydicom_does():
    """``native_frame`` (uncompressed little-endian grayscale, read straight from the bytes) against pydicom's
    decoder on each bundled file it takes, first and last frame: same dtype, shape and values, unused high bits
    cleared or sign-extended as pydicom does; it takes none of the compressed or big-endian files."""
    import warnings

    from mmvl.data.dicom import native_frame

    taken, declined = [], []
    for path in sorted(PYDICOM_FILES.rglob("*")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
                frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            except Exception:  # not DICOM, or a deliberately broken header
                continue
            if "PixelData" not in ds:
                continue
            for frame in sorted({0, frames - 1}):
                ours = native_frame(ds, frame, frames)
                if ours is None:
                    declined.append(str(ds.file_meta.get("TransferSyntaxUID", "")))
                    continue
                theirs = pydicom.pixels.pixel_array(ds, index=frame) if frames > 1 else ds.pixel_array
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, path.name
                np.testing.assert_array_equal(ours, theirs, err_msg=f"{path.name} frame {frame}")
                taken.append((path.name, int(ds.BitsStored) < int(ds.BitsAllocated), int(ds.PixelRepresentation)))
    assert len(taken) >= 30, taken
    # Files with unused high bits, signed pixels among them, went through the fast path.
    assert any(unused for _name, unused, _signed in taken) and any(signed for *_rest, signed in taken)
    # and the compressed ones went to pydicom's decoders.
    assert any(uid and pydicom.uid.UID(uid).is_compressed for uid in declined), sorted(set(declined))


@pytest.mark.parametrize("name, signed", [("MR_small.dcm", 1), ("CT_small.dcm", 1), ("examples_overlay.dcm", 0)])
def test_native_fast_path_clears_or_sign_extends_unused_high_bits(tmp_path, name, signed):
    """Bundled files keep their unused high bits clean, so this copy sets them: 4 bits above a BitsStored of 12
    hold garbage that pydicom masks (unsigned) or overwrites with the sign (signed); the fast path must too."""
    from mmvl.data.dicom import native_frame

    ds = pydicom.dcmread(PYDICOM_FILES / name)
    if int(ds.BitsAllocated) != 16 or ds.file_meta.TransferSyntaxUID not in ("1.2.840.10008.1.2.1",
                                                                               "1.2.840.10008.1.2"):
        pytest.fail(f"{name} is no longer 16-bit native little endian: pick another bundled file")
    values = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    values &= 0x0FFF
    values |= (np.arange(values.size, dtype=np.uint16) % 16) << 12  # garbage in bits 12-15
    ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = values.tobytes(), 12, 11, signed
    ds.save_as(tmp_path / name)
    ds = pydicom.dcmread(tmp_path / name)
    ours, theirs = native_frame(ds, 0, 1), ds.pixel_array
    assert ours is not None and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)
    assert np.abs(ours.astype(np.int32)).max() < 4096  # 12 bits, whatever the high bits held
