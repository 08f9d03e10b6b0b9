"""2D preprocessing pipelines built from a plain list of dicts (the preprocessing spec).

A pipeline maps an image path to ``{"image": float32 (1, H, W), "meta": {...}}``. The same list of dicts,
saved as ``preprocess.json``, rebuilds the identical pipeline at inference (as MONAI bundles do).
Random transforms draw from a per-sample seed, so augmentation is reproducible and resumable.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmvl.data.io import read_image
from mmvl.registry import TRANSFORMS

Sample = dict[str, Any]


@TRANSFORMS.register("LoadImage")
class LoadImage:
    """Read DICOM/PNG/JPEG into ``(1, H, W)`` float32 in [0, 1]; DICOM options as in ``read_dicom_image``."""

    def __init__(self, frame: int = 0, voi: str = "auto", window_index: int = 0):
        self.options = {"frame": frame, "voi": voi, "window_index": window_index}

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        image, meta = read_image(sample["path"], **self.options)
        sample["image"] = image[None]
        sample["meta"] = meta
        return sample


@TRANSFORMS.register("ResizePad")
class ResizePad:
    """Resize so the longer side is ``size`` (aspect kept), then pad to ``size x size`` (MONAI)."""

    def __init__(self, size: int, mode: str = "area", pad_value: float = 0.0):
        from monai.transforms import Resize, SpatialPad

        self.size = int(size)
        self.resize = Resize(spatial_size=self.size, size_mode="longest", mode=mode)
        self.pad = SpatialPad(spatial_size=(self.size, self.size), mode="constant", value=pad_value)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        resized = self.pad(self.resize(sample["image"]))
        sample["image"] = np.asarray(resized, dtype=np.float32)
        return sample


@TRANSFORMS.register("RandomAugment2D")
class RandomAugment2D:
    """Train-time albumentations: random resized crop (0.5-1.0 of the area, as in MAE-on-CXR studies),
    small rotation and brightness/contrast jitter. Output keeps the input size."""

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
        out = compose(image=image)["image"]
        sample["image"] = np.clip(out, 0.0, 1.0).astype(np.float32)[None]
        return sample


@TRANSFORMS.register("Normalize")
class Normalize:
    """``(x - mean) / std`` on the [0, 1] image."""

    def __init__(self, mean: float = 0.5, std: float = 0.5):
        if std <= 0:
            raise ValueError(f"Normalize: std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        sample["image"] = ((sample["image"] - self.mean) / self.std).astype(np.float32)
        return sample


class Pipeline:
    """A list of transforms built from (and printable as) a list of ``dict(type=..., **kwargs)``."""

    def __init__(self, spec: Sequence[dict[str, Any]]):
        self._spec = [dict(step) for step in copy.deepcopy(list(spec))]
        self.transforms = [TRANSFORMS.build(step) for step in self._spec]

    @property
    def spec(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._spec)

    def __call__(self, path: str | os.PathLike, seed: int | None = None) -> Sample:
        rng = np.random.default_rng(seed)
        sample: Sample = {"path": os.fspath(path)}
        for transform in self.transforms:
            sample = transform(sample, rng)
        return sample

    def __repr__(self) -> str:
        return "Pipeline(\n" + "".join(f"  {step},\n" for step in self._spec) + ")"


def save_preprocess(path: str | os.PathLike, spec: Sequence[dict[str, Any]], **extra: Any) -> Path:
    """Write ``preprocess.json``: the eval pipeline spec that inference rebuilds exactly."""
    from mmvl.utils import atomic_write_text

    payload = {"format_version": 1, "pipeline": [dict(step) for step in spec], **extra}
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def load_preprocess(path: str | os.PathLike) -> Pipeline:
    with open(path) as handle:
        payload = json.load(handle)
    return Pipeline(payload["pipeline"])
