"""2D transforms: ``ResizePad`` against MONAI's ``Resize(size_mode="longest")`` + ``SpatialPad`` (what it
replaced), and a 2D training pipeline that runs without importing MONAI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mmvl.data.transforms import Pipeline, ResizePad
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[2]


def monai_resize_pad(image: np.ndarray, size: int, mode: str = "area", pad_value: float = 0.0) -> np.ndarray:
    """The MONAI implementation ``ResizePad`` had until it stopped importing MONAI: the reference."""
    from monai.transforms import Resize, SpatialPad

    resize = Resize(spatial_size=size, size_mode="longest", mode=mode)
    pad = SpatialPad(spatial_size=(size, size), mode="constant", value=pad_value)
    return np.asarray(pad(resize(image)), dtype=np.float32)


def resize_pad(image: np.ndarray, size: int, **options) -> np.ndarray:
    return ResizePad(size, **options)({"image": image.copy()})["image"]


def assert_same_resize(out: np.ndarray, expected: np.ndarray, mode: str = "area", err_msg: str = "") -> None:
    """Bitwise equal, except "area": mmvl averages each window with sparse matrices, torch/MONAI pool it, so the
    same window means differ in summation order. Values in [0, 1] averaged over windows of up to ~20 pixels in
    float32 agree to a few ulp of 1.0 (2e-7 each); 1e-6 leaves room for any x86 SIMD path."""
    if mode == "area":
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6, err_msg=err_msg)
    else:
        np.testing.assert_array_equal(out, expected, err_msg=err_msg)


@pytest.mark.parametrize("mode", ["area", "bilinear", "linear", "bicubic", "nearest", "nearest-exact"])
@pytest.mark.parametrize("shape", [(20, 13), (13, 20), (97, 64), (64, 97), (64, 64), (7, 7), (301, 257), (1, 5)])
@pytest.mark.parametrize("size", [16, 64])
def test_resize_pad_matches_monai(mode, shape, size):
    image = np.random.default_rng(sum(shape) + size).random((1, *shape), dtype=np.float32)
    expected = monai_resize_pad(image, size, mode=mode, pad_value=0.25)
    out = resize_pad(image, size, mode=mode, pad_value=0.25)
    assert out.dtype == np.float32 and out.shape == (1, size, size) and isinstance(out, np.ndarray)
    assert_same_resize(out, expected, mode)


def test_resize_pad_matches_monai_on_dicom(tmp_path, make_dicom):
    """Through ``LoadImage``: the synthetic chest X-ray set (square) and non-square stored DICOMs."""
    manifest = load_script("synthetic").generate(tmp_path / "cxr", n=4, size=64, seed=0)
    paths = [tmp_path / "cxr" / json.loads(line)["image"] for line in Path(manifest).read_text().splitlines()]
    rng = np.random.default_rng(0)
    paths += [make_dicom(f"{shape}.dcm", rng.integers(0, 4000, shape).astype(np.uint16))
              for shape in [(20, 13), (33, 90), (128, 100)]]
    for path in paths:
        loaded = Pipeline([dict(type="LoadImage")])(path)["image"]
        for size in (16, 48, 64, 80):
            out = Pipeline([dict(type="LoadImage"), dict(type="ResizePad", size=size)])(path)["image"]
            assert_same_resize(out, monai_resize_pad(loaded, size), err_msg=f"{path.name} at {size}")


def test_resize_pad_keeps_aspect_and_centres():
    image = np.ones((1, 10, 40), dtype=np.float32)
    out = resize_pad(image, 20, pad_value=-1.0)[0]
    # 10 x 40 -> 5 x 20, padded with 7 rows above and 8 below (MONAI SpatialPad's "symmetric": floor first)
    np.testing.assert_array_equal(out[7:12], 1.0)
    assert (out[:7] == -1.0).all() and (out[12:] == -1.0).all()


def test_resize_pad_does_not_change_its_input():
    image = np.random.default_rng(0).random((1, 30, 20), dtype=np.float32)
    before = image.copy()
    resize_pad(image, 30)  # already at size on the long side: no interpolation, only padding
    np.testing.assert_array_equal(image, before)


def test_resize_pad_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="ResizePad: mode 'lanczos'.*area"):
        ResizePad(32, mode="lanczos")


def test_2d_training_pipeline_does_not_import_monai(tmp_path, make_dicom):
    """MONAI pulls in ~2,400 modules (matplotlib, sklearn, pandas, scipy, ...): a chest X-ray run must not pay
    for them. A fresh interpreter builds the demo 2D train pipeline and a manifest dataset, and reads one DICOM."""
    path = make_dicom("a.dcm", np.random.default_rng(0).integers(0, 4000, (90, 70)).astype(np.uint16))
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": str(path), "report": "FINDINGS: clear."}) + "\n")
    script = textwrap.dedent(f"""
        import json
        import sys

        from mmvl.config import Config
        from mmvl.data.datasets import ManifestDataset
        from mmvl.data.transforms import Pipeline

        spec = Config.fromfile({str(REPO / "configs/demo/_base_/synthetic_cxr_64.py")!r})["data"]["train_pipeline"]
        image = Pipeline(spec)({str(path)!r}, seed=3)["image"]
        item = ManifestDataset({str(tmp_path / "m.jsonl")!r}, spec)[(0, 3)]
        assert image.shape == (1, 64, 64) and (item["image"].numpy() == image).all()
        print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] == "monai")))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert not imported, f"{len(imported)} monai modules imported, e.g. {imported[:8]}"


def test_normalize_makes_one_new_array_with_the_plain_formula():
    from mmvl.data.transforms import Normalize

    image = np.random.default_rng(0).random((1, 7, 5), dtype=np.float32)
    before = image.copy()
    out = Normalize(mean=0.5, std=0.25)({"image": image})["image"]
    np.testing.assert_array_equal(image, before)  # the input (a cache's memory) is left as it was
    np.testing.assert_array_equal(out, ((before - np.float32(0.5)) / np.float32(0.25)).astype(np.float32))
    assert out.dtype == np.float32


@pytest.mark.parametrize("shape", [(1, 300, 200), (1, 200, 300), (1, 9, 16), (1, 16, 16)])
def test_resize_pad_writes_the_area_resize_into_the_centre(shape):
    import torch

    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    out = ResizePad(size=16, pad_value=-1.0)({"image": image})["image"]
    resized = [int(round(side * 16 / max(shape[1:]))) for side in shape[1:]]
    expected = torch.nn.functional.interpolate(torch.from_numpy(image)[None], size=resized, mode="area")[0].numpy()
    top, left = ((16 - side) // 2 for side in resized)
    assert out.shape == (1, 16, 16) and out.dtype == np.float32
    assert_same_resize(out[:, top : top + resized[0], left : left + resized[1]], expected)
    assert (out == -1.0).sum() == 16 * 16 - resized[0] * resized[1]
