"""Raster images (PNG/JPEG/TIFF): scaled by the file's bit depth, so one scan saved 8- or 16-bit reads the same."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmvl.data.io import read_image, read_raster_image
from mmvl.errors import DataError

# One 8-bit quantisation step. Saving the same intensity f as round(255 f) and as round(65535 f) moves it by at
# most half an 8-bit step and half a 16-bit step; one whole 8-bit step bounds their difference with room to spare,
# and a reader that scaled either file by the wrong bit depth misses it by far more (a factor of 257 or 16).
ONE_8BIT_STEP = 1 / 255


def scan(peak: float) -> np.ndarray:
    """A smooth, CXR-like intensity field in [0, peak]: a ramp plus a disc, every value distinct."""
    y, x = np.mgrid[0:48, 0:64] / np.array([47.0, 63.0])[:, None, None]
    field = 0.6 * x + 0.3 * y + 0.1 * ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1)
    return peak * field / field.max()


def save(path, values: np.ndarray, mode_dtype) -> str:
    Image.fromarray(values.astype(mode_dtype)).save(path)
    return str(path)


@pytest.mark.parametrize("peak", [1.0, 0.05], ids=["bright", "dark"])  # dark: a 16-bit max below 255 * 257
def test_same_scan_as_8_bit_and_16_bit_reads_the_same(tmp_path, peak):
    intensity = scan(peak)
    eight, meta8 = read_image(save(tmp_path / "s8.png", np.round(intensity * 255), np.uint8))
    sixteen, meta16 = read_image(save(tmp_path / "s16.png", np.round(intensity * 65535), np.uint16))
    tiff, _ = read_image(save(tmp_path / "s16.tif", np.round(intensity * 65535), np.uint16))
    twelve, meta12 = read_image(save(tmp_path / "s12.png", np.round(intensity * 4095), np.uint16), bits_stored=12)
    assert (meta8["mode"], meta8["bits"], meta16["mode"], meta16["bits"], meta12["bits"]) == ("L", 8, "I;16", 16, 12)
    assert meta16["preprocessing"] == [{"op": "scale", "divisor": 65535.0, "source": "16-bit full scale (mode I;16)"}]
    for image in (sixteen, tiff, twelve):
        assert image.dtype == np.float32 and image.shape == (48, 64)
        assert np.abs(image - eight).max() <= ONE_8BIT_STEP
    np.testing.assert_allclose(sixteen, intensity, atol=0.5 / 65535 + 1e-7)  # the 16-bit file keeps 16 bits
    np.testing.assert_array_equal(tiff, sixteen)
    assert sixteen.max() == pytest.approx(peak, abs=1e-4)  # a dark 16-bit file stays dark, not divided by 255


def test_colour_and_palette_files_average_to_gray(tmp_path):
    gray = np.round(scan(1.0) * 255).astype(np.uint8)
    rgb = save(tmp_path / "c.png", np.repeat(gray[..., None], 3, axis=-1), np.uint8)
    np.testing.assert_allclose(read_image(rgb)[0], gray / 255.0, atol=1e-6)
    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    np.testing.assert_allclose(read_image(tmp_path / "p.png")[0], gray / 255.0, atol=1e-6)
    jpeg, meta = read_image(save(tmp_path / "g.jpg", gray, np.uint8))
    assert meta["bits"] == 8 and np.abs(jpeg - gray / 255.0).mean() < 0.01  # lossy, but on the same scale


def test_bits_stored_is_checked(tmp_path):
    path = save(tmp_path / "s.png", np.full((4, 4), 5000), np.uint16)
    with pytest.raises(DataError, match="pixel value 5000 exceeds bits_stored=12"):
        read_raster_image(path, bits_stored=12)
    with pytest.raises(DataError, match="bits_stored=12 but the file holds 8-bit"):
        read_image(save(tmp_path / "e.png", np.zeros((4, 4)), np.uint8), bits_stored=12)
    image, _ = read_raster_image(path, bits_stored=13)
    np.testing.assert_allclose(image, 5000 / 8191, rtol=1e-6)


def test_undecodable_file_is_a_data_error(tmp_path):
    broken = tmp_path / "x.png"
    broken.write_bytes(Image.new("L", (8, 8)).tobytes() + b"not a png")
    with pytest.raises(DataError, match="cannot decode image") as err:
        read_image(broken)
    assert str(broken) in str(err.value)
