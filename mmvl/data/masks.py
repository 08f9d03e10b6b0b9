"""Mask files on a scan's own grid: PNG/TIFF masks of a 2D image and NIfTI masks of a volume (resampled through the
affines where the volume was read in another voxel order), and the per-label mask stack a segmentation sample
carries (``sample["mask"]``, ``(L, *scan shape)``: an absent label is an empty mask)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mmvl.errors import DataError


def read_mask(path: str | os.PathLike, shape: Sequence[int], affine: np.ndarray | None = None) -> np.ndarray:
    """A boolean mask on a scan of ``shape``: 2D (``affine`` None), a PNG/TIFF (non-zero inside) of the image's rows
    and columns; 3D, a NIfTI resampled (nearest) onto the volume's voxels through both affines (a DICOM series is
    read in another voxel order than the NIfTI its masks were written in)."""
    path, shape = os.fspath(path), tuple(int(s) for s in shape)
    if not os.path.isfile(path):
        raise DataError(path, "mask file not found")
    if affine is None:
        from PIL import Image

        try:
            mask = np.asarray(Image.open(path)) > 0
        except OSError as err:
            raise DataError(path, f"cannot read mask: {err}") from err
        mask = mask.any(axis=-1) if mask.ndim == 3 else mask
        if mask.shape != shape:
            raise DataError(path, f"mask of {mask.shape} pixels for an image of {shape}")
        return mask
    import nibabel as nib

    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj) > 0
    except Exception as err:  # nibabel raises a range of errors
        raise DataError(path, f"cannot read mask: {type(err).__name__}: {err}") from err
    if data.ndim != 3:
        raise DataError(path, f"a volume mask has three axes, this one {data.shape}")
    if data.shape == shape and np.allclose(image.affine, affine, atol=1e-3):
        return data
    to_mask = np.linalg.inv(image.affine) @ np.asarray(affine, dtype=np.float64)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3)
    where = np.rint(index @ to_mask[:3, :3].T + to_mask[:3, 3]).astype(np.int64)
    inside = np.all((where >= 0) & (where < data.shape), axis=1)
    mask = np.zeros(len(index), dtype=bool)
    mask[inside] = data[tuple(where[inside].T)]
    return mask.reshape(shape)


def read_masks(paths: Sequence[str | None], shape: Sequence[int], affine: np.ndarray | None = None) -> np.ndarray:
    """float32 ``(L, *shape)``: one mask per label, zeros where its path is None (the finding is absent)."""
    out = np.zeros((len(paths), *shape), dtype=np.float32)
    for index, path in enumerate(paths):
        if path:
            out[index] = read_mask(path, shape, affine)
    return out


def row_mask_paths(row: dict, labels: Sequence[str], manifest_dir: str | os.PathLike, view: int = 0) -> list:
    """The mask file of each of ``labels`` for image ``view`` of a manifest row (``masks``: label -> path, or a list
    of paths, one per image), relative paths resolved against the manifest's folder; None where absent."""
    masks = row.get("masks") or {}
    if not isinstance(masks, dict):
        raise DataError(None, f"manifest line {row.get('line')}: 'masks' must map labels to mask paths, got "
                              f"{masks!r:.80}")
    paths = []
    for label in labels:
        entry = masks.get(label)
        if isinstance(entry, list):
            if len(entry) != len(row["image"]):
                raise DataError(None, f"manifest line {row.get('line')}: masks['{label}'] lists {len(entry)} paths "
                                      f"for {len(row['image'])} images")
            entry = entry[view]
        elif entry is not None and len(row["image"]) > 1:
            raise DataError(None, f"manifest line {row.get('line')}: masks['{label}'] is one path for "
                                  f"{len(row['image'])} images; give a list, one per image (null where none)")
        if entry is not None and not isinstance(entry, str):
            raise DataError(None, f"manifest line {row.get('line')}: masks['{label}'] must be a path, got {entry!r}")
        paths.append(os.path.normpath(entry if os.path.isabs(entry) else os.path.join(manifest_dir, entry))
                     if entry else None)
    return paths


__all__ = ["read_mask", "read_masks", "row_mask_paths"]
