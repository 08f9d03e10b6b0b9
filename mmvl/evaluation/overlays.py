"""Pictures and files of grounding heatmaps: a 2D scan with the map as a colour overlay, a colour bar and the
probability in the title; for a volume, a montage of the axial slices where the map peaks and the map itself as a
NIfTI file in the scan's geometry (its affine is the scan's). Drawn on matplotlib ``Figure`` objects with the Agg
canvas, as :mod:`mmvl.evaluation.plots`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmvl.evaluation.plots import file_stem

MONTAGE_SLICES = 6
OVERLAY_ALPHA = 0.45
COLORMAP = "jet"


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _display_range(scan: np.ndarray) -> tuple[float, float]:
    """Grey levels shown: [0, 1] for a 2D scan as read; a volume's 1st-99th percentile (no window is recorded)."""
    if scan.ndim == 2:
        return 0.0, 1.0
    low, high = np.percentile(scan, [1, 99])
    return float(low), float(high if high > low else low + 1)


def title_text(name: str, probability: float | None, similarity: float | None, where: str) -> str:
    score = (f"p = {probability:.3f}" if probability is not None else
             f"similarity {similarity:.3f}" if similarity is not None else "")
    return f"{name}" + (f": {score}" if score else "") + f"\n{where}"


def save_overlay(scan: np.ndarray, heatmap: np.ndarray, path: str | os.PathLike, title: str,
                 colorbar_label: str) -> Path:
    """A 2D scan (rows, columns) in grey with ``heatmap`` (same shape) over it in colour, a colour bar and a title."""
    if scan.shape != heatmap.shape:
        raise ValueError(f"overlay: scan {scan.shape} and heatmap {heatmap.shape} differ in shape")
    rows, columns = scan.shape
    figure, (axes,) = _figure(5.2 * max(columns / rows, 0.6) + 1.2, 5.6)
    low, high = _display_range(scan)
    axes.imshow(scan, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    shown = axes.imshow(heatmap, cmap=COLORMAP, alpha=OVERLAY_ALPHA, interpolation="bilinear")
    figure.colorbar(shown, ax=axes, shrink=0.85, label=colorbar_label)
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def axial_slices(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``volume`` (X, Y, Z) reoriented to RAS (nibabel), so that ``[:, :, k]`` is an axial slice."""
    import nibabel as nib

    orientation = nib.orientations.io_orientation(np.asarray(affine))
    return nib.orientations.apply_orientation(volume, orientation)


def radiological(slice_ras: np.ndarray) -> np.ndarray:
    """An axial RAS slice ``[x, y]`` as seen in radiology: anterior at the top, the patient's right on the left."""
    return slice_ras.T[::-1, ::-1]


def peak_slices(heatmap_ras: np.ndarray, count: int = MONTAGE_SLICES) -> list[int]:
    """The ``count`` axial slices with the highest map values, in order along the body."""
    peaks = heatmap_ras.reshape(-1, heatmap_ras.shape[2]).max(axis=0)
    return sorted(int(k) for k in np.argsort(-peaks, kind="stable")[:count])


def save_montage(volume: np.ndarray, heatmap: np.ndarray, affine: np.ndarray, path: str | os.PathLike, title: str,
                 colorbar_label: str, count: int = MONTAGE_SLICES) -> Path:
    """The axial slices where ``heatmap`` (the volume's shape) peaks, side by side, with the overlay."""
    if volume.shape != heatmap.shape:
        raise ValueError(f"montage: volume {volume.shape} and heatmap {heatmap.shape} differ in shape")
    scan_ras, map_ras = axial_slices(volume, affine), axial_slices(heatmap, affine)
    slices = peak_slices(map_ras, count)
    low, high = _display_range(volume)
    figure, axes = _figure(2.4 * len(slices) + 1.0, 3.2, columns=len(slices))
    vmin, vmax = float(heatmap.min()), float(heatmap.max())
    shown = None
    for ax, k in zip(axes, slices):
        ax.imshow(radiological(scan_ras[:, :, k]), cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        shown = ax.imshow(radiological(map_ras[:, :, k]), cmap=COLORMAP, alpha=OVERLAY_ALPHA, vmin=vmin, vmax=vmax,
                          interpolation="bilinear")
        ax.set_title(f"axial {k + 1}/{map_ras.shape[2]}", fontsize=8)
        ax.set_axis_off()
    figure.colorbar(shown, ax=list(axes), shrink=0.8, label=colorbar_label)
    figure.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def save_nifti(heatmap: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """The map as float32 NIfTI with the scan's affine (sform and qform)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(heatmap, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    image.set_sform(np.asarray(affine), code=1)
    image.set_qform(np.asarray(affine), code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def scan_stem(result: Any) -> str:
    """A file name part for a scan (a heatmap result or an :class:`~mmvl.data.inputs.InputItem`: ``path`` and
    ``fields``): its file name without suffix (the folder name for a DICOM series, and the series UID's last part
    when the folder holds several)."""
    path = Path(result.path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    uid = result.fields.get("series_uid")
    return file_stem(name + (f"_{uid.rsplit('.', 1)[-1]}" if uid else ""))


def unique_stem(stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``... when scans earlier in the same folder took it; added to ``taken``."""
    number = 1
    while (stem if number == 1 else f"{stem}_{number}") in taken:
        number += 1
    stem = stem if number == 1 else f"{stem}_{number}"
    taken.add(stem)
    return stem


def write_heatmaps(result: Any, folder: str | os.PathLike, names: Sequence[str] | None = None,
                   taken: set[str] | None = None) -> list[Path]:
    """The files of one :class:`~mmvl.evaluation.grounding.ScanHeatmaps` under ``folder``: per map
    ``<scan>_<label>.png`` (2D overlay, or 3D montage) and, for a volume, ``<scan>_<label>.nii.gz``. ``taken``:
    stems already used in this folder (a repeated stem gets ``_2``, ``_3``...)."""
    if result.error or not result.maps:
        return []
    stem = unique_stem(scan_stem(result), set() if taken is None else taken)
    label = "Grad-CAM (image-text similarity)" if result.method == "gradcam" else "patch-text cosine similarity"
    written = []
    for name in names or list(result.maps):
        heatmap = result.maps[name]
        title = title_text(name, result.probability.get(name), result.similarity.get(name), Path(result.path).name)
        base = Path(folder) / f"{stem}_{file_stem(name)}"
        if heatmap.ndim == 2:
            written.append(save_overlay(result.scan, heatmap, f"{base}.png", title, label))
        else:
            written.append(save_montage(result.scan, heatmap, result.affine, f"{base}.png", title, label))
            written.append(save_nifti(heatmap, result.affine, f"{base}.nii.gz"))
    return written
