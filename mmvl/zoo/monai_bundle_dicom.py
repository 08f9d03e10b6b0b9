"""The DICOM steps of a MONAI bundle exported by mmvl, shipped inside it as ``scripts/mmvl_dicom.py``: it imports
MONAI, numpy and torch only, never mmvl, so the bundle runs where mmvl is not installed.

:class:`DicomVoid` is the VOI step of mmvl's ``LoadImage`` (``mmvl.data.dicom.read_dicom_image``) after MONAI's
``PydicomReader`` has applied (0028,1053) RescaleSlope and (0028,1052) RescaleIntercept: the window each file states
(PS3.3 C.11.2.1.2), chosen per file from its header, as a composition of MONAI intensity transforms, then the
MONOCHROME1 / PresentationLUTShape INVERSE inversion. What has no exact MONAI composition (a VOI LUT Sequence, a
Modality LUT Sequence, pixel padding, colour, several frames) is refused with the file's name, never approximated.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Activations, MapTransform, ScaleIntensity, ScaleIntensityRange

FALLBACK_PERCENTILES = (0.5, 99.5)  # mmvl.data.dicom.FALLBACK_PERCENTILES
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# DICOM JSON keys (PS3.18 F.2) of the attributes read here
MODALITY, SAMPLES_PER_PIXEL, PHOTOMETRIC, FRAMES = "00080060", "00280002", "00280004", "00280008"
WINDOW_CENTER, WINDOW_WIDTH, VOI_FUNCTION = "00281050", "00281051", "00281056"
RESCALE_SLOPE, MODALITY_LUT, VOI_LUT = "00281053", "00283000", "00283010"
PADDING_VALUE, PRESENTATION_LUT_SHAPE = "00280120", "20500020"


class BundleInputError(ValueError):
    """A file this bundle cannot preprocess exactly as mmvl does (the message names the file, the reason and what
    to use instead)."""

    def __init__(self, path: Any, problem: str):
        super().__init__(f"{path}: {problem}")


def _is_dicom(path: str) -> bool:
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    with open(path, "rb") as handle:  # the 'DICM' magic of PS3.10 7.1
        handle.seek(128)
        return handle.read(4) == b"DICM"


def input_files(dataset_dir: str, kind: str = "dicom") -> list[dict[str, str]]:
    """The data list of the bundle: every DICOM file (``kind="dicom"``) or NIfTI file (``"nifti"``) under
    ``dataset_dir``, sorted; an error, never an empty run, when there is none."""
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"dataset_dir {dataset_dir!r} is not a folder; run with --dataset_dir FOLDER")
    wanted = _is_dicom if kind == "dicom" else (lambda path: path.lower().endswith(NIFTI_SUFFIXES))
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(dataset_dir) for name in names)
    found = [{"image": path} for path in files if wanted(path)]
    if not found:
        hint = ""
        if kind == "nifti" and any(_is_dicom(path) for path in files):
            hint = ("; DICOM series are not read by this bundle (mmvl groups, sorts and checks slices its own way): "
                    "convert them to NIfTI or embed them with mmvl")
        raise FileNotFoundError(f"no {kind.upper()} file under {dataset_dir!r} ({len(files)} other files){hint}")
    return found


def _is_tag(key: Any) -> bool:
    """A DICOM JSON attribute key: eight upper-case hexadecimal digits."""
    return isinstance(key, str) and len(key) == 8 and all(c in "0123456789ABCDEF" for c in key)


def _values(header: Mapping[str, Any], tag: str) -> list[Any] | None:
    element = header.get(tag)
    if not isinstance(element, Mapping) or "Value" not in element:
        return None
    return list(element["Value"])


def _first(header: Mapping[str, Any], tag: str, default: Any = None) -> Any:
    values = _values(header, tag)
    return values[0] if values else default


class DicomVoid(MapTransform):
    """The VOI window of each DICOM file, to [0, 1], and MONOCHROME1 inversion (mmvl's ``LoadImage(voi=...)``).

    Reads the header that ``LoadImaged(reader="PydicomReader", prune_metadata=False)`` left in the image's
    metadata, and removes it afterwards (it holds the patient's identifiers). ``voi``: ``"auto"`` (the file's
    WindowCenter/Width, else its 0.5th to 99.5th percentiles), ``"window"`` (the file's window, required) or
    ``"minmax"``; ``window_index`` picks one of several windows; ``modalities`` refuses any other (0008,0060).
    """

    def __init__(self, keys: KeysCollection, voi: str = "auto", window_index: int = 0,
                 modalities: Sequence[str] | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if voi not in ("auto", "window", "minmax"):
            raise ValueError(f"DicomVoid: voi must be 'auto', 'window' or 'minmax', got {voi!r}")
        self.voi, self.window_index = voi, int(window_index)
        self.modalities = {m.upper() for m in modalities} if modalities else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d

    def window(self, image: Any) -> Any:
        meta = image.meta
        path = meta.get("filename_or_obj", "?")
        steps = self.steps(meta, image, path)
        image = image.float()
        for step in steps:
            image = step(image)
        if not torch.isfinite(image).all():
            raise BundleInputError(path, "pixel values are NaN or infinite after the modality/VOI transforms")
        for header in (meta, image.meta):  # the DICOM header (PatientName...): used, and not carried on
            for tag in [key for key in header if _is_tag(key)]:
                del header[tag]
        return image

    def steps(self, header: Mapping[str, Any], image: Any, path: Any) -> list[Any]:
        """The MONAI transforms that reproduce mmvl's VOI for this file, or an error naming what has none."""
        modality = str(_first(header, MODALITY, "") or "")
        if self.modalities and modality.upper() not in self.modalities:
            raise BundleInputError(path, f"modality '{modality or 'missing'}' but this model expects "
                                         f"{sorted(self.modalities)}")
        refusals = {
            MODALITY_LUT: "(0028,3000) ModalityLUTSequence: MONAI's PydicomReader applies rescale slope and intercept "
                          "only",
            PADDING_VALUE: "(0028,0120) PixelPaddingValue: mmvl leaves padding out of the window and sets it to 0, "
                           "which needs the stored values MONAI's reader does not keep",
        }
        if self.voi == "auto":
            refusals[VOI_LUT] = "(0028,3010) VOILUTSequence: a VOI lookup table has no MONAI transform"
        for tag, reason in refusals.items():
            if tag in header:
                raise BundleInputError(path, f"{reason}; embed this file with mmvl (mmvl.zoo.load)")
        if int(_first(header, SAMPLES_PER_PIXEL, 1) or 1) > 1:
            raise BundleInputError(path, "colour image: mmvl averages the channels, not reproduced by this bundle")
        if int(_first(header, FRAMES, 1) or 1) > 1:
            raise BundleInputError(path, "multi-frame image: this bundle reads single-frame files")
        if RESCALE_SLOPE in header and not _first(header, RESCALE_SLOPE):
            raise BundleInputError(path, "(0028,1053) RescaleSlope is empty or 0 (mmvl reads it as 1, MONAI's "
                                         "reader as 0)")

        centers, widths = _values(header, WINDOW_CENTER), _values(header, WINDOW_WIDTH)
        steps: list[Any] = []
        if centers and widths and self.voi in ("auto", "window"):
            center = float(centers[min(self.window_index, len(centers) - 1)])
            width = float(widths[min(self.window_index, len(widths) - 1)])
            function = str(_first(header, VOI_FUNCTION, "LINEAR") or "LINEAR").upper()
            steps += self.window_steps(center, width, function, path)
        elif self.voi == "window":
            raise BundleInputError(path, "voi='window' but the file has no (0028,1050/1051) WindowCenter/Width")
        elif self.voi == "minmax":
            steps.append(ScaleIntensity(minv=0.0, maxv=1.0))
        else:
            values = np.asarray(image, dtype=np.float32)
            low, high = (float(v) for v in np.percentile(values, FALLBACK_PERCENTILES))
            if high > low:
                steps.append(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
            else:  # a mostly flat image: its min and max, as mmvl.data.dicom.percentile_window
                steps.append(ScaleIntensity(minv=0.0, maxv=1.0))
        photometric = str(_first(header, PHOTOMETRIC, "MONOCHROME2") or "").upper()
        shape = str(_first(header, PRESENTATION_LUT_SHAPE, "") or "").strip().upper()
        if photometric == "MONOCHROME1" or shape == "INVERSE":  # PS3.3 C.11.6.1: one inversion, not two
            steps.append(ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=1.0, b_max=0.0))
        return steps

    @staticmethod
    def window_steps(center: float, width: float, function: str, path: Any) -> list[Any]:
        """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID), output [0, 1]."""
        if function == "SIGMOID":  # 1 / (1 + exp(-4 (x - c) / w)): a linear map to 4 (x - c) / w, then the sigmoid
            return [ScaleIntensityRange(a_min=center, a_max=center + width / 4.0, b_min=0.0, b_max=1.0),
                    Activations(sigmoid=True)]
        if function == "LINEAR_EXACT":
            if width <= 0:
                raise BundleInputError(path, f"(0028,1051) WindowWidth must be > 0 for LINEAR_EXACT, got {width}")
            return [ScaleIntensityRange(a_min=center - width / 2.0, a_max=center + width / 2.0, b_min=0.0, b_max=1.0,
                                        clip=True)]
        if width < 1:
            raise BundleInputError(path, f"(0028,1051) WindowWidth must be >= 1 for LINEAR, got {width}")
        span = max(width - 1.0, 1e-6)  # ((x - (c - 0.5)) / (w - 1) + 0.5, clipped
        return [ScaleIntensityRange(a_min=center - 0.5 - span / 2.0, a_max=center - 0.5 + span / 2.0, b_min=0.0,
                                    b_max=1.0, clip=True)]
