"""2D and 3D preprocessing pipelines built from a plain list of dicts (the preprocessing spec).

A pipeline maps an image path (a DICOM/PNG file for 2D; a NIfTI file or DICOM series folder for 3D) to
``{"image": float32 (1, H, W) or (1, X, Y, Z), "meta": {...}}``. The same list of dicts, saved as
``preprocess.json``, rebuilds the identical pipeline at inference (as MONAI bundles do). Steps before the
first random transform are deterministic and may be cached (:meth:`Pipeline.load`); random steps draw
from a per-sample seed (:meth:`Pipeline.augment`), so augmentation is reproducible and resumable.
3D steps wrap MONAI dictionary transforms acting on the sample's ``"image"`` key.

Segmentation samples also carry ``"mask"``, float32 ``(L, ...)`` (one mask per label, read by the loading step from
``mask_paths``): spatial steps (resize and pad, reorientation, resampling, crop or pad, flips, affines, crops)
move it exactly as the image, with the same random draws; intensity steps leave it alone. Masks are interpolated
as the image is (linear) and cut at 0.5 when the sample leaves the pipeline.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmvl.data.io import read_image
from mmvl.registry import TRANSFORMS

Sample = dict[str, Any]


class Transform:
    """A pipeline step: ``sample -> sample``; ``random`` steps draw from the per-sample ``rng``."""

    random = False

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        raise NotImplementedError


@TRANSFORMS.register("LoadImage")
class LoadImage(Transform):
    """Read DICOM/PNG/JPEG into ``(1, H, W)`` float32 in [0, 1]; DICOM options as in ``read_dicom_image``."""

    def __init__(self, frame: int = 0, voi: str = "auto", window_index: int = 0,
                 modalities: Sequence[str] | None = None):
        self.options = {"frame": frame, "voi": voi, "window_index": window_index}
        if modalities:
            self.options["modalities"] = tuple(modalities)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        image, meta = read_image(sample["path"], **self.options)
        sample["image"] = image[None]
        sample["meta"] = meta
        if sample.get("mask_paths") is not None:
            from mmvl.data.masks import read_masks

            sample["mask"] = read_masks(sample["mask_paths"], image.shape)
        return sample


@functools.lru_cache(maxsize=32)
def _area_windows(n_in: int, n_out: int) -> tuple[Any, np.ndarray]:
    """``(n_out, n_in)`` sparse float32 matrix summing the input pixels of each output pixel, and the window
    lengths: output ``i`` covers inputs ``floor(i * n_in / n_out)`` to ``ceil((i + 1) * n_in / n_out) - 1``, the
    windows of ``torch.nn.functional.adaptive_avg_pool``."""
    import scipy.sparse

    index = np.arange(n_out)
    starts, ends = (index * n_in) // n_out, ((index + 1) * n_in + n_out - 1) // n_out
    lengths = ends - starts
    columns = np.concatenate([np.arange(start, end) for start, end in zip(starts, ends)])
    ones = np.ones(columns.size, dtype=np.float32)
    matrix = scipy.sparse.csr_matrix((ones, (np.repeat(index, lengths), columns)), shape=(n_out, n_in))
    return matrix, lengths.astype(np.float32)


def area_resize(image: np.ndarray, shape: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """Area resize of ``(C, H, W)`` float32 to ``(C, *shape)``: torch's (and MONAI's) ``mode="area"``, i.e.
    adaptive average pooling, as two sparse window sums (rows, then columns) divided by the window sizes,
    written into ``out``.

    Each output pixel is the mean of the same input window as torch's, summed in another order, so values agree
    within float32 rounding (a few ulp). Two sparse products cost a pass over the input and one over the
    row-summed image: on one thread (a DataLoader worker) 0.45-0.7 ms for 512 -> 224 px against 0.8-1.0 ms for
    torch's kernel, 4.8 against 5.4-7 ms for 2048 px (benchmarks/README.md).
    """
    rows, row_lengths = _area_windows(image.shape[1], int(shape[0]))
    columns, column_lengths = _area_windows(image.shape[2], int(shape[1]))
    sizes = np.multiply.outer(row_lengths, column_lengths)
    if out is None:
        out = np.empty((image.shape[0], *shape), dtype=np.float32)
    for channel in range(image.shape[0]):
        out[channel] = (rows @ image[channel]) @ columns.T
        out[channel] /= sizes
    return out


@TRANSFORMS.register("ResizePad")
class ResizePad(Transform):
    """Resize so the longer side is ``size`` (aspect kept), then pad to ``size x size``, centred.

    The numerics are MONAI's ``Resize(size_mode="longest")`` + ``SpatialPad`` (tested equal; "area" within
    float32 rounding, see :func:`area_resize`), done without MONAI so that a 2D run never imports it (~2,400
    modules). ``mode`` is a ``torch.nn.functional.interpolate`` mode; "linear"/"trilinear" mean "bilinear", as in
    MONAI.
    """

    MODES = {"area": "area", "nearest": "nearest", "nearest-exact": "nearest-exact", "bilinear": "bilinear",
             "linear": "bilinear", "trilinear": "bilinear", "bicubic": "bicubic"}

    config_knobs = {"size": "img_size"}  # filled from the config's img_size (mmvl.config.validate)

    def __init__(self, size: int, mode: str = "area", pad_value: float = 0.0):
        if mode not in self.MODES:
            raise ValueError(f"ResizePad: mode {mode!r} is not one of {sorted(self.MODES)}")
        self.size = int(size)
        self.mode = self.MODES[mode]
        self.pad_value = float(pad_value)
        if self.mode == "area":
            import scipy.sparse  # noqa: F401  (here, so that DataLoader workers fork with it imported)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        sample["image"] = self.resize_pad(sample["image"], self.pad_value)
        if sample.get("mask") is not None:
            sample["mask"] = self.resize_pad(sample["mask"], 0.0)
        return sample

    def resize_pad(self, image: Any, pad_value: float) -> np.ndarray:
        import torch

        image = to_numpy(image)  # (C, H, W)
        scale = self.size / max(image.shape[1:])
        resized_shape = tuple(int(round(side * scale)) for side in image.shape[1:])
        # SpatialPad's "symmetric" split: the smaller half before, the larger after. The output is allocated
        # once and the resized image written into its centre (np.pad + astype made two more full copies).
        starts = [max(self.size - side, 0) // 2 for side in resized_shape]
        out = np.full((image.shape[0], *(max(self.size, side) for side in resized_shape)), pad_value,
                      dtype=np.float32)
        window = out[(slice(None), *(slice(start, start + side) for start, side in zip(starts, resized_shape)))]
        if resized_shape != image.shape[1:] and self.mode == "area":
            area_resize(image, resized_shape, out=window)
        elif resized_shape != image.shape[1:]:
            batch = torch.from_numpy(np.ascontiguousarray(image))[None]
            window[...] = torch.nn.functional.interpolate(batch, size=resized_shape, mode=self.mode)[0].numpy()
        else:
            window[...] = image
        return out


@TRANSFORMS.register("RandomAugment2D")
class RandomAugment2D(Transform):
    """Train-time albumentations: random resized crop (0.5-1.0 of the area, as in MAE-on-CXR studies),
    small rotation and brightness/contrast jitter. Output keeps the input size; a falsy option turns
    that augmentation off."""

    random = True

    def __init__(
        self,
        crop_scale: Sequence[float] | None = (0.5, 1.0),
        crop_ratio: Sequence[float] = (0.75, 1.3333),
        rotate: float = 10.0,
        brightness: float = 0.1,
        contrast: float = 0.1,
        p: float = 0.5,
    ):
        self.options = dict(crop_scale=crop_scale, crop_ratio=crop_ratio, rotate=rotate,
                            brightness=brightness, contrast=contrast, p=p)
        self._compose: dict[tuple[int, int], Any] = {}

    def _build(self, shape: tuple[int, int]) -> Any:
        import albumentations as A

        opts = self.options
        steps = []
        if opts["crop_scale"]:
            steps.append(A.RandomResizedCrop(size=shape, scale=tuple(opts["crop_scale"]),
                                             ratio=tuple(opts["crop_ratio"]), p=1.0))
        if opts["rotate"]:
            steps.append(A.Rotate(limit=opts["rotate"], border_mode=0, fill=0, p=opts["p"]))
        if opts["brightness"] or opts["contrast"]:
            steps.append(A.RandomBrightnessContrast(opts["brightness"], opts["contrast"], p=opts["p"]))
        return A.Compose(steps)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        image = sample["image"][0]
        if rng is None:
            rng = np.random.default_rng()
        compose = self._compose.get(image.shape) or self._compose.setdefault(image.shape, self._build(image.shape))
        compose.set_random_seed(int(rng.integers(2**31 - 1)))
        if sample.get("mask") is None:
            out = compose(image=image)["image"]
        else:  # albumentations moves masks with the image's spatial draws and leaves them out of intensity steps
            result = compose(image=image, masks=list(to_numpy(sample["mask"])))
            out = result["image"]
            sample["mask"] = np.stack([np.asarray(m, dtype=np.float32) for m in result["masks"]])
        sample["image"] = np.clip(out, 0.0, 1.0).astype(np.float32)[None]
        return sample


@TRANSFORMS.register("Normalize")
class Normalize(Transform):
    """``(x - mean) / std`` on the [0, 1] image (2D or 3D)."""

    def __init__(self, mean: float = 0.5, std: float = 0.5):
        if std <= 0:
            raise ValueError(f"Normalize: std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        # one new array (the input may be a cache's memory), then in place: same rounding as (x - mean) / std
        image = np.subtract(to_numpy(sample["image"]), np.float32(self.mean), dtype=np.float32)
        sample["image"] = np.divide(image, np.float32(self.std), out=image)
        return sample


def to_numpy(image: Any) -> np.ndarray:
    """float32 numpy view of a numpy array, torch tensor or MONAI MetaTensor."""
    import torch

    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().as_subclass(torch.Tensor).numpy()
    return np.asarray(image, dtype=np.float32)


# -- 3D ------------------------------------------------------------------------------------------------
@TRANSFORMS.register("LoadVolume")
class LoadVolume(Transform):
    """Read a NIfTI file or DICOM series folder (see :func:`mmvl.data.volume.read_volume`) into a MONAI
    ``MetaTensor`` ``(1, X, Y, Z)`` carrying its RAS affine. Manifest fields ``series_uid``, ``spacing`` and
    ``rescale`` of the sample's row are passed on."""

    FIELDS = ("series_uid", "spacing", "rescale")

    def __init__(self, modalities: Sequence[str] | None = None, allow_gaps: bool = False,
                 nan_value: float | None = None):
        self.options = {"modalities": tuple(modalities) if modalities else None, "allow_gaps": allow_gaps,
                        "nan_value": nan_value}

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        import torch
        from monai.data import MetaTensor

        from mmvl.data.volume import read_volume

        fields = {key: sample[key] for key in self.FIELDS if sample.get(key) is not None}
        volume, meta = read_volume(sample["path"], **fields, **self.options)
        sample["image"] = MetaTensor(torch.from_numpy(volume[None]), affine=torch.tensor(meta["affine"]))
        sample["meta"] = meta
        if sample.get("mask_paths") is not None:
            from mmvl.data.masks import read_masks

            masks = read_masks(sample["mask_paths"], volume.shape, np.asarray(meta["affine"], dtype=np.float64))
            sample["mask"] = MetaTensor(torch.from_numpy(masks), affine=torch.tensor(meta["affine"]))
        return sample


SPATIAL_KEYS = ("image", "mask")  # the sample keys a spatial step moves (the mask only where there is one)


class _MonaiDict(Transform):
    """Applies a MONAI dictionary transform to the sample's ``image`` key."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        return dict(self.transform(sample))


@TRANSFORMS.register("Orient")
class Orient(_MonaiDict):
    """Reorient to ``axcodes`` (default RAS) with MONAI ``Orientationd``."""

    def __init__(self, axcodes: str = "RAS"):
        from monai.transforms import Orientationd

        super().__init__(Orientationd(keys=SPATIAL_KEYS, axcodes=axcodes, labels=None, allow_missing_keys=True))


@TRANSFORMS.register("Resample")
class Resample(_MonaiDict):
    """Resample to ``spacing`` mm per axis (e.g. 1.5 x 1.5 x 3) with MONAI ``Spacingd``."""

    config_knobs = {"spacing": "spacing"}  # filled from the config's spacing (mmvl.config.validate)

    def __init__(self, spacing: Sequence[float] = (1.5, 1.5, 3.0), mode: str = "bilinear"):
        from monai.transforms import Spacingd

        super().__init__(Spacingd(keys=SPATIAL_KEYS, pixdim=tuple(spacing), mode=(mode, "bilinear"),
                                  padding_mode=("border", "zeros"), allow_missing_keys=True))


@TRANSFORMS.register("IntensityWindow")
class IntensityWindow(_MonaiDict):
    """Clip to [low, high] (Hounsfield units for CT; default -1000...1000) and scale to [0, 1]."""

    config_knobs = {"low": ("hu_window", 0), "high": ("hu_window", 1)}  # from the config's hu_window

    def __init__(self, low: float = -1000.0, high: float = 1000.0):
        from monai.transforms import ScaleIntensityRanged

        if high <= low:
            raise ValueError(f"IntensityWindow: high ({high}) must exceed low ({low})")
        super().__init__(ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))


@TRANSFORMS.register("CropOrPad")
class CropOrPad(_MonaiDict):
    """Centre crop or pad to ``size`` voxels (MONAI ``ResizeWithPadOrCropd``), padding with ``pad_value``.
    ``crop=False``: pad only (MONAI ``SpatialPadd``, centred the same way), so larger sides are kept whole (a
    scan segmented whole by sliding windows)."""

    config_knobs = {"size": "volume_size"}  # filled from the config's volume_size (mmvl.config.validate)

    def __init__(self, size: Sequence[int], pad_value: float = 0.0, crop: bool = True):
        from monai.transforms import Compose, ResizeWithPadOrCropd, SpatialPadd

        step = ResizeWithPadOrCropd if crop else SpatialPadd
        super().__init__(Compose([  # a mask is padded with zeros whatever the image's pad value
            step(keys="image", spatial_size=tuple(size), mode="constant", value=pad_value),
            step(keys="mask", spatial_size=tuple(size), mode="constant", value=0.0, allow_missing_keys=True)]))


@TRANSFORMS.register("RandomAugment3D")
class RandomAugment3D(Transform):
    """Train-time MONAI augmentation: random flips, a small affine (rotation in degrees, scale) and an
    intensity shift. A falsy option turns that augmentation off."""

    random = True

    def __init__(self, flip_axes: Sequence[int] = (0,), flip_prob: float = 0.5, rotate: float = 10.0,
                 scale: float = 0.1, affine_prob: float = 0.5, intensity_shift: float = 0.05,
                 shift_prob: float = 0.5):
        from monai.transforms import Compose, RandAffined, RandFlipd, RandShiftIntensityd

        steps = [RandFlipd(keys=SPATIAL_KEYS, prob=flip_prob, spatial_axis=axis, allow_missing_keys=True)
                 for axis in (flip_axes or ())]
        if rotate or scale:
            radians = float(np.deg2rad(rotate))
            steps.append(RandAffined(keys=SPATIAL_KEYS, prob=affine_prob, rotate_range=(radians,) * 3,
                                     scale_range=(scale,) * 3, mode="bilinear", padding_mode=("border", "zeros"),
                                     allow_missing_keys=True))
        if intensity_shift:
            steps.append(RandShiftIntensityd(keys="image", offsets=intensity_shift, prob=shift_prob))
        self.compose = Compose(steps)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = rng if rng is not None else np.random.default_rng()
        self.compose.set_random_state(seed=int(rng.integers(2**31 - 1)))
        return dict(self.compose(sample))


class Pipeline:
    """A list of transforms built from (and printable as) a list of ``dict(type=..., **kwargs)``.

    ``pipeline(path, seed)`` equals ``pipeline.augment(pipeline.load(path), seed)``: ``load`` runs the
    deterministic steps before the first random one (what a cache stores), ``augment`` the rest.
    """

    def __init__(self, spec: Sequence[dict[str, Any]]):
        self._spec = [dict(step) for step in copy.deepcopy(list(spec))]
        if not self._spec:
            raise ValueError("a pipeline needs at least a loading step, e.g. dict(type='LoadImage')")
        self.transforms = [TRANSFORMS.build(step) for step in self._spec]
        self.split = next((i for i, t in enumerate(self.transforms) if getattr(t, "random", False)),
                          len(self.transforms))

    @property
    def spec(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._spec)

    @property
    def kind(self) -> str:
        """``"3d"`` for volume pipelines (starting with ``LoadVolume``), else ``"2d"``."""
        return "3d" if isinstance(self.transforms[0], LoadVolume) else "2d"

    @property
    def deterministic_spec(self) -> list[dict[str, Any]]:
        return self.spec[: self.split]

    def load(self, path: str | os.PathLike, mask_paths: Sequence[str | None] | None = None, **fields: Any) -> Sample:
        """Deterministic steps: ``{"image": float32 torch tensor, "meta": {...}}`` (safe for ``torch.load``), with
        ``"mask"`` ``(L, ...)`` when ``mask_paths`` (one file or None per label) are given."""
        import torch

        sample: Sample = {"path": os.fspath(path), **fields}
        if mask_paths is not None:
            sample["mask_paths"] = list(mask_paths)
        affine = None
        for transform in self.transforms[: self.split]:
            sample = transform(sample, None)
            affine = getattr(sample["image"], "affine", affine)
        image, meta = sample["image"], dict(sample.get("meta", {}))
        if affine is not None:  # record the geometry after reorientation/resampling/cropping
            from mmvl.data.volume import axcodes

            affine = np.asarray(affine, dtype=np.float64)
            meta.update(affine=affine.tolist(), orientation=axcodes(affine),
                        spacing=[float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)])
        image = torch.from_numpy(np.ascontiguousarray(to_numpy(image)))
        meta["shape"] = list(image.shape[1:])
        if mask_paths is not None:
            return {"image": image, "meta": meta, "mask": torch.from_numpy(np.ascontiguousarray(
                to_numpy(sample["mask"])))}
        return {"image": image, "meta": meta}

    def augment(self, loaded: Sample, seed: int | None = None) -> Sample:
        """Random steps with a per-sample seed; returns a float32 numpy image (steps never modify their input
        in place, so ``loaded`` is left as it was)."""
        rng = np.random.default_rng(seed)
        sample: Sample = {"image": to_numpy(loaded["image"]), "meta": dict(loaded["meta"])}
        if loaded.get("mask") is not None:
            sample["mask"] = to_numpy(loaded["mask"])
        for transform in self.transforms[self.split :]:
            sample = transform(sample, rng)
        sample["image"] = np.ascontiguousarray(to_numpy(sample["image"]))
        if sample.get("mask") is not None:  # interpolated masks back to 0/1
            sample["mask"] = (to_numpy(sample["mask"]) > 0.5).astype(np.float32)
        return sample

    def __call__(self, path: str | os.PathLike, seed: int | None = None, **fields: Any) -> Sample:
        return self.augment(self.load(path, **fields), seed)

    def __repr__(self) -> str:
        return "Pipeline(\n" + "".join(f"  {step},\n" for step in self._spec) + ")"


def save_preprocess(path: str | os.PathLike, spec: Sequence[dict[str, Any]], **extra: Any) -> Path:
    """Write ``preprocess.json``: the eval pipeline spec that inference rebuilds exactly."""
    from mmvl.utils import atomic_write_text

    payload = {"format_version": 1, "input": Pipeline(spec).kind, "pipeline": [dict(step) for step in spec], **extra}
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def load_preprocess(path: str | os.PathLike) -> Pipeline:
    """Rebuild the pipeline recorded by :func:`save_preprocess`."""
    from mmvl.errors import DataError

    try:
        with open(path) as handle:
            payload = json.load(handle)
        spec = payload["pipeline"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(path, f"not a readable preprocess.json: {err}") from err
    return Pipeline(spec)
