"""The image encoder as a MONAI bundle at the entry's root (``configs/metadata.json``, ``configs/inference.json``,
``models/model.pt``, and ``models/model.ts`` made by MONAI's own ``ckpt_export``), so one folder is at once an mmvl
entry, a Hugging Face-style repo and a MONAI bundle. The network maps images to the L2-normalised embedding
(:class:`mmvl.models.ImageEmbedder`, built from the entry's plain config). Checked with MONAI's
``verify_net_in_out``, ``monai.bundle.load`` (weights through ``torch.load(weights_only=True)``) and the
TorchScript module, against mmvl's embeddings."""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import numpy as np
import torch

import mmvl
from mmvl.models import ImageEmbedder
from mmvl.zoo._context import ExportContext, NotExportable, compare

BUNDLE_VERSION = "0.1.0"
META_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
               "meta_schema_20240725.json")
METADATA_FILE = "configs/metadata.json"
INFERENCE_FILE = "configs/inference.json"
WEIGHTS_FILE = "models/model.pt"
TORCHSCRIPT_FILE = "models/model.ts"
MONAI_LOGGERS = ("monai.bundle.scripts", "monai.bundle.workflows", "monai.networks.utils")


def _value_range(pipeline: list[dict[str, Any]]) -> list[float]:
    """The input range after the pipeline: [0, 1] intensities through its last ``Normalize``."""
    low, high = 0.0, 1.0
    for step in pipeline:
        if step.get("type") == "Normalize":
            mean, std = float(step.get("mean", 0.5)), float(step.get("std", 0.5))
            low, high = (low - mean) / std, (high - mean) / std
    return [round(low, 6), round(high, 6)]


def bundle_configs(context: ExportContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, inference)`` JSON of the bundle."""
    import monai

    spec = context.input
    embed_dim = context.config["embedding"]["dim"]
    out_dim = embed_dim or int(context.model.image_encoder.out_dim)
    pipeline = context.loaded.preprocess.spec
    modality = "CT" if spec["kind"] == "3d" else "radiograph"
    metadata = {
        "schema": META_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by mmvl {mmvl.__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"mmvl": mmvl.__version__},
        "name": context.name,
        "task": f"{spec['kind'].upper()} image embedding in a space shared with report text (vision-language "
                "pretraining)",
        "description": "Image encoder of an mmvl vision-language model: preprocessed images (see the entry's "
                       "preprocess.json) to L2-normalised embeddings; zero-shot scores come from their similarity "
                       "to the text embeddings of the same model (mmvl.zoo.load).",
        "authors": "mmvl export",
        "copyright": "see README.md",
        "license": context.config.get("license", "other"),
        "data_type": "nibabel/dicom" if spec["kind"] == "3d" else "dicom/png",
        "intended_use": "Research only; not a medical device.",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": modality, "num_channels": spec["in_chans"],
                "spatial_shape": list(spec["spatial_size"]), "dtype": "float32",
                "value_range": _value_range(pipeline), "is_patch_data": False,
                "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "tensor", "format": "embedding", "num_channels": out_dim, "spatial_shape": [],
                "dtype": "float32", "value_range": [-1, 1], "is_patch_data": False,
                "channel_def": {"0": "L2-normalised embedding"}}},
        },
    }
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "mmvl.models.embedders.ImageEmbedder",
                        "image_encoder": context.config["model"]["image_encoder"], "embed_dim": embed_dim},
        "network": "$@network_def.to(@device)",
        "mmvl_preprocess": "preprocess.json",
    }
    return metadata, inference


@torch.no_grad()
def export_monai_bundle(context: ExportContext) -> dict[str, Any]:
    if "image" not in context.parts:
        raise NotExportable("no image encoder in this export (--parts)")
    from monai.bundle import ckpt_export, load, verify_net_in_out
    from monai.data import load_net_with_metadata

    out = context.out
    metadata, inference = bundle_configs(context)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    (out / INFERENCE_FILE).write_text(json.dumps(inference, indent=2) + "\n")
    embedder = ImageEmbedder.from_model(context.model)
    torch.save(embedder.state_dict(), out / WEIGHTS_FILE)

    images = context.probe_images
    meta_file, config_file = str(out / METADATA_FILE), str(out / INFERENCE_FILE)
    # MONAI logs every step's arguments, and warns of a bundle without logging.conf
    loggers = [logging.getLogger(name) for name in MONAI_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's note on trusting a bundle's config: we wrote it ourselves
            verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, device="cpu")
            network = load(name=out.name, bundle_dir=str(out.parent), workflow_type="inference", device="cpu",
                           progress=False).eval()
            checks = {"bundle_load": compare(embedder(images), network(images), "MONAI bundle (monai.bundle.load)")}
            ckpt_export(net_id="network_def", filepath=str(out / TORCHSCRIPT_FILE), ckpt_file=str(out / WEIGHTS_FILE),
                        meta_file=meta_file, config_file=config_file, use_trace=True,
                        input_shape=[1, *images.shape[1:]], bundle_root=str(out))
            scripted, meta, _ = load_net_with_metadata(str(out / TORCHSCRIPT_FILE), map_location="cpu")
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    checks["torchscript"] = compare(embedder(images[:1]), scripted(images[:1]), "MONAI bundle models/model.ts")
    checks["verify_net_in_out"] = "passed"
    if meta.get("network_data_format") != metadata["network_data_format"]:
        raise NotExportable("models/model.ts does not carry the bundle metadata")
    return checks
