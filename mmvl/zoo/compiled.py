"""TorchScript and ONNX exports of the image embedder (encoder + projection + L2 normalisation, what
``encode_image`` computes), each run back (``torch.jit.load``, onnxruntime) and compared with eager mmvl."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from mmvl.models import ImageEmbedder
from mmvl.zoo._context import ExportContext, NotExportable, compare

TORCHSCRIPT_FILE = "torchscript/image_encoder.pt"
ONNX_FILE = "onnx/image_encoder.onnx"
ONNX_OPSET = 17


def _embedder(context: ExportContext) -> ImageEmbedder:
    if "image" not in context.parts:
        raise NotExportable("no image encoder in this export (--parts)")
    return ImageEmbedder.from_model(context.model)


@torch.no_grad()
def export_torchscript(context: ExportContext) -> dict[str, Any]:
    """``torchscript/image_encoder.pt``: traced on the probe batch; checked on it and on a batch of another size."""
    embedder = _embedder(context)
    images = context.probe_images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the encoders' Python-side shape checks
        traced = torch.jit.trace(embedder, images[:2], check_trace=False)
    path = context.out / TORCHSCRIPT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        reloaded = torch.jit.load(str(path), map_location="cpu")
    return {"probe": compare(embedder(images), reloaded(images), "TorchScript"),
            "batch_1": compare(embedder(images[:1]), reloaded(images[:1]), "TorchScript (batch of 1)")}


@torch.no_grad()
def export_onnx(context: ExportContext) -> dict[str, Any]:
    """``onnx/image_encoder.onnx`` (input ``image``, output ``embedding``, dynamic batch), checked with
    onnxruntime on the CPU."""
    try:
        import onnx  # noqa: F401  (the exporter needs it; optional, as onnxruntime: the [export] extra)
        import onnxruntime
    except ImportError as err:
        raise NotExportable(f"needs onnx and onnxruntime ({err.name} missing): pip install -e '.[export]'") from err
    embedder = _embedder(context)
    images = context.probe_images
    path = context.out / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
        torch.onnx.export(embedder, (images[:2],), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["embedding"],
                          dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    checks = {}
    for key, batch in (("probe", images), ("batch_1", images[:1])):
        (embedding,) = session.run(["embedding"], {"image": batch.numpy()})
        checks[key] = compare(embedder(batch), torch.from_numpy(embedding), f"ONNX ({key})")
    return checks
