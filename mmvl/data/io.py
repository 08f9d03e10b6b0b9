"""Read one 2D image file of any supported format into float32 ``(H, W)`` in [0, 1] plus metadata."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mmvl.data.dicom import is_dicom_file, read_dicom_image
from mmvl.errors import DataError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Bits per sample of each Pillow mode (Pillow's "Modes" table). Colour modes are converted to 8-bit "L".
MODE_BITS = {"1": 1, "L": 8, "P": 8, "PA": 8, "LA": 8, "La": 8, "RGB": 8, "RGBA": 8, "RGBa": 8, "RGBX": 8,
             "CMYK": 8, "YCbCr": 8, "LAB": 8, "HSV": 8, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16,
             "I": 32}


def read_raster_image(path: str | os.PathLike, *, bits_stored: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """PNG/JPEG/BMP/TIFF via Pillow as gray float32 in [0, 1], divided by the full scale of the file's bit depth.

    The bit depth comes from the Pillow mode (8-bit ``L``/colour, 16-bit ``I;16``, 32-bit signed ``I``), never
    from the pixel values, so one scan gives the same tensor whether it was saved dark or bright, 8- or 16-bit.
    ``bits_stored`` (like DICOM's (0028,0101) BitsStored) says how many of those bits hold data, e.g. 12 for
    12-bit detector values saved in a 16-bit PNG; a value above ``2**bits_stored - 1`` is refused. Float
    (``F``) images have no bit depth and are divided by their maximum (recorded in the metadata).
    """
    from PIL import Image

    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if MODE_BITS.get(mode) == 8 and mode != "L":
                img = img.convert("L")  # colour averaged to gray (ITU-R 601-2 luma)
            arr = np.asarray(img)
    except FileNotFoundError as err:
        raise DataError(path, "file not found") from err
    except MemoryError as err:
        raise DataError(path, "image too large to decode in memory") from err
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError... by plugin
        raise DataError(path, f"cannot decode image: {type(err).__name__}: {err}") from err
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(path, f"expected a 2D grayscale or colour image, got mode {mode} with shape {arr.shape}")

    container = MODE_BITS.get(mode)
    if bits_stored is not None:
        if container is None or not 1 <= int(bits_stored) <= container:
            raise DataError(path, f"bits_stored={bits_stored} but the file holds {container or 'float'}-bit "
                                  f"samples (mode {mode}); give 1..{container or '(none for float images)'}")
        bits = int(bits_stored)
    else:
        bits = container
    if bits is None:
        scale = float(max(np.nanmax(arr), 1.0))
        source = f"maximum of a float image (mode {mode})"
    else:
        scale = float(2 ** (bits - 1) - 1 if mode == "I" and bits == 32 else 2**bits - 1)
        source = f"{bits}-bit full scale ({'bits_stored' if bits_stored is not None else 'mode ' + mode})"
        peak = int(arr.max())
        if bits_stored is not None and peak > scale:
            raise DataError(path, f"pixel value {peak} exceeds bits_stored={bits} (max {int(scale)}); "
                                  "give the real number of bits or leave bits_stored unset")
    unit = np.clip(arr.astype(np.float32) / np.float32(scale), 0.0, 1.0)
    if not np.isfinite(unit).all():
        raise DataError(path, "pixel values are NaN or infinite")
    meta = {"path": path, "format": "raster", "mode": mode, "bits": bits, "shape": list(unit.shape),
            "preprocessing": [{"op": "scale", "divisor": scale, "source": source}]}
    return unit, meta


def read_image(
    path: str | os.PathLike, *, bits_stored: int | None = None, **dicom_options: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM (by magic or suffix) or raster image; ``dicom_options`` go to ``read_dicom_image``.

    ``bits_stored`` applies to raster files (see :func:`read_raster_image`); a DICOM file states its own.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found" if not os.path.isdir(path) else "is a directory, expected an image file")
    if path.lower().endswith(RASTER_SUFFIXES):
        return read_raster_image(path, bits_stored=bits_stored)
    if is_dicom_file(path):
        return read_dicom_image(path, **dicom_options)
    raise DataError(
        path, f"unsupported 2D image format; expected DICOM or one of {', '.join(RASTER_SUFFIXES)}"
    )
