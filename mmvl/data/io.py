"""Read one 2D image file of any supported format into float32 ``(H, W)`` in [0, 1] plus metadata."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mmvl.data.dicom import is_dicom_file, read_dicom_image
from mmvl.errors import DataError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_raster_image(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """PNG/JPEG/TIFF via Pillow, 8- or 16-bit, colour averaged to gray, scaled by the dtype's range."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("RGB", "RGBA", "P", "CMYK", "LA"):
                img = img.convert("L")
            arr = np.asarray(img)
    except FileNotFoundError as err:
        raise DataError(path, "file not found") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(path, f"cannot decode image: {err}") from err
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype in (np.uint16, np.int32) and mode.startswith("I"):
        scale = 65535.0 if arr.max() > 255 else 255.0
    else:
        scale = float(max(arr.max(), 1))
    unit = np.clip(arr.astype(np.float32) / scale, 0.0, 1.0)
    meta = {"path": path, "format": "raster", "mode": mode, "shape": list(unit.shape),
            "preprocessing": [{"op": "scale", "divisor": scale}]}
    return unit, meta


def read_image(path: str | os.PathLike, **dicom_options: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM (by magic or suffix) or raster image; ``dicom_options`` go to ``read_dicom_image``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found" if not os.path.isdir(path) else "is a directory, expected an image file")
    if path.lower().endswith(RASTER_SUFFIXES):
        return read_raster_image(path)
    if is_dicom_file(path):
        return read_dicom_image(path, **dicom_options)
    raise DataError(
        path, f"unsupported 2D image format; expected DICOM or one of {', '.join(RASTER_SUFFIXES)}"
    )
