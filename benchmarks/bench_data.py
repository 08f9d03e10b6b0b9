"""Data-loading speed: mmvl's ``ManifestDataset`` (no cache, disk cache, memory cache) against the loading
code people write by hand (pydicom / nibabel + PIL / scipy), on synthetic chest X-rays and chest CTs.

``python benchmarks/bench_data.py`` prints one table per collection and one JSON line ``{"bench": "data", ...}``
with every figure; see benchmarks/README.md for what each path does and the options.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MMVL_NO_PROGRESS", "1")  # no tqdm bar while the memory cache fills

# The eval pipelines of configs/_base_/datasets/cxr_manifest.py and ct_manifest.py; the CT crop size is chosen
# from the data (see ct_volume_size), the spacing can be changed with --spacing-3d.
IMG_SIZE = 224
MEAN, STD = 0.5, 0.25
SPACING = (1.5, 1.5, 3.0)
HU_WINDOW = (-1000.0, 1000.0)
CXR_PIPELINE = [
    dict(type="LoadImage", frame=0, voi="auto"),
    dict(type="ResizePad", size=IMG_SIZE),
    dict(type="Normalize", mean=MEAN, std=STD),
]

METHODS = {  # key -> table label; "plain" is the baseline of the speedups
    "plain": "plain (hand-written)",
    "mmvl_cold": "mmvl, no cache",
    "mmvl_disk_fill": "mmvl, disk cache fill",
    "mmvl_disk_hit": "mmvl, disk cache hit",
    "mmvl_memory_fill": "mmvl, memory cache fill",
    "mmvl_memory": "mmvl, memory cache hit",
}
COLLECTIONS = ("cxr_dicom", "cxr_dicom_large", "cxr_dicom_j2k", "ct_dicom", "ct_nifti")
CT_VOLUMES_TO_PLAN = 50_000  # CT-RATE's chest CTs: the hospital-size breakdown prints core-hours for this many


def ct_pipeline(volume_size: Sequence[int], spacing: Sequence[float] = SPACING) -> list[dict[str, Any]]:
    return [
        dict(type="LoadVolume", modalities=("CT",)),
        dict(type="Orient", axcodes="RAS"),
        dict(type="Resample", spacing=tuple(spacing)),
        dict(type="IntensityWindow", low=HU_WINDOW[0], high=HU_WINDOW[1]),
        dict(type="CropOrPad", size=tuple(volume_size), pad_value=0.0),
        dict(type="Normalize", mean=MEAN, std=STD),
    ]


def load_script(name: str):
    """Import a script from ``datasets/`` (not a package, so it cannot shadow HF ``datasets``)."""
    spec = importlib.util.spec_from_file_location(f"mmvl_script_{name}", REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuples and dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


# -- the plain way ---------------------------------------------------------------------------------------
def plain_cxr(path: str, size: int = IMG_SIZE) -> np.ndarray:
    """What a hand-written loader does: rescale, window, invert MONOCHROME1, squash to size x size with PIL."""
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float32)
    values = values * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))  # (0028,1053/1052)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = (float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
                         for v in (ds.WindowCenter, ds.WindowWidth))
        unit = np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
    else:
        unit = (values - values.min()) / max(float(values.max() - values.min()), 1e-6)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit
    resized = np.asarray(Image.fromarray(unit).resize((size, size), Image.BILINEAR))
    return ((resized - MEAN) / STD).astype(np.float32)[None]


def center_crop_or_pad(volume: np.ndarray, size: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """Centre crop or pad each axis to ``size`` (the split MONAI's ResizeWithPadOrCrop uses)."""
    for axis, target in enumerate(size):
        length = volume.shape[axis]
        if length > target:
            start = (length - target) // 2
            volume = np.take(volume, range(start, start + target), axis=axis)
        elif length < target:
            before = (target - length) // 2
            widths = [(0, 0)] * volume.ndim
            widths[axis] = (before, target - length - before)
            volume = np.pad(volume, widths, constant_values=pad_value)
    return volume


def _plain_ct_finish(hu: np.ndarray, voxel_mm: Sequence[float], volume_size: Sequence[int],
                     spacing: Sequence[float]) -> np.ndarray:
    """scipy zoom (linear) to ``spacing``, clip the HU window to [0, 1], crop/pad with air, normalise."""
    from scipy import ndimage

    factors = [float(have) / want for have, want in zip(voxel_mm, spacing)]
    resampled = ndimage.zoom(hu, factors, order=1)
    low, high = HU_WINDOW
    unit = np.clip((resampled - low) / (high - low), 0.0, 1.0)
    unit = center_crop_or_pad(unit, volume_size, pad_value=0.0)
    return ((unit - MEAN) / STD).astype(np.float32)[None]


def plain_ct_dicom(folder: str, volume_size: Sequence[int], spacing: Sequence[float] = SPACING,
                   series_uid: str | None = None) -> np.ndarray:
    """Read every slice, sort by (0020,0013) InstanceNumber, stack, rescale to HU, zoom by PixelSpacing and
    SliceThickness; no orientation handling. ``series_uid`` (from the manifest) drops other series' files."""
    import pydicom

    slices = [pydicom.dcmread(os.path.join(folder, name)) for name in os.listdir(folder)]
    if series_uid is not None:
        slices = [ds for ds in slices if ds.SeriesInstanceUID == series_uid]
    slices.sort(key=lambda ds: int(ds.InstanceNumber))
    hu = np.stack([ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                   for ds in slices], axis=-1).transpose(1, 0, 2)  # (rows, columns, z) -> (x, y, z)
    row_mm, column_mm = (float(v) for v in slices[0].PixelSpacing)
    return _plain_ct_finish(hu, (column_mm, row_mm, float(slices[0].SliceThickness)), volume_size, spacing)


def plain_ct_nifti(path: str, volume_size: Sequence[int], spacing: Sequence[float] = SPACING,
                   series_uid: str | None = None) -> np.ndarray:
    """nibabel ``get_fdata`` (float32), zoom by the header's voxel sizes; no reorientation."""
    import nibabel

    image = nibabel.load(path)
    hu = image.get_fdata(dtype=np.float32)
    return _plain_ct_finish(hu, image.header.get_zooms()[:3], volume_size, spacing)


class PlainDataset:
    """Map-style dataset over ``(path, series_uid)`` items read by a plain function, so the plain way runs
    through the same DataLoader (and workers) as mmvl."""

    def __init__(self, items: list[tuple[str, str | None]], read: Callable[..., np.ndarray], volume: bool):
        self.items, self.read, self.volume = items, read, volume

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        path, series_uid = self.items[index]
        image = self.read(path, series_uid=series_uid) if self.volume else self.read(path)
        return {"image": torch.from_numpy(image), "meta": {"path": path}}


# -- timing ----------------------------------------------------------------------------------------------
def loader_workers(dataset: Any, workers: int) -> int:
    """The workers a loader uses for ``dataset``: mmvl's own choice (0 for a fully cached evaluation set, see
    ``ManifestDataset.loader_workers``), as the trainer's loaders take it; ``workers`` for the plain path."""
    choose = getattr(dataset, "loader_workers", None)
    return workers if choose is None else choose(workers)


def time_pass(dataset: Any, workers: int, batch_size: int) -> float:
    """Seconds for one full pass through a DataLoader, worker start-up included."""
    from torch.utils.data import DataLoader

    from mmvl.data.loader import Collate

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers(dataset, workers),
                        collate_fn=Collate())
    seen = 0
    start = time.perf_counter()
    for batch in loader:
        seen += batch["image"].shape[0]
    elapsed = time.perf_counter() - start
    if seen != len(dataset):
        raise RuntimeError(f"a pass yielded {seen} items, expected {len(dataset)} (skipped samples?)")
    return elapsed


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def bench_collection(
    name: str,
    manifest: Path,
    pipeline: list[dict[str, Any]],
    plain_read: Callable[..., np.ndarray],
    workers_list: Sequence[int],
    repeats: int,
    batch_size: int,
    scratch: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Time every method on one manifest; returns collection facts and one result row per (method, workers)."""
    from mmvl.data.datasets import ManifestDataset

    cold = ManifestDataset(manifest, pipeline)
    volume = cold.pipeline.kind == "3d"
    plain = PlainDataset([(row["image"][0], row.get("series_uid")) for row in cold.rows], plain_read, volume)
    # Warm-up (imports, lazy MONAI/pydicom/scipy set-up) and the comparability check, outside the timings:
    # same output shape, and how far the plain output agrees with mmvl's (Pearson r over the first items).
    correlations = []
    for index in range(min(len(cold), 2 if volume else 8)):
        ours, theirs = cold[index]["image"].numpy(), plain[index]["image"].numpy()
        if ours.shape != theirs.shape:
            raise RuntimeError(f"{name}: plain output {list(theirs.shape)} differs from mmvl's {list(ours.shape)}")
        correlations.append(float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]))
    seconds: dict[tuple[str, int], list[float]] = {}
    facts: dict[str, Any] = {"items": len(cold), "item": "volume" if volume else "scan",
                             "output_shape": list(ours.shape),
                             "plain_vs_mmvl_r": round(float(np.mean(correlations)), 3)}

    used: dict[tuple[str, int], int] = {}

    def record(method: str, workers: int, dataset: Any) -> None:
        used[(method, workers)] = loader_workers(dataset, workers)  # before the pass: a fill changes the answer
        seconds.setdefault((method, workers), []).append(time_pass(dataset, workers, batch_size))

    for repeat in range(repeats):
        for workers in workers_list:
            record("plain", workers, plain)
            record("mmvl_cold", workers, cold)
            cache_dir = scratch / f"cache_{name}_{repeat}_{workers}"
            record("mmvl_disk_fill", workers, ManifestDataset(manifest, pipeline, cache="disk", cache_dir=cache_dir))
            # A new dataset object on the filled folder, as a second run would build.
            record("mmvl_disk_hit", workers, ManifestDataset(manifest, pipeline, cache="disk", cache_dir=cache_dir))
            facts["disk_cache_mb"] = round(folder_mb(cache_dir), 2)
            shutil.rmtree(cache_dir)
        start = time.perf_counter()
        memory = ManifestDataset(manifest, pipeline, cache="memory")  # CacheDataset fills at construction
        seconds.setdefault(("mmvl_memory_fill", 0), []).append(time.perf_counter() - start)
        used[("mmvl_memory_fill", 0)] = 0
        for workers in workers_list:
            record("mmvl_memory", workers, memory)
        del memory

    rows = []
    for (method, workers), values in seconds.items():
        median = statistics.median(values)
        baseline = statistics.median(seconds[("plain", workers)])
        rows.append({
            "data": name, "method": method, "workers": workers, "workers_used": used[(method, workers)],
            "items_per_s": round(len(cold) / median, 3), "ms_per_item": round(1000 * median / len(cold), 4),
            "speedup_vs_plain": round(baseline / median, 3), "seconds": [round(v, 4) for v in values],
        })
    order = list(METHODS)
    rows.sort(key=lambda row: (row["workers"], order.index(row["method"])))
    return facts, rows


# -- data ------------------------------------------------------------------------------------------------
def make_cxr(out: Path, n: int, size: int) -> Path:
    return Path(load_script("synthetic").generate(out, n=n, size=size, seed=0))


def make_cxr_j2k(out: Path, n: int, size: int) -> Path:
    """The synthetic chest X-rays re-encoded as JPEG 2000 Lossless DICOM (1.2.840.10008.1.2.4.90, how many PACS
    exports arrive), by pydicom with the pylibjpeg-openjpeg plugin mmvl installs to decode them."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    manifest = make_cxr(out, n, size)
    for path in sorted((out / "images").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        ds.save_as(path)
    return manifest


def make_ct(out: Path, n: int, size: int, slices: int) -> dict[str, Path]:
    """``{"nifti": manifest, "dicom": manifest}`` of the same studies (datasets/synthetic_ct.py)."""
    module = load_script("synthetic_ct")
    return module.generate_ct(out, n=n, size=size, slices=slices, seed=0, formats=("nifti", "dicom"))


HOSPITAL_SPACING = (0.75, 0.75, 1.0)  # mm (x, y, z): a thin-slice chest CT of 512 x 512 x 300, as in CT-RATE


def make_hospital_ct(out: Path, n: int, size: int, slices: int) -> dict[str, Path]:
    """``n`` hospital-size chest CTs (axial, ``size`` x ``size`` x ``slices`` at :data:`HOSPITAL_SPACING`) as a
    DICOM series folder (one int16 slice per file, RescaleIntercept -1024) and a gzipped int16 NIfTI each;
    returns ``{"nifti": manifest, "dicom": manifest}``. A plain phantom (air, body, lungs, spine, noise) written
    slice by slice: ``datasets/synthetic_ct.py`` renders its anatomy at this size in minutes and gigabytes."""
    import nibabel
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    sx, sy, sz = HOSPITAL_SPACING
    x, y = np.meshgrid((np.arange(size) - size / 2) * sx, (np.arange(size) - size / 2) * sy, indexing="ij")
    rows: dict[str, list[dict[str, Any]]] = {"nifti": [], "dicom": []}
    for index in range(n):
        rng = np.random.default_rng(index)
        hu = np.empty((size, size, slices), dtype=np.int16)
        for k in range(slices):
            z = k / max(slices - 1, 1)  # lungs widest mid-chest
            lung = 0.35 + 0.4 * np.sin(np.pi * z)
            plane = np.where((x / 170) ** 2 + (y / 120) ** 2 < 1, 40, -1000)
            for side in (-1, 1):
                plane = np.where(((x - side * 75) / (65 * lung)) ** 2 + ((y + 10) / (90 * lung)) ** 2 < 1, -850, plane)
            plane = np.where(x**2 + (y - 85) ** 2 < 20**2, 700, plane)
            hu[:, :, k] = plane + rng.integers(-15, 16, plane.shape)
        study = f"hospital{index:03d}"
        series_uid = generate_uid(entropy_srcs=[study, "series"])
        folder = out / "dicom" / study
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(slices):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[study, str(k)])
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(str(folder / f"{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series_uid, k + 1
            ds.StudyInstanceUID = generate_uid(entropy_srcs=[study, "study"])
            ds.ImagePositionPatient = [-size / 2 * sx, -size / 2 * sy, k * sz]  # LPS, feet to head
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.PixelSpacing, ds.SliceThickness = [sy, sx], sz  # (0028,0030): row spacing (y), then column (x)
            ds.Rows, ds.Columns = size, size
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            ds.PixelData = (hu[:, :, k].T.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16).tobytes()
            ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
        affine = np.diag([-sx, -sy, sz, 1.0])  # RAS of the LPS grid above
        affine[:3, 3] = [size / 2 * sx, size / 2 * sy, 0.0]
        (out / "nifti").mkdir(parents=True, exist_ok=True)
        nibabel.save(nibabel.Nifti1Image(hu, affine), out / "nifti" / f"{study}.nii.gz")
        report = "FINDINGS: synthetic hospital-size chest CT."
        rows["nifti"].append({"image": f"nifti/{study}.nii.gz", "report": report, "study_id": study})
        rows["dicom"].append({"image": f"dicom/{study}", "report": report, "study_id": study})
    manifests = {}
    for kind, kind_rows in rows.items():
        manifests[kind] = out / f"manifest_{kind}.jsonl"
        manifests[kind].write_text("".join(json.dumps(row) + "\n" for row in kind_rows), encoding="utf-8")
    return manifests


def ct_volume_size(manifest: Path, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Crop/pad size suited to the collection: the median extent per RAS axis after resampling to ``spacing``,
    rounded to a multiple of 16 (for life-size chest CTs at 1.5 x 1.5 x 3 mm this lands near the config's
    224 x 224 x 112)."""
    import nibabel

    from mmvl.data.manifest import load_manifest

    extents = []
    for row in load_manifest(manifest):
        image = nibabel.load(row["image"][0])
        ras = np.zeros(3)
        for axis, (ras_axis, _flip) in enumerate(nibabel.io_orientation(image.affine)):
            ras[int(ras_axis)] = image.shape[axis] * float(image.header.get_zooms()[axis])
        extents.append(ras / np.asarray(spacing, dtype=np.float64))
    return tuple(int(max(16, 16 * round(v / 16))) for v in np.median(extents, axis=0))


# -- report ----------------------------------------------------------------------------------------------
def format_table(title: str, facts: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    unit = facts["item"]
    shape = " x ".join(map(str, facts["output_shape"]))
    lines = [
        f"{title} -> ({shape})",
        f"  median of {facts['repeats']} pass(es); source {facts['source_mb']} MB, disk cache "
        f"{facts['disk_cache_mb']} MB; plain output vs mmvl's: r = {facts['plain_vs_mmvl_r']}",
        f"  {'path':<26} {'workers':>7} {unit + 's/s':>10} {'ms/' + unit:>10} {'vs plain':>9}",
    ]
    for row in rows:
        workers = str(row["workers"]) + ("" if row["workers_used"] == row["workers"] else f"->{row['workers_used']}")
        lines.append(f"  {METHODS[row['method']]:<26} {workers:>7} {row['items_per_s']:>10.1f} "
                     f"{row['ms_per_item']:>10.2f} {row['speedup_vs_plain']:>8.2f}x")
    if any(row["workers_used"] != row["workers"] for row in rows):
        lines.append("  (a -> b: b workers used, mmvl's choice for a fully cached evaluation set; see README)")
    return "\n".join(lines)


# -- hospital-size CT: where a volume's time goes -------------------------------------------------------
def time_ct_steps(manifest: Path, pipeline: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the deterministic steps of ``pipeline`` one at a time on every volume of ``manifest`` with one torch
    thread (per-core figures, as in a DataLoader worker); ms per step and volume, the median over volumes."""
    import torch

    from mmvl.data.manifest import load_manifest
    from mmvl.data.transforms import LoadVolume, Pipeline

    built = Pipeline(pipeline)
    steps = [step["type"] for step in built.deterministic_spec]
    per_volume: list[list[float]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in load_manifest(manifest):
            sample: dict[str, Any] = {"path": row["image"][0],
                                      **{key: row[key] for key in LoadVolume.FIELDS if row.get(key) is not None}}
            times = []
            for transform in built.transforms[: built.split]:
                start = time.perf_counter()
                sample = transform(sample, None)
                times.append(time.perf_counter() - start)
            per_volume.append(times)
    finally:
        torch.set_num_threads(threads)
    medians = [1000 * statistics.median(column) for column in zip(*per_volume)]
    total_s = sum(medians) / 1000
    return {"steps": steps, "ms": [round(v, 1) for v in medians], "total_ms": round(1000 * total_s, 1),
            "volumes": len(per_volume), "output_shape": list(sample["image"].shape),
            "core_hours_per_50k": round(total_s * CT_VOLUMES_TO_PLAN / 3600, 1)}


def format_ct_steps(title: str, found: dict[str, Any]) -> str:
    lines = [f"{title} -> ({' x '.join(map(str, found['output_shape']))}), one thread, median of "
             f"{found['volumes']} volume(s)", f"  {'step':<18} {'ms/volume':>10} {'share':>7}"]
    for step, ms in zip(found["steps"], found["ms"]):
        lines.append(f"  {step:<18} {ms:>10.1f} {ms / max(found['total_ms'], 1e-9):>7.0%}")
    lines.append(f"  {'total':<18} {found['total_ms']:>10.1f}   -> {found['core_hours_per_50k']:g} core-hours for "
                 f"{CT_VOLUMES_TO_PLAN:,} volumes (reading from the page cache; see README)")
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected three positive mm values like 1.5,1.5,3, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="chest X-rays")
    parser.add_argument("--size", type=int, default=512, help="chest X-ray height in px (hospital ones: 2-3k)")
    parser.add_argument("--n-large", type=int, default=40, help="hospital-size chest X-rays (a second 2D table)")
    parser.add_argument("--size-large", type=int, default=2048, help="their height in px")
    parser.add_argument("--n-3d", type=int, default=16, help="CT studies (each as NIfTI and as a DICOM series)")
    parser.add_argument("--size-3d", type=int, default=128, help="CT matrix (size x size pixels per slice)")
    parser.add_argument("--slices-3d", type=int, default=64, help="slices of a 3 mm-equivalent CT study")
    parser.add_argument("--n-hospital", type=int, default=2,
                        help="hospital-size CTs timed step by step (read, orient, resample, window...); 0: none")
    parser.add_argument("--size-hospital", type=int, default=512, help="their matrix (size x size per slice)")
    parser.add_argument("--slices-hospital", type=int, default=300, help="their slice count")
    parser.add_argument("--spacing-3d", type=_floats, default=SPACING, help="CT resampling target, mm (x,y,z)")
    parser.add_argument("--repeats", type=int, default=3, help="2D passes per measurement; the median is reported")
    parser.add_argument("--repeats-3d", type=int, default=1,
                        help="3D passes per measurement (each takes seconds; raise it for steadier figures)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (0 is always measured too)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads of the timing process (1: as in a DataLoader worker; with more, "
                        "the collate's torch.stack of 4 images waited up to 30 ms on OpenMP threads whenever other "
                        "work held a core, for every path alike, hiding the readers' own cost)")
    parser.add_argument("--only", choices=("2d", "3d"), help="run one half only")
    parser.add_argument("--out-json", type=Path, help="also write the JSON line to this file")
    parser.add_argument("--work-dir", type=Path, help="where to write data and caches (default: a temp folder)")
    args = parser.parse_args(argv)
    for key in ("n", "size", "n_large", "size_large", "n_3d", "size_3d", "slices_3d", "size_hospital",
                "slices_hospital", "repeats", "repeats_3d", "batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.workers < 0 or args.n_hospital < 0 or args.torch_threads < 1:
        parser.error("--workers and --n-hospital must be >= 0, --torch-threads >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    started = time.perf_counter()
    torch.set_num_threads(args.torch_threads)
    workers_list = sorted({0, args.workers})
    config = {key: getattr(args, key) for key in ("n", "size", "n_large", "size_large", "n_3d", "size_3d", "slices_3d",
                                                   "n_hospital", "size_hospital", "slices_hospital", "repeats",
                                                   "repeats_3d", "batch_size")}
    config.update(spacing_3d=list(args.spacing_3d), workers=workers_list, only=args.only, cpu_count=os.cpu_count(),
                  torch_threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
                  load_avg_start=round(os.getloadavg()[0], 2))  # other work on the machine skews every figure
    report: dict[str, Any] = {"bench": "data", "config": config, "collections": {}, "results": [], "ct_steps": {}}
    tables = []
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmvl_bench_data_", dir=args.work_dir) as tmp:
        scratch = Path(tmp)
        jobs = []  # (name, title, manifest, pipeline, plain reader, repeats, facts)
        if args.only in (None, "2d"):
            for name, n, size, make, codec in (
                    ("cxr_dicom", args.n, args.size, make_cxr, "DICOM"),
                    ("cxr_dicom_large", args.n_large, args.size_large, make_cxr, "DICOM"),
                    ("cxr_dicom_j2k", args.n, args.size, make_cxr_j2k, "DICOM JPEG 2000 Lossless")):
                print(f"writing {n} synthetic chest X-rays of {size} px ({codec}) ...", file=sys.stderr)
                start = time.perf_counter()
                manifest = make(scratch / name, n, size)
                facts = {"generate_s": round(time.perf_counter() - start, 2),
                         "source_mb": round(folder_mb(scratch / name / "images"), 2)}
                title = f"2D chest X-ray, {codec}: {n} scans of {size} px"
                jobs.append((name, title, manifest, CXR_PIPELINE, plain_cxr, args.repeats, facts))
        if args.only in (None, "3d"):
            print(f"writing {args.n_3d} synthetic chest CTs of {args.size_3d} px ...", file=sys.stderr)
            start = time.perf_counter()
            manifests = make_ct(scratch / "ct", args.n_3d, args.size_3d, args.slices_3d)
            generate_s = round(time.perf_counter() - start, 2)
            volume_size = ct_volume_size(manifests["nifti"], args.spacing_3d)
            pipeline = ct_pipeline(volume_size, args.spacing_3d)
            for name, kind, read in (("ct_dicom", "dicom", plain_ct_dicom), ("ct_nifti", "nifti", plain_ct_nifti)):
                facts = {"generate_s": generate_s, "source_mb": round(folder_mb(scratch / "ct" / kind), 2),
                         "volume_size": list(volume_size)}
                title = (f"3D chest CT, {'DICOM series' if kind == 'dicom' else 'NIfTI'}: {args.n_3d} volumes of "
                         f"{args.size_3d} px, resampled to {' x '.join(f'{v:g}' for v in args.spacing_3d)} mm")
                plain = partial(read, volume_size=volume_size, spacing=args.spacing_3d)
                jobs.append((name, title, manifests[kind], pipeline, plain, args.repeats_3d, facts))
        for name, title, manifest, pipeline, plain, repeats, facts in jobs:
            print(f"timing {name} ...", file=sys.stderr)
            found, rows = bench_collection(name, manifest, pipeline, plain, workers_list, repeats, args.batch_size,
                                           scratch)
            facts.update(found, repeats=repeats)
            report["collections"][name] = facts
            report["results"].extend(rows)
            tables.append(format_table(title, facts, rows))
        if args.only in (None, "3d") and args.n_hospital:
            print(f"writing {args.n_hospital} synthetic chest CTs of {args.size_hospital} px x {args.slices_hospital} "
                  "slices ...", file=sys.stderr)
            manifests = make_hospital_ct(scratch / "ct_hospital", args.n_hospital, args.size_hospital,
                                         args.slices_hospital)
            pipeline = ct_pipeline(ct_volume_size(manifests["nifti"], args.spacing_3d), args.spacing_3d)
            for kind, label in (("dicom", "DICOM series"), ("nifti", "NIfTI")):
                print(f"timing ct_hospital_{kind} step by step ...", file=sys.stderr)
                found = time_ct_steps(manifests[kind], pipeline)
                report["ct_steps"][kind] = found
                tables.append(format_ct_steps(
                    f"3D chest CT by step, {label}: {args.size_hospital} x {args.size_hospital} x "
                    f"{args.slices_hospital}, resampled to {' x '.join(f'{v:g}' for v in args.spacing_3d)} mm", found))
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["config"]["load_avg_end"] = round(os.getloadavg()[0], 2)
    print("\n\n".join(tables))
    line = json.dumps(report)
    print(line)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(line + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
