"""Shared fixtures: DICOM files written on the fly, and a small synthetic CXR set built once per session."""

from __future__ import annotations

import faulthandler
import gc
import importlib.util
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    spacing=(0.8, 0.7, 2.5),
    row_dir=(1.0, 0.0, 0.0),
    col_dir=(0.0, 1.0, 0.0),
    origin=(-20.0, -15.0, 30.0),
    instance_order: str = "reversed",
    seed: int = 0,
    modality: str = "CT",
    **attributes,
) -> dict:
    """Write ``hu`` (X, Y, Z) as one CT slice per file with random names, in LPS geometry.

    Voxel (i, j, k) lies at ``origin + i*sx*row_dir + j*sy*col_dir + k*sz*normal`` (LPS mm). InstanceNumber
    runs ``"reversed"``, ``"shuffled"`` or in ``"position"`` order. Returns the series UID, the RAS affine
    a reader should report and the file paths.
    """
    from pydicom.uid import CTImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    row_dir, col_dir, origin = (np.asarray(v, dtype=np.float64) for v in (row_dir, col_dir, origin))
    normal = np.cross(row_dir, col_dir)
    n = hu.shape[2]
    numbers = {"reversed": np.arange(n)[::-1], "shuffled": rng.permutation(n), "position": np.arange(n)}[instance_order]
    series_uid = generate_uid(entropy_srcs=[str(folder), str(seed), "series"])
    study_uid = generate_uid(entropy_srcs=[str(folder), str(seed), "study"])
    paths = []
    for k in range(n):
        position = origin + k * spacing[2] * normal
        path = folder / f"{rng.integers(1 << 40):011x}.dcm"
        write_dicom(
            path, (hu[:, :, k].T + 2048).astype(np.uint16), Modality=modality,
            SOPClassUID=CTImageStorage, SeriesInstanceUID=series_uid, StudyInstanceUID=study_uid,
            InstanceNumber=int(numbers[k]) + 1, ImagePositionPatient=[float(v) for v in position],
            ImageOrientationPatient=[float(v) for v in (*row_dir, *col_dir)],
            PixelSpacing=[float(spacing[1]), float(spacing[0])], SliceThickness=float(spacing[2]),
            RescaleSlope=1, RescaleIntercept=-2048, BitsStored=12, HighBit=11, **attributes,
        )
        paths.append(path)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row_dir * spacing[0], col_dir * spacing[1], normal * spacing[2]
    affine[:3, 3] = origin
    return {"series_uid": series_uid, "affine": np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, "paths": paths}


def make_phantom(shape=(12, 10, 8), seed: int = 0) -> np.ndarray:
    """A CT-like HU volume whose every slice differs, so slice order errors show."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    body = np.where(x**2 + y**2 < 0.8, 40.0, -1000.0)
    return (body + 300 * z + 50 * x + rng.integers(-20, 20, shape)).round().astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def no_child_process_left():
    """Every test module ends with no live child process of its own (module-scoped: the fuzz tests share one reader
    process): a DataLoader worker left running is stopped only by multiprocessing's exit handler, and one that
    ignores its SIGTERM made that handler wait forever (CI timed out after pytest had printed "980 passed")."""
    before = set(multiprocessing.active_children())
    yield
    left = set(multiprocessing.active_children()) - before
    if left:
        gc.collect()  # a loader or pool in a reference cycle stops its workers when collected
        left = set(multiprocessing.active_children()) - before
    assert not left, f"the module left child processes running: {sorted(p.name for p in left)}"


def pytest_unconfigure(config):
    # If anything still blocks the interpreter's exit 5 minutes after the run (a thread or process the test above
    # cannot see), print every thread's stack and exit 1 instead of hanging until CI's time limit.
    faulthandler.dump_traceback_later(300, exit=True)


@pytest.fixture
def ct_series():
    """``(write_ct_series, make_phantom)``: write a CT series folder and make a test volume."""
    return write_ct_series, make_phantom


@pytest.fixture
def one_thread():
    """One intra-op torch thread for training tests of tiny models: they gain nothing from a second thread, and
    where other jobs share the 2 cores torch's spin-waiting OpenMP threads made their steps 10-20x slower
    (0.07 s -> 1.5 s per step measured). The setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_dicom(tmp_path):
    def _make(name: str, pixels: np.ndarray, **attributes) -> Path:
        return write_dicom(tmp_path / name, pixels, **attributes)

    return _make


def _load_file(folder: str, name: str):
    """Import ``<folder>/<name>.py``: the scripts in datasets/, tools/ and benchmarks/ are not packages."""
    spec = importlib.util.spec_from_file_location(f"mmvl_{folder}_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def load_script(name: str):
    """A script from ``datasets/`` (not a package, so it cannot shadow HF ``datasets``)."""
    return _load_file("datasets", name)


def load_tool(name: str):
    """A command-line tool from ``tools/``, to call its ``main(argv)``."""
    return _load_file("tools", name)


def load_bench(name: str):
    """A benchmark script from ``benchmarks/``."""
    return _load_file("benchmarks", name)


@pytest.fixture(scope="session")
def synthetic_cxr(tmp_path_factory) -> Path:
    """200 synthetic DICOM studies at 64 px (manifest path); shared by training and data tests."""
    out = tmp_path_factory.mktemp("synthetic_cxr")
    return Path(load_script("synthetic").generate(out, n=200, size=64, seed=0))


# configs/demo/cxr_clip_tiny.py made smaller still (2-layer ViT/BERT of width 64), so CI trains it in seconds.
TINY_CLIP = [
    "model.image_encoder.depth=2", "model.image_encoder.embed_dim=64", "model.image_encoder.num_heads=2",
    "model.text_encoder.config.hidden_size=64", "model.text_encoder.config.intermediate_size=128",
    "model.text_encoder.config.num_attention_heads=2", "model.heads.0.embed_dim=64",
    "train.num_workers=0", "train.log_interval=1",
    "optim.warmup_steps=0",  # the demo's 30 warmup steps would outlast these short runs (the config check refuses)
]


def tiny_clip_config(manifest: Path, *options: str):
    from mmvl.config import Config

    cfg = Config.fromfile(REPO / "configs" / "demo" / "cxr_clip_tiny.py")
    cfg.merge_options([f"data.manifest={manifest}", *TINY_CLIP, *options])
    return cfg


@pytest.fixture(scope="session")
def tiny_clip(synthetic_cxr, tmp_path_factory):
    """``(work_dir, final validation metrics)`` of the tiny CLIP model trained for 300 steps on ``synthetic_cxr``
    (about 30 s on one core); shared by the training, zero-shot and evaluation tests."""
    from mmvl.engine.trainer import Trainer

    work = tmp_path_factory.mktemp("tiny_clip") / "run"
    cfg = tiny_clip_config(synthetic_cxr, "train.max_steps=300", "train.batch_size=32", "train.val_interval=300",
                           "train.ckpt_interval=300", "optim.warmup_steps=30")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = Trainer(cfg, work).fit()
    finally:
        torch.set_num_threads(threads)
    return work, metrics
