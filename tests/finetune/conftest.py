"""Fixtures of the fine-tuning tests: the fine-tuning demo configs made tiny, and a small synthetic CT set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, load_script

# configs/finetune/*_tiny.py made smaller still (a 1-block ViT of width 32 at 32 px), so a run takes seconds
TINY_2D = [
    "img_size=32", "model.image_encoder.embed_dim=32", "model.image_encoder.depth=2",
    "model.image_encoder.num_heads=2", "train.batch_size=16", "train.num_workers=0", "train.log_interval=1",
    "train.plots=False", "optim.warmup_steps=0", "model.init_from=None",
]
TINY_3D = [
    "model.image_encoder.hidden_size=32", "model.image_encoder.mlp_dim=64", "model.image_encoder.num_layers=2",
    "model.image_encoder.num_heads=2", "model.image_encoder.patch_size=(16,16,16)", "train.batch_size=16",
    "train.num_workers=0", "train.log_interval=1", "train.plots=False", "optim.warmup_steps=0",
]


def finetune_config(name: str, manifest: Path, *options: str, size: str = "2d"):
    from mmvl.config import Config

    cfg = Config.fromfile(REPO / "configs" / "finetune" / f"{name}.py")
    cfg.merge_options([f"data.manifest={manifest}", *(TINY_2D if size == "2d" else TINY_3D), *options])
    return cfg


@pytest.fixture(scope="session")
def synthetic_ct_small(tmp_path_factory) -> Path:
    """120 synthetic CT studies (NIfTI, 32 x 32 matrix, ~10 s to write): 96 for training, 24 held out."""
    out = tmp_path_factory.mktemp("synthetic_ct_small")
    manifest = load_script("synthetic_ct").generate_ct(out, n=120, size=32, slices=16, formats=("nifti",))["nifti"]
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    for index, row in enumerate(rows):
        row["split"] = "train" if index < 96 else "val"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return manifest


# the 3D blob set's geometry: 24^3 voxels of 16 mm, so the tiny CT config reads it unchanged at that size
BLOB_3D = ["spacing=(16.0,16.0,16.0)", "volume_size=(24,24,24)", "model.image_encoder.patch_size=(8,8,8)",
           "model.heads.0.label_names=['mass','dense']"]


def blob_config(manifest: Path, *options: str):
    """configs/finetune/cls_vit3d_ct_tiny.py on the blob set (:func:`blob_ct`), without augmentation (MONAI's random
    affine would take most of a test's time), its volumes cached on disk once for every test of the session."""
    cfg = finetune_config("cls_vit3d_ct_tiny", manifest, *BLOB_3D, "data.cache=disk",
                          f"data.cache_dir={manifest.parent / 'cache'}", *options, size="3d")
    cfg.data.train_pipeline = cfg.data.eval_pipeline
    return cfg


@pytest.fixture(scope="session")
def blob_ct(tmp_path_factory) -> Path:
    """160 small CT-like NIfTI volumes (24^3 voxels of 16 mm: a soft-tissue body in air) with two findings a tiny
    3D ViT learns in a few dozen steps: "mass" (a dense 6^3 cube somewhere in the body) and "dense" (the whole
    body 150 HU denser); 120 for training, 40 held out, written in about a second."""
    import nibabel as nib

    out = tmp_path_factory.mktemp("blob_ct")
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, 24),) * 3, indexing="ij"))
    body = (grid**2).sum(0) < 0.8
    rows = []
    for index in range(160):
        mass, dense = int(rng.random() < 0.4), int(rng.random() < 0.4)
        volume = np.where(body, 40.0 + 150.0 * dense, -1000.0) + rng.normal(0, 20, body.shape)
        if mass:
            x, y, z = rng.integers(6, 12, size=3)
            volume[x:x + 6, y:y + 6, z:z + 6] = 500.0
        path = out / f"{index:04d}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([16.0, 16.0, 16.0, 1.0])), path)
        findings = [name for name, present in (("a dense mass", mass), ("dense parenchyma", dense)) if present]
        rows.append({"image": path.name, "report": f"IMPRESSION: {', '.join(findings) or 'normal'}.",
                     "labels": {"mass": mass, "dense": dense}, "split": "train" if index < 120 else "val",
                     "study_id": f"blob{index:04d}"})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return manifest
