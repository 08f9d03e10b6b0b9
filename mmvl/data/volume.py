"""3D volumes: DICOM series and NIfTI files as ``(X, Y, Z)`` float32 arrays with a RAS affine.

The axis and affine conventions are MONAI's (``monai.transforms.LoadImage``: axis 0 runs along the image
columns, axis 1 along the rows, axis 2 across slices; the affine maps voxel indices to RAS millimetres),
so MONAI's spatial transforms (``Orientation``, ``Spacing``) apply unchanged to both sources.

DICOM series are assembled here rather than by MONAI's ``PydicomReader`` because that reader orders
slices by InstanceNumber, measures slice spacing along the scanner z axis only and stacks every series
found in a folder (``tests/data/test_volume.py`` shows each case). Here slices are grouped by
SeriesInstanceUID, sorted by ImagePositionPatient projected on the slice normal, checked for equal
geometry and even spacing, and converted to Hounsfield units with each slice's own modality LUT.
NIfTI files are read with MONAI's ``NibabelReader``. Metadata never carries patient identifiers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmvl.data.dicom import (
    _decode_error,
    _header_phi,
    check_jpeg2000_boxes,
    check_modality,
    is_dicom_file,
    padding_mask,
    redact,
)
from mmvl.errors import DataError, DicomError
from mmvl.utils import get_logger

logger = get_logger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti_file(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def is_volume_source(path: str | os.PathLike) -> bool:
    """A NIfTI file or a folder (read as a DICOM series)."""
    return is_nifti_file(path) or os.path.isdir(path)


def axcodes(affine: np.ndarray) -> str:
    """Orientation letters of a voxel-to-world affine, e.g. ``"RAS"`` (nibabel's ``aff2axcodes``)."""
    import nibabel

    return "".join(nibabel.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def _spacing(affine: np.ndarray) -> list[float]:
    return [float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)]


# -- DICOM series ----------------------------------------------------------------------------------------
def _dicom_headers(folder: str) -> dict[str, list[tuple[str, Any]]]:
    """Image objects in ``folder`` (not recursive) grouped by SeriesInstanceUID; pixel data read lazily."""
    import pydicom

    series: dict[str, list[tuple[str, Any]]] = {}
    without_pixels: list[tuple[str, str]] = []
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file())
    for name in names:
        path = os.path.join(folder, name)
        if name.upper() == "DICOMDIR" or not is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(path, defer_size="64 KB")
        except Exception as err:  # corrupt headers raise a range of errors
            message = f"corrupt DICOM header in series folder: {type(err).__name__}: {err}"
            raise DicomError(path, redact(message, _header_phi(path))) from err
        uid = str(ds.get("SeriesInstanceUID", ""))
        if "PixelData" in ds:
            series.setdefault(uid, []).append((path, ds))
        else:  # SR, presentation states, KOs share folders with images; a truncated slice looks the same
            without_pixels.append((path, uid if "SOPClassUID" in ds else None))
    for path, uid in without_pixels:
        if uid is None or uid in series:
            raise DicomError(path, "no (7FE0,0010) PixelData in an image series (truncated file?)")
    return series


def _select_series(folder: str, series: dict[str, list], series_uid: str | None) -> tuple[str, list]:
    if not series:
        raise DicomError(folder, "no DICOM image files in this folder (expected one file per slice)")
    if series_uid is not None:
        if series_uid not in series:
            raise DicomError(folder, f"series_uid {series_uid} not found; the folder holds {len(series)} series")
        return series_uid, series[series_uid]
    ranked = sorted(series.items(), key=lambda item: -len(item[1]))
    if len(ranked) > 1:
        if len(ranked[0][1]) == len(ranked[1][1]):
            sizes = ", ".join(f"{len(files)} slices" for _uid, files in ranked)
            raise DicomError(folder, f"{len(ranked)} series of equal size ({sizes}); set 'series_uid' in the "
                                     "manifest row to choose one")
        logger.info("%s: %d series in folder, using the largest (%d slices)", folder, len(ranked), len(ranked[0][1]))
    return ranked[0]


def _geometry(folder: str, slices: list[tuple[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row/column direction cosines, pixel spacing (row, column) and per-slice positions; all must agree."""
    first_path, first = slices[0]
    for path, ds in slices:
        for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            if key not in ds:
                raise DicomError(path, f"slice lacks {key}; cannot place it in the volume")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    pixel_spacing = np.asarray(first.PixelSpacing, dtype=np.float64)
    shape = (int(first.Rows), int(first.Columns))
    for path, ds in slices[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), orientation, atol=1e-4):
            raise DicomError(path, f"inconsistent series: ImageOrientationPatient differs from {first_path}")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DicomError(path, f"inconsistent series: {ds.Rows}x{ds.Columns} pixels, {first_path} has "
                                   f"{shape[0]}x{shape[1]}")
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=np.float64), pixel_spacing, rtol=1e-4):
            raise DicomError(path, f"inconsistent series: PixelSpacing differs from {first_path}")
    if min(shape) == 0 or np.any(pixel_spacing <= 0):
        raise DicomError(first_path, f"empty geometry: {shape[0]}x{shape[1]} pixels, spacing {pixel_spacing}")
    positions = np.asarray([ds.ImagePositionPatient for _path, ds in slices], dtype=np.float64)
    return orientation, pixel_spacing, positions


def _check_spacing(folder: str, slices: list, along: np.ndarray, allow_gaps: bool, tolerance: float) -> dict:
    """Even slice spacing, no duplicates; gaps (whole missing slices) are an error unless allowed."""
    steps = np.diff(along)
    duplicate = np.flatnonzero(steps < 1e-3)
    if duplicate.size:
        i = int(duplicate[0])
        raise DicomError(folder, f"two slices at the same position {along[i]:.3f} mm ({slices[i][0]} and "
                                 f"{slices[i + 1][0]}): mixed acquisitions in one series?")
    spacing = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - spacing) > tolerance * spacing + 1e-3)
    if not uneven.size:
        return {"slice_spacing": spacing, "gaps": []}
    gaps = [{"after_mm": round(float(along[i]), 3), "step_mm": round(float(steps[i]), 3),
             "missing_slices": round(float(steps[i] / spacing) - 1)} for i in uneven]
    whole = all(abs(steps[i] / spacing - round(steps[i] / spacing)) < tolerance for i in uneven)
    listed = "; ".join(f"{g['step_mm']} mm step after {g['after_mm']} mm" for g in gaps[:3])
    if not whole:
        raise DicomError(folder, f"inconsistent slice spacing (median {spacing:.3f} mm): {listed}")
    if not allow_gaps:
        raise DicomError(folder, f"{sum(g['missing_slices'] for g in gaps)} missing slice(s) (median spacing "
                                 f"{spacing:.3f} mm): {listed}. To interpolate them pass --allow-gaps "
                                 "(tools/zero_shot.py, evaluate.py, generate_reports.py) or set allow_gaps=True "
                                 "(LoadVolume, reader_options)")
    logger.warning("%s: series has gaps (%s); missing slices interpolated (allow_gaps)", folder, listed)
    return {"slice_spacing": spacing, "gaps": gaps}


def _fill_gaps(volume: np.ndarray, along: np.ndarray, spacing: float) -> np.ndarray:
    """Put slices on an even grid, linearly interpolating the missing ones (so the affine stays true)."""
    targets = along[0] + spacing * np.arange(round((along[-1] - along[0]) / spacing) + 1)
    upper = np.clip(np.searchsorted(along, targets - 1e-3), 1, len(along) - 1)
    weight = np.clip((targets - along[upper - 1]) / (along[upper] - along[upper - 1]), 0.0, 1.0).astype(np.float32)
    return volume[..., upper - 1] * (1 - weight) + volume[..., upper] * weight


def read_dicom_series(
    folder: str | os.PathLike,
    *,
    series_uid: str | None = None,
    modalities: Sequence[str] | None = None,
    allow_gaps: bool = False,
    spacing_tolerance: float = 0.05,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Assemble one series from a folder of single-slice DICOM files.

    Returns float32 ``(X, Y, Z)`` values after each slice's modality LUT (Hounsfield units for CT), and
    metadata with the RAS ``affine``, ``spacing`` (mm), ``orientation`` codes and the steps applied.
    With several series in the folder the largest is read unless ``series_uid`` picks one.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(folder, "DICOM series folder not found")
    slices: list[tuple[str, Any]] = []
    try:
        with warnings.catch_warnings():  # pydicom's warnings quote element values, names included
            warnings.simplefilter("ignore")
            return _read_series(folder, series_uid, modalities, allow_gaps, spacing_tolerance, slices)
    except DataError as err:
        raise type(err)(err.path, _redact_series(err.problem, slices)) from err
    except Exception as err:  # a hostile or damaged header breaks the assembly in many ways; name the folder
        message = f"malformed DICOM attribute values in the series: {type(err).__name__}: {err}"
        raise DicomError(folder, _redact_series(message, slices) if slices else redact(message)) from err


def _redact_series(message: str, slices: list[tuple[str, Any]]) -> str:
    for _path, ds in slices:  # slices of one series usually share their PHI; errors are rare, so check all
        message = redact(message, ds)
    return message


def _read_series(folder: str, series_uid: str | None, modalities: Sequence[str] | None, allow_gaps: bool,
                 spacing_tolerance: float, slices_out: list) -> tuple[np.ndarray, dict[str, Any]]:
    from pydicom.pixels import apply_modality_lut

    all_series = _dicom_headers(folder)
    slices_out.extend(ds for files in all_series.values() for ds in files)
    _uid, slices = _select_series(folder, all_series, series_uid)
    modality = str(slices[0][1].get("Modality", ""))
    check_modality(folder, modality, modalities)
    orientation, pixel_spacing, positions = _geometry(folder, slices)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices, positions, along = [slices[i] for i in order], positions[order], along[order]

    if len(slices) > 1:
        checked = _check_spacing(folder, slices, along, allow_gaps, spacing_tolerance)
        step = (positions[-1] - positions[0]) / (along[-1] - along[0]) * checked["slice_spacing"]
    else:
        thickness = float(slices[0][1].get("SliceThickness", 1.0) or 1.0)
        checked = {"slice_spacing": thickness, "gaps": []}
        step = normal * thickness

    planes, pads = [], []
    for path, ds in slices:
        check_jpeg2000_boxes(ds, path)
        try:
            stored = ds.pixel_array
        except Exception as err:  # decoder errors vary by plugin
            raise _decode_error(ds, path, err) from err
        if stored.ndim != 2:
            raise DicomError(path, f"expected one 2D slice per file, got pixel array of shape {stored.shape} "
                                   "(enhanced multi-frame volumes are not supported)")
        pads.append(padding_mask(ds, stored))
        planes.append(apply_modality_lut(stored, ds).astype(np.float32))
    volume = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, cols, z) -> (x, y, z)
    padded = _mask_padding(volume, pads)
    if checked["gaps"]:
        volume = _fill_gaps(volume, along, checked["slice_spacing"])
    volume = np.ascontiguousarray(volume)
    if not np.isfinite(volume).all():
        raise DicomError(folder, "pixel values are NaN or infinite after the modality LUT")

    affine = np.eye(4)
    affine[:3, 0] = row_dir * pixel_spacing[1]  # along a row: column index, spaced by PixelSpacing[1]
    affine[:3, 1] = col_dir * pixel_spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ affine
    meta = {
        "path": folder,
        "format": "dicom_series",
        "modality": modality,
        "units": "HU" if modality.upper() == "CT" else "modality LUT output",
        "shape": list(volume.shape),
        "n_slices": len(slices),
        "other_series": len(all_series) - 1,
        "affine": affine.tolist(),
        "spacing": _spacing(affine),
        "orientation": axcodes(affine),
        "gaps": checked["gaps"],
        "value_range": [float(volume.min()), float(volume.max())],
        "preprocessing": [
            {"op": "sort_slices", "by": "ImagePositionPatient along the slice normal"},
            {"op": "modality_lut", "per_slice": True},
        ] + ([padded] if padded else [])
          + ([{"op": "interpolate_missing_slices", "count": sum(g["missing_slices"] for g in checked["gaps"])}]
             if checked["gaps"] else []),
    }
    return volume, meta


def _mask_padding(volume: np.ndarray, pads: list[np.ndarray | None]) -> dict | None:
    """Set the voxels each slice's (0028,0120) PixelPaddingValue (range) marks to the lowest value of the
    volume's other voxels, in place. Padding is no tissue: its modality-LUT value (often -2000 or -3024 HU, or
    -32768) would otherwise pull every voxel it is interpolated into during resampling far below air and skew
    any intensity statistic, so it becomes the background. Returns the step for the metadata, or None."""
    if all(pad is None for pad in pads):
        return None
    mask = np.stack([np.zeros(volume.shape[:2][::-1], bool) if pad is None else pad for pad in pads],
                    axis=-1).transpose(1, 0, 2)
    count = int(mask.sum())
    if not count:
        return None
    fill = float(volume[~mask].min()) if count < mask.size else 0.0
    volume[mask] = fill
    return {"op": "mask_padding", "voxels": count, "value": fill}


# -- NIfTI -----------------------------------------------------------------------------------------------
DEFLATE_MAX_RATIO = 1032  # zlib's limit on deflate's compression ratio (zlib technical details)


def _check_nifti_size(path: str) -> None:
    """Refuse a header whose dim/bitpix promise more bytes than the file can hold, before nibabel allocates
    them: a damaged or hostile ``dim`` field would otherwise ask for terabytes. Uncompressed: the file size;
    gzip: deflate's maximum ratio first (no decompression at all for an absurd header), then, unless the ISIZE
    trailer already covers the header's promise, the bytes the stream really decompresses to, counted across
    all its members (RFC 1952 2.2: a gzip file is a series of members, and nibabel reads them all; the last
    member's ISIZE gives that member's size only). A cut file whose last 4 bytes happen to look large enough
    passes here and fails in nibabel's read, as a DataError all the same."""
    import nibabel

    header = nibabel.load(path).header  # reads the header only
    shape = header.get_data_shape()
    itemsize = header.get_data_dtype().itemsize
    needed = int(np.prod([int(n) for n in shape], dtype=object)) * itemsize + int(header.get_data_offset())
    size = os.path.getsize(path)
    compressed = path.lower().endswith(".gz")
    short = needed > (size * DEFLATE_MAX_RATIO if compressed else size)
    if compressed and not short and _last_isize(path, size) < needed:
        # The trailer of a single-member file states its whole size, so streaming (as costly as nibabel's own
        # read) is only needed when it says too little: several members, a >= 4 GiB stream, or a cut file.
        decoded = gzip_decompressed_size(path, stop_at=needed)
        if decoded < needed:
            raise DataError(path, f"cannot read NIfTI: the gzip stream decompresses to {decoded} bytes, the header "
                                  f"(dim {list(shape)}, {itemsize}-byte voxels) needs {needed}: truncated file")
    if short:
        raise DataError(path, f"NIfTI header promises {needed} bytes (dim {list(shape)}, {itemsize}-byte voxels) "
                              f"but the file holds fewer ({size} bytes{', compressed' if compressed else ''}): "
                              "truncated or damaged header")


def _last_isize(path: str, size: int) -> int:
    """The ISIZE trailer (RFC 1952 2.3.1: the last member's uncompressed size mod 2**32)."""
    with open(path, "rb") as handle:
        handle.seek(max(size - 4, 0))
        return int.from_bytes(handle.read(4), "little")


def gzip_decompressed_size(path: str | os.PathLike, stop_at: int | None = None, chunk: int = 1 << 20) -> int:
    """Bytes a (multi-member) gzip file decompresses to, counted by streaming in ``chunk``-sized pieces (memory
    stays at one chunk); counting stops once ``stop_at`` bytes are known. A damaged or truncated stream counts
    what decoded before the damage: the caller compares it with what it needs."""
    import zlib

    total = 0
    decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip wrapper, one member at a time
    pending = b""
    with open(path, "rb") as handle:
        while stop_at is None or total < stop_at:
            if not pending:
                pending = handle.read(chunk)
                if not pending:  # end of file: what the decoder still holds, if a member was cut short
                    try:
                        total += len(decoder.flush())
                    except zlib.error:
                        pass
                    break
            try:
                total += len(decoder.decompress(pending, chunk))
            except zlib.error:  # damage, or trailing bytes that are not another member (zero padding)
                break
            if decoder.eof:  # end of a member: the next one (if any) starts in unused_data
                pending = decoder.unused_data
                decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            else:
                pending = decoder.unconsumed_tail
    return total


def _orientation(path: str, affine: np.ndarray) -> str:
    """The affine's orientation letters (as :func:`axcodes`); refuses one that is not finite or maps a voxel axis
    to no world direction (a zero column, or axes that collapse onto each other): no orientation or spacing can
    be derived from it."""
    import nibabel

    codes = nibabel.aff2axcodes(affine) if np.isfinite(affine).all() else (None,)
    if affine.shape != (4, 4) or None in codes or len(set(codes)) < 3:
        raise DataError(path, f"degenerate or non-finite affine (orientation {codes}); check the header's "
                              f"sform/qform and pixdim:\n{np.array2string(affine, precision=4)}")
    return "".join(codes)


def read_nifti(path: str | os.PathLike, *, nan_value: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A 3D NIfTI-1/2 file via MONAI's ``NibabelReader`` (scl_slope/scl_inter applied) with its RAS affine.

    NaN or infinite voxels are an error unless ``nan_value`` is given, which replaces them (resampled
    images often carry NaN outside the field of view).
    """
    from monai.data import NibabelReader

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    reader = NibabelReader(squeeze_non_spatial_dims=True)
    try:
        _check_nifti_size(path)
        image = reader.read(path)
        array, header = reader.get_data(image)
        volume = np.asarray(array, dtype=np.float32)
    except DataError:
        raise
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib.error, ValueError, MemoryError...
        raise DataError(path, f"cannot read NIfTI: {type(err).__name__}: {err}") from err
    if volume.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {volume.shape}")
    if volume.size == 0:
        raise DataError(path, f"empty volume of shape {volume.shape}")
    steps: list[dict[str, Any]] = [{"op": "nifti_scaling", "source": "header scl_slope/scl_inter"}]
    bad = ~np.isfinite(volume)
    if bad.any():
        if nan_value is None:
            raise DataError(path, f"{int(bad.sum())} NaN or infinite voxels; set nan_value to replace them")
        volume[bad] = nan_value
        steps.append({"op": "replace_nan", "value": float(nan_value), "count": int(bad.sum())})
    affine = np.asarray(header["affine"], dtype=np.float64)
    meta = {
        "path": path,
        "format": "nifti",
        "modality": "",
        "units": "file values (scl_slope/scl_inter applied)",
        "shape": list(volume.shape),
        "affine": affine.tolist(),
        "spacing": _spacing(affine),
        "orientation": _orientation(path, affine),
        "value_range": [float(volume.min()), float(volume.max())],
        "preprocessing": steps,
    }
    return volume, meta


# -- either ----------------------------------------------------------------------------------------------
def read_volume(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    spacing: Sequence[float] | None = None,
    rescale: dict[str, float] | None = None,
    modalities: Sequence[str] | None = None,
    allow_gaps: bool = False,
    nan_value: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A NIfTI file or a DICOM series folder as float32 ``(X, Y, Z)`` plus metadata (see module doc).

    ``spacing`` (mm per axis) and ``rescale`` (``{"slope", "intercept"}``) override what the file says,
    for collections such as CT-RATE whose NIfTI headers lack them and ship them in a CSV instead.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        volume, meta = read_dicom_series(path, series_uid=series_uid, modalities=modalities, allow_gaps=allow_gaps)
    elif is_nifti_file(path):
        volume, meta = read_nifti(path, nan_value=nan_value)
    elif not os.path.exists(path):
        raise DataError(path, "not found (expected a NIfTI file or a DICOM series folder)")
    else:
        raise DataError(path, f"unsupported volume format; expected a folder of DICOM slices or {NIFTI_SUFFIXES}")
    if rescale:
        slope, intercept = float(rescale.get("slope", 1.0)), float(rescale.get("intercept", 0.0))
        volume = volume * np.float32(slope) + np.float32(intercept)
        meta["preprocessing"].append({"op": "rescale", "slope": slope, "intercept": intercept, "source": "manifest"})
        meta["value_range"] = [float(volume.min()), float(volume.max())]
    if spacing:
        if len(spacing) != 3 or min(spacing) <= 0:
            raise DataError(path, f"spacing override must be three positive numbers in mm, got {spacing}")
        affine = np.asarray(meta["affine"])
        directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        affine[:3, :3] = directions * np.asarray(spacing, dtype=np.float64)
        meta.update(affine=affine.tolist(), spacing=[float(s) for s in spacing])
        meta["preprocessing"].append({"op": "set_spacing", "spacing": meta["spacing"], "source": "manifest"})
    return volume, meta
