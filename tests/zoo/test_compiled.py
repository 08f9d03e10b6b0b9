"""TorchScript and ONNX image encoders: run by torch.jit and onnxruntime, compared with eager mmvl (2D and 3D)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mmvl import zoo

COSINE = 0.9999


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), torch.as_tensor(b).float(), dim=-1).min().item()


@pytest.mark.parametrize("entry_fixture, shape", [("entry2d", (1, 32, 32)), ("entry3d", (1, 16, 16, 16))])
def test_torchscript_matches_eager(entry_fixture, shape, request, one_thread):
    entry = request.getfixturevalue(entry_fixture)
    images = torch.randn(5, *shape, generator=torch.Generator().manual_seed(3))  # not the traced batch size
    expected = zoo.load(entry).encode_image(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(entry / "torchscript" / "image_encoder.pt"), map_location="cpu")
    with torch.no_grad():
        got = scripted(images)
    assert got.shape == expected.shape
    assert _cosine(expected, got) >= COSINE


@pytest.mark.parametrize("entry_fixture, shape", [("entry2d", (1, 32, 32)), ("entry3d", (1, 16, 16, 16))])
def test_onnx_matches_eager(entry_fixture, shape, request, one_thread):
    onnxruntime = pytest.importorskip("onnxruntime")
    entry = request.getfixturevalue(entry_fixture)
    images = torch.randn(4, *shape, generator=torch.Generator().manual_seed(4))
    expected = zoo.load(entry).encode_image(images)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(entry / "onnx" / "image_encoder.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    (got,) = session.run(["embedding"], {"image": images.numpy()})
    assert got.shape == tuple(expected.shape)
    assert _cosine(expected, torch.from_numpy(got)) >= COSINE
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
