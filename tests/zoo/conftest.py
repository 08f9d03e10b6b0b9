"""Tiny work dirs for the zoo tests, written the way the trainer writes them (checkpoint dict with "model" and
"config", preprocess.json, tokenizer/), from models built with a fixed seed: no training needed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

REPORTS = [
    "no acute cardiopulmonary process", "small left pleural effusion", "moderate right pleural effusion",
    "large right pneumothorax", "cardiomegaly without effusion", "nodule in the right upper lobe",
    "no pneumothorax or pleural effusion", "stable cardiomegaly", "left lower lobe consolidation",
    "emphysema with a small nodule", "normal heart size", "no focal consolidation",
]
TEXT_ENCODER = {"type": "bert", "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                           "intermediate_size": 64, "max_position_embeddings": 64},
                "pooling": "mean", "max_length": 32}
IMAGE_2D = {"type": "vit2d", "model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 32,
            "depth": 1, "num_heads": 2, "global_pool": "avg"}
PIPELINE_2D = [{"type": "LoadImage", "frame": 0, "voi": "auto"}, {"type": "ResizePad", "size": 32},
               {"type": "Normalize", "mean": 0.5, "std": 0.25}]
IMAGE_3D = {"type": "vit3d", "img_size": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 32, "mlp_dim": 64,
            "num_layers": 1, "num_heads": 2}
PIPELINE_3D = [{"type": "LoadVolume", "modalities": ["CT"]}, {"type": "Orient", "axcodes": "RAS"},
               {"type": "Resample", "spacing": [8.0, 8.0, 8.0]},
               {"type": "IntensityWindow", "low": -1000.0, "high": 1000.0},
               {"type": "CropOrPad", "size": [16, 16, 16]}, {"type": "Normalize", "mean": 0.5, "std": 0.25}]


def write_work_dir(root: Path, image_encoder: dict | None, pipeline: list[dict], text: bool = True,
                   heads: list[dict] | None = None, seed: int = 0, manifest: str = "/site/private/manifest.jsonl",
                   text_encoder: dict | None = None, perturb: float = 0.0) -> Path:
    """A work dir as tools/train.py leaves it (checkpoints/last.pt, preprocess.json, tokenizer/, config.py).
    ``perturb``: noise of that scale added to every weight, so no norm is the identity and no bias zero (a
    conversion that mixes them up then shows)."""
    import mmvl
    from mmvl.data.tokenizer import train_wordpiece_tokenizer
    from mmvl.data.transforms import save_preprocess
    from mmvl.engine.checkpoint import save_checkpoint
    from mmvl.models import build_model

    root.mkdir(parents=True, exist_ok=True)
    heads = copy.deepcopy(heads or [{"type": "clip", "embed_dim": 32}])
    train_wordpiece_tokenizer(REPORTS * 2, root / "tokenizer", vocab_size=300, min_frequency=1)
    for head in heads:  # the trainer replaces a dict(type="wordpiece") tokenizer by its work-dir folder
        if head.get("tokenizer") == "trained":
            head["tokenizer"] = str(root / "tokenizer")
    model_cfg: dict[str, Any] = {"heads": heads}
    if image_encoder is not None:
        model_cfg["image_encoder"] = copy.deepcopy(image_encoder)
    if text_encoder is not None:
        model_cfg["text_encoder"] = copy.deepcopy(text_encoder)
    elif text:
        model_cfg["text_encoder"] = {**copy.deepcopy(TEXT_ENCODER), "tokenizer": str(root / "tokenizer")}
    cfg = {"model": model_cfg,
           "data": {"manifest": manifest, "report_sections": ["findings", "impression"], "val_split": "val",
                    "train_pipeline": pipeline, "eval_pipeline": pipeline},
           "train": {"max_steps": 7, "batch_size": 4, "seed": 0}, "optim": {"lr": 0.001, "warmup_steps": 1}}
    torch.manual_seed(seed)
    model = build_model(cfg["model"])
    if any(h["type"] == "clip" for h in heads):
        with torch.no_grad():  # a trained-looking logit scale, not the initial one
            model.contrastive_head.logit_scale.fill_(2.5)
    if perturb:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not name.endswith("logit_scale"):
                    parameter.add_(torch.randn_like(parameter) * perturb)
    save_checkpoint(root / "checkpoints" / "last.pt",
                    {"model": model.state_dict(), "config": cfg, "step": 7, "mmvl_version": mmvl.__version__})
    save_preprocess(root / "preprocess.json", pipeline, mmvl_version=mmvl.__version__)
    (root / "config.py").write_text("# merged config\n")
    (root / "metrics.jsonl").write_text('{"step": 7, "loss": 2.0}\n{"step": 7, "val/i2t_R@5": 0.5, "val/loss": 1.9}\n')
    return root


@pytest.fixture(scope="module")
def clip2d_work_dir(tmp_path_factory) -> Path:
    return write_work_dir(tmp_path_factory.mktemp("zoo2d") / "run", IMAGE_2D, PIPELINE_2D)


@pytest.fixture(scope="module")
def clip3d_work_dir(tmp_path_factory) -> Path:
    return write_work_dir(tmp_path_factory.mktemp("zoo3d") / "run", IMAGE_3D, PIPELINE_3D)


def export_entry(work_dir: Path, zoo_dir: Path, name: str, **kwargs: Any) -> Path:
    from mmvl.zoo import export

    torch.set_num_threads(1)
    return export(work_dir, name, out=zoo_dir / name, **kwargs).path


@pytest.fixture(scope="module")
def entry2d(clip2d_work_dir, tmp_path_factory) -> Path:
    """The 2D work dir exported with every format (``all``)."""
    return export_entry(clip2d_work_dir, tmp_path_factory.mktemp("zoo"), "tiny2d", formats="all")


@pytest.fixture(scope="module")
def entry3d(clip3d_work_dir, tmp_path_factory) -> Path:
    return export_entry(clip3d_work_dir, tmp_path_factory.mktemp("zoo"), "tiny3d", formats="all")


@pytest.fixture
def png_images(tmp_path) -> list[Path]:
    """Three small gray PNGs of different sizes (ResizePad brings them to the model's size)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(40, 50), (32, 32), (64, 20)]):
        path = tmp_path / "scans" / f"scan{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def volume_file(tmp_path: Path, seed: int = 0) -> Path:
    """A small CT-like NIfTI volume (HU) with a 6 mm grid."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    hu = (rng.random((20, 18, 14)) * 1500 - 1000).astype(np.float32)
    path = tmp_path / f"ct{seed}.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([6.0, 6.0, 6.0, 1.0])), str(path))
    return path
