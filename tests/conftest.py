"""Shared fixtures: DICOM files written on the fly, and a small synthetic CXR set built once per session."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MMVL_NO_PROGRESS", "1")


def write_dicom(path: Path, pixels: np.ndarray, **attributes) -> Path:
    """Write a minimal valid DICOM (explicit VR little endian) with ``pixels`` as stored values."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "TEST^SECRET"
    ds.PatientID = "PID-SECRET-0001"
    frames = pixels if pixels.ndim == 3 else pixels[None]
    ds.Rows, ds.Columns = frames.shape[1:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = frames.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture
def make_dicom(tmp_path):
    def _make(name: str, pixels: np.ndarray, **attributes) -> Path:
        return write_dicom(tmp_path / name, pixels, **attributes)

    return _make


def load_script(name: str):
    """Import a script from ``datasets/`` (not a package, so it cannot shadow HF ``datasets``)."""
    spec = importlib.util.spec_from_file_location(f"mmvl_script_{name}", REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synthetic_cxr(tmp_path_factory) -> Path:
    """200 synthetic DICOM studies at 64 px (manifest path); shared by training and data tests."""
    out = tmp_path_factory.mktemp("synthetic_cxr")
    return Path(load_script("synthetic").generate(out, n=200, size=64, seed=0))
