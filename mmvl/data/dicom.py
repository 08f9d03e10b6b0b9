"""2D DICOM reading: stored values -> modality LUT -> VOI LUT / window -> inversion -> padding -> [0, 1].

Implements the DICOM grayscale pipeline of PS3.3 C.11 (modality LUT, VOI LUT, presentation) with pydicom.
Only geometry and acquisition attributes go into the returned metadata, never patient identifiers.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Literal

import numpy as np

from mmvl.errors import DicomError

VoiMode = Literal["auto", "window", "lut", "minmax"]
# The window used when a file states none: the 0.5th to 99.5th percentile of the (non-padding) values, so a few
# hot pixels, burnt-in labels or collimator edges do not squeeze the anatomy into a sliver of the range.
FALLBACK_PERCENTILES = (0.5, 99.5)

# Attributes that identify a patient or the people and places of their care (PS3.15 E.1-1, the Basic
# Application Level Confidentiality Profile, for the ones a chest X-ray or CT export carries). Their values
# never go into metadata, logs or error messages; ``datasets/`` converters strip them with ``--deidentify``.
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
    "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "PatientBirthName", "PatientMotherBirthName", "MedicalRecordLocator", "IssuerOfPatientID",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "StationName", "DeviceSerialNumber",
    "RequestAttributesSequence", "ReferencedPatientSequence", "EthnicGroup", "Occupation",
    "AdditionalPatientHistory", "PatientComments", "ResponsiblePerson", "MilitaryRank", "BranchOfService",
    "CountryOfResidence", "RegionOfResidence", "CurrentPatientLocation", "PatientInstitutionResidence",
)
_QUOTED = re.compile(r"""(['"])(?:(?!\1).){1,200}?\1""")


def phi_values(ds: Any) -> set[str]:
    """The text of every PHI attribute in ``ds`` (person names also split at ``^``), to keep out of messages."""
    values: set[str] = set()
    for keyword in PHI_KEYWORDS:
        if keyword.endswith("Sequence"):
            continue  # nested items: readers' errors do not quote them
        try:
            element = ds.get(keyword)
            text = "" if element is None else str(element).strip()
        except Exception:  # a value too malformed to convert: pydicom's error quotes nothing of it
            continue
        for part in {text, *text.split("^")}:
            if len(part.strip()) >= 2:
                values.add(part.strip())
    return values


def redact(message: str, ds: Any = None) -> str:
    """``message`` without any PHI value of ``ds``; with no dataset (the header could not be parsed), without
    any quoted text, since that is where pydicom and numpy quote element values."""
    if ds is None:
        return _QUOTED.sub("'<redacted>'", message)
    try:
        values = phi_values(ds)
    except Exception:
        return _QUOTED.sub("'<redacted>'", message)
    for value in sorted(values, key=len, reverse=True):
        message = message.replace(value, "<redacted>")
    return message


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file carries the 'DICM' magic at byte 128 (PS3.10 7.1) or a .dcm/.dicom suffix."""
    path = os.fspath(path)
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def window_to_unit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a VOI window and map it to [0, 1] (a new float32 array; ``values`` is left as it was).

    Written out rather than taken from ``pydicom.pixels.apply_windowing`` because that maps to a
    bit-depth-dependent output range; the formulas are PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2
    (LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID) with output range [0, 1].
    """
    return window_in_place(np.array(values, dtype=np.float32), center, width, function)


def window_in_place(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """:func:`window_to_unit` written into ``values`` (float32, which it returns): no temporary arrays, which
    on a 2-3k px radiograph is most of what windowing costs. float32 keeps ~1e-7 of the [0, 1] output."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        values -= np.float32(center)
        values *= np.float32(-4.0 / width)
        np.exp(values, out=values)
        values += np.float32(1.0)
        np.reciprocal(values, out=values)
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"(0028,1051) WindowWidth must be > 0 for LINEAR_EXACT, got {width}")
        values -= np.float32(center)
        values /= np.float32(width)
        values += np.float32(0.5)
    else:
        if width < 1:
            raise ValueError(f"(0028,1051) WindowWidth must be >= 1 for LINEAR, got {width}")
        # ((v - (c - 0.5)) / (w - 1) + 0.5) written as (v - (c - w/2)) / (w - 1): one pass fewer; the float64
        # offset is exact for the half-integer centres and widths headers hold
        values -= np.float32(center - width / 2.0)
        values *= np.float32(1.0 / max(width - 1.0, 1e-6))
    return np.clip(values, 0.0, 1.0, out=values)


def modality_values(stored: np.ndarray, ds: Any) -> np.ndarray:
    """The modality LUT (PS3.3 C.11.1) as a new float32 array: (0028,1053) RescaleSlope and (0028,1052)
    RescaleIntercept applied in place in float32 (pydicom goes through float64: two more full-size arrays);
    a (0028,3000) ModalityLUTSequence through pydicom."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.array(apply_modality_lut(stored, ds), dtype=np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    if slope != 1.0:  # the cast and the scaling in one pass
        values = np.multiply(stored, np.float32(slope), dtype=np.float32)
    else:
        values = stored.astype(np.float32)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _pick(value: Any, index: int) -> float:
    """WindowCenter/WindowWidth may be multi-valued (several presets); take one."""
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        value = value[min(index, len(value) - 1)]
    return float(value)


def decoder_support() -> dict[str, dict[str, Any]]:
    """Which compressed transfer syntaxes the installed pydicom plugins can decode, and what to install."""
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS

    support = {}
    for uid, (decoder, *_rest) in sorted(_PIXEL_DATA_DECODERS.items(), key=lambda item: item[0].name):
        support[uid.name] = {
            "uid": str(uid),
            "available": decoder.is_available,
            "plugins": sorted(decoder.available_plugins),
            "install": [] if decoder.is_available else decoder.missing_dependencies,
        }
    return support


def _decode_error(ds: Any, path: str, err: Exception) -> DicomError:
    """Name the transfer syntax and, when no plugin can decode it, what to pip-install."""
    from pydicom.pixels import get_decoder

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", str(syntax))
    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError, TypeError):
        decoder = None
    if decoder is not None and not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        return DicomError(path, f"no installed plugin decodes transfer syntax '{name}'; install one of: {needs}")
    return DicomError(path, redact(f"cannot decode pixel data with transfer syntax '{name}': {err}", ds))


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # ISO/IEC 15444-1 I.5.1 signature box


def check_jpeg2000_boxes(ds: Any, path: str) -> None:
    """Refuse a JPEG 2000 frame whose JP2 boxes before the codestream have a length below 8.

    pydicom (3.0) walks those boxes to find the codestream and loops forever on a zero length
    (``pydicom.pixels.utils.get_j2k_parameters``); a damaged file must be an error, not a hang. Lengths 0
    ("to the end of the file") and 1 (64-bit XLBox) are legal (I.4) but never precede the jp2c box.
    """
    from pydicom.encaps import generate_frames
    from pydicom.uid import JPEG2000TransferSyntaxes

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax not in JPEG2000TransferSyntaxes or "PixelData" not in ds:
        return
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    for index, data in enumerate(generate_frames(ds.PixelData, number_of_frames=n_frames)):
        if not data.startswith(_JP2_SIGNATURE[:8]):
            continue  # a bare J2K codestream: no boxes to walk
        offset = 12
        while offset < len(data) and data[offset + 4:offset + 8] != b"jp2c":
            length = int.from_bytes(data[offset:offset + 4], "big")
            if length < 8:
                raise DicomError(path, f"frame {index}: JPEG 2000 box at byte {offset} has length {length} before "
                                       "the codestream (damaged JP2 header)")
            offset += length


# Explicit and Implicit VR Little Endian: most files from modalities and PACS exports store pixels this way.
_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


def native_frame(ds: Any, frame: int, n_frames: int) -> np.ndarray | None:
    """One frame of uncompressed little-endian grayscale pixel data, read straight from the ``PixelData`` bytes;
    None for anything else (compressed, big endian, colour, 1-bit, short data), which pydicom decodes.

    Written out because pydicom's decoder validates its whole option set on each call: ~1 ms per 512 px
    radiograph, more than reading the file (benchmarks/bench_data.py). The values are pydicom's: the bits above
    (0028,0101) BitsStored are cleared, or sign-extended for signed pixels, as ``pixel_array`` does (tested equal
    on every file pydicom bundles).
    """
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax not in _NATIVE_LITTLE_ENDIAN:
        return None
    try:
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed, samples = int(ds.PixelRepresentation), int(ds.get("SamplesPerPixel", 1) or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        data = ds.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if (samples != 1 or allocated not in (8, 16, 32) or not 1 <= stored <= allocated or signed not in (0, 1)
            or not isinstance(data, bytes)):
        return None
    size = allocated // 8
    frame_bytes = rows * columns * size
    if len(data) < n_frames * frame_bytes:
        return None  # pydicom's decoder names what is missing
    dtype = np.dtype(f"<{'i' if signed else 'u'}{size}")
    arr = np.frombuffer(data, dtype=dtype, count=rows * columns, offset=frame * frame_bytes).reshape(rows, columns)
    if stored < allocated:
        shift = allocated - stored
        arr = np.left_shift(arr, shift)  # a writable copy: the frame bytes stay as read
        np.right_shift(arr, shift, out=arr)
    return arr


def _decode(ds: Any, path: str, frame: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows == 0 or columns == 0:
        raise DicomError(path, f"empty image: (0028,0010/0011) Rows x Columns = {rows} x {columns}")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if not -n_frames <= frame < n_frames:
        raise DicomError(path, f"frame {frame} requested but the file has {n_frames} frame(s) (0028,0008)")
    native = native_frame(ds, frame % n_frames, n_frames)
    if native is not None:
        return native
    check_jpeg2000_boxes(ds, path)
    try:
        arr = pixel_array(ds, index=frame % n_frames) if n_frames > 1 else ds.pixel_array
    except Exception as err:  # pydicom raises RuntimeError/NotImplementedError/ValueError by decoder
        raise _decode_error(ds, path, err) from err
    arr = np.asarray(arr)
    if arr.size == 0:
        raise DicomError(path, f"pixel data decodes to an empty array (Rows x Columns = {arr.shape})")
    return arr


def check_modality(path: str, modality: str, allowed: Any) -> None:
    """Refuse a file whose (0008,0060) Modality is not in ``allowed`` (None or empty: anything goes)."""
    if allowed and modality.upper() not in {m.upper() for m in allowed}:
        raise DicomError(path, f"modality '{modality or 'missing'}' but this pipeline expects {sorted(allowed)}")


def _header_phi(path: str) -> Any:
    """Just the PHI attributes of a file whose full header failed to parse, to redact its error; None if
    even they cannot be read."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=list(PHI_KEYWORDS))
    except Exception:
        return None


def read_dataset(path: str) -> Any:
    """``pydicom.dcmread`` with errors that name the file (never a PHI value); refuses objects without PixelData."""
    with warnings.catch_warnings():  # pydicom's warnings quote element values, names included
        warnings.simplefilter("ignore")
        return _read_dataset(path)


def _read_dataset(path: str) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not os.path.isfile(path):
        raise DicomError(path, "file not found")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise DicomError(path, redact(f"not a DICOM file ({err})", _header_phi(path))) from err
    except Exception as err:  # truncated or corrupt headers raise a range of errors
        message = f"corrupt DICOM header: {type(err).__name__}: {err}"
        raise DicomError(path, redact(message, _header_phi(path))) from err
    if "PixelData" not in ds:
        try:
            sop_class = ds.get("SOPClassUID")
            kind = None if sop_class is None else getattr(sop_class, "name", str(sop_class))
        except Exception:  # a malformed UID value
            kind = "unreadable (0008,0016) SOPClassUID"
        if kind is None:
            raise DicomError(path, "corrupt or truncated DICOM: neither (0008,0016) SOPClassUID nor PixelData")
        raise DicomError(path, redact(f"no (7FE0,0010) PixelData: not an image ({kind})", ds))
    return ds


def read_dicom_image(
    path: str | os.PathLike,
    *,
    frame: int = 0,
    voi: VoiMode = "auto",
    window_index: int = 0,
    modalities: Any = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a 2D (or one frame of a multi-frame) grayscale DICOM as float32 ``(H, W)`` in [0, 1].

    voi: ``"auto"`` uses the VOI LUT Sequence (0028,3010) if present, else WindowCenter/Width
    (0028,1050/1051), else a window from the 0.5th to the 99.5th percentile of the rescaled values;
    ``"window"``/``"lut"`` require that attribute; ``"minmax"`` ignores both and stretches min to max.
    MONOCHROME1 images, and those with (2050,0020) PresentationLUTShape INVERSE, are inverted so bright
    means dense. Pixels marked by (0028,0120) PixelPaddingValue (up to (0028,0121) PixelPaddingRangeLimit)
    take no part in the fallback window and come out as 0.
    modalities: if given, a file whose Modality is not listed is refused (e.g. ``("CR", "DX")``).
    Compressed transfer syntaxes decode when a pydicom plugin for them is installed (see
    :func:`decoder_support`); otherwise the error says what to install.
    """
    path = os.fspath(path)
    ds = read_dataset(path)
    try:
        with warnings.catch_warnings():  # pydicom's warnings quote element values, names included
            warnings.simplefilter("ignore")
            return _read_image(ds, path, frame, voi, window_index, modalities)
    except DicomError as err:
        raise DicomError(path, redact(err.problem, ds)) from err
    except Exception as err:  # a hostile or damaged header breaks the pipeline in many ways; name the file
        message = f"malformed DICOM attribute values: {type(err).__name__}: {err}"
        raise DicomError(path, redact(message, ds)) from err


def _read_image(ds: Any, path: str, frame: int, voi: VoiMode, window_index: int, modalities: Any):
    from pydicom.pixels import apply_voi_lut

    check_modality(path, str(getattr(ds, "Modality", "")), modalities)

    stored = _decode(ds, path, frame)
    steps: list[dict[str, Any]] = []
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    padding = None
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1 or stored.ndim == 3:
        # Colour secondary captures: average the channels; the grayscale LUT pipeline does not apply.
        values = stored.reshape(*stored.shape[:2], -1).astype(np.float32).mean(-1)
        steps.append({"op": "rgb_to_gray", "photometric": photometric})
        unit = _minmax(values)
        steps.append({"op": "minmax"})
        photometric = "MONOCHROME2"
    else:
        values = modality_values(stored, ds)  # a fresh array: the VOI step below may window it in place
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if "ModalityLUTSequence" in ds:
            steps.append({"op": "modality_lut", "source": "(0028,3000) ModalityLUTSequence"})
        else:
            steps.append({"op": "rescale", "slope": slope, "intercept": intercept})
        padding = padding_mask(ds, stored)
        unit = _apply_voi(values, ds, path, voi, window_index, steps, apply_voi_lut, padding)

    # Integer pixels through a rescale and a window with finite numbers end finite (the window clips, a sigmoid
    # saturates): the full-image scan is needed only for float pixel data and LUT or fallback paths.
    windowed = (stored.dtype.kind in "iu" and len(steps) == 2 and steps[0]["op"] == "rescale"
                and steps[1]["op"] == "window" and all(math.isfinite(v) for v in (
                    steps[0]["slope"], steps[0]["intercept"], steps[1]["center"], steps[1]["width"])))
    if not windowed and not np.isfinite(unit).all():
        raise DicomError(path, "pixel values are NaN or infinite after the modality/VOI transforms")
    # PS3.3 C.11.6.1: INVERSE maps the minimum P-value to white, as MONOCHROME1 does. DX objects carry both at
    # once (C.8.11.1.1.1: MONOCHROME1 requires INVERSE), which is one inversion, not two.
    lut_shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if photometric == "MONOCHROME1" or lut_shape == "INVERSE":
        np.subtract(np.float32(1.0), unit, out=unit)
        reason = "MONOCHROME1" if photometric == "MONOCHROME1" else "PresentationLUTShape INVERSE"
        steps.append({"op": "invert", "reason": reason})
    if padding is not None and padding.any():
        # Padding is no tissue: after the inversion too it is the background (0), whatever the window made of it.
        unit[padding] = 0.0
        steps.append({"op": "mask_padding", "pixels": int(padding.sum())})

    spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    meta = {
        "path": path,
        "format": "dicom",
        "modality": str(getattr(ds, "Modality", "")),
        "photometric": str(getattr(ds, "PhotometricInterpretation", "")),
        "bits_stored": int(getattr(ds, "BitsStored", 0) or 0),
        "shape": list(unit.shape),
        "spacing": [float(s) for s in spacing] if spacing else None,
        "orientation": _orientation(ds),
        "frame": frame,
        "n_frames": int(getattr(ds, "NumberOfFrames", 1) or 1),
        "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")),
        "preprocessing": steps,
    }
    return unit.astype(np.float32, copy=False), meta


def _orientation(ds: Any) -> list[float] | str | None:
    """ImageOrientationPatient (0020,0037) when present, else the PatientOrientation (0020,0020) labels."""
    if "ImageOrientationPatient" in ds:
        return [float(v) for v in ds.ImageOrientationPatient]
    labels = getattr(ds, "PatientOrientation", None)
    return "\\".join(str(v) for v in labels) if labels else None


def _minmax(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return ((values - low) / (high - low) if high > low else np.zeros_like(values)).astype(np.float32)


def padding_mask(ds: Any, stored: np.ndarray) -> np.ndarray | None:
    """Pixels whose stored value is (0028,0120) PixelPaddingValue, or lies between it and (0028,0121)
    PixelPaddingRangeLimit (PS3.3 C.7.5.1.1.2; both in stored-value units, before the modality LUT)."""
    if ds.get("PixelPaddingValue") is None:
        return None
    value = int(ds.PixelPaddingValue)
    limit = ds.get("PixelPaddingRangeLimit")
    low, high = sorted((value, int(limit))) if limit is not None else (value, value)
    return (stored >= low) & (stored <= high)


def percentile_window(values: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    """The :data:`FALLBACK_PERCENTILES` of ``values`` (only where ``valid``); the min and max when those two
    coincide (a mostly flat image), so a small object on a constant field still shows."""
    chosen = values if valid is None else values[valid]
    if chosen.size == 0:
        return 0.0, 0.0
    low, high = (float(v) for v in np.percentile(chosen, FALLBACK_PERCENTILES))
    if high <= low:
        low, high = float(chosen.min()), float(chosen.max())
    return low, high


def _voi_lut_range(ds: Any, index: int, apply_voi_lut) -> tuple[float, float]:
    """Lowest and highest entry of a VOI LUT, found by passing every input it maps through pydicom (which
    reads the US or OW LUTData): vendors declare 16 bits per entry for 12-bit data (PS3.3 C.11.2.1.1 allows
    it), so dividing by the declared depth would leave such images at a sixteenth of the range."""
    descriptor = ds.VOILUTSequence[index].LUTDescriptor
    entries, first = int(descriptor[0]) or 2**16, int(descriptor[1])
    every_input = np.arange(first, first + entries, dtype=np.float32)
    table = np.asarray(apply_voi_lut(every_input, ds, index=index, prefer_lut=True), dtype=np.float64)
    return float(table.min()), float(table.max())


def _apply_voi(values, ds, path, voi, window_index, steps, apply_voi_lut, padding=None) -> np.ndarray:
    has_lut = "VOILUTSequence" in ds
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if voi == "lut" and not has_lut:
        raise DicomError(path, "voi='lut' requested but the file has no (0028,3010) VOILUTSequence")
    if voi == "window" and not has_window:
        raise DicomError(path, "voi='window' requested but the file has no (0028,1050/1051) WindowCenter/Width")
    if has_lut and voi in ("auto", "lut"):
        index = min(window_index, len(ds.VOILUTSequence) - 1)
        bits = int(ds.VOILUTSequence[index].LUTDescriptor[2])
        low, high = _voi_lut_range(ds, index, apply_voi_lut)
        out = apply_voi_lut(values, ds, index=index, prefer_lut=True).astype(np.float64)
        steps.append({"op": "voi_lut", "bits": bits, "lut_range": [low, high]})
        if high <= low:
            return np.zeros(values.shape, dtype=np.float32)
        return np.clip((out - low) / (high - low), 0, 1).astype(np.float32)
    if has_window and voi in ("auto", "window"):
        center = _pick(ds.WindowCenter, window_index)
        width = _pick(ds.WindowWidth, window_index)
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR")
        try:
            out = window_in_place(values, center, width, function)
        except ValueError as err:
            raise DicomError(path, str(err)) from err
        steps.append({"op": "window", "center": center, "width": width, "function": function.upper()})
        return out
    valid = None if padding is None else ~padding
    if voi == "minmax":
        chosen = values if valid is None or not valid.any() else values[valid]
        low, high = float(chosen.min()), float(chosen.max())
        steps.append({"op": "minmax"})
    else:
        low, high = percentile_window(values, valid)
        steps.append({"op": "percentile_window", "percentiles": list(FALLBACK_PERCENTILES), "range": [low, high]})
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    values -= np.float32(low)  # in place: ``values`` is the reader's own float32 array
    values /= np.float32(high - low)
    return np.clip(values, 0.0, 1.0, out=values)
