"""The SigLIP and label-aware CLIP configs train through the trainer on the synthetic CXR set: their heads are
built from the config, receive the manifest labels, and their losses and extra figures are logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmvl.config import Config
from mmvl.engine.trainer import Trainer
from mmvl.models.heads import LabelAwareContrastiveHead, SigLipHead

REPO = Path(__file__).resolve().parents[2]
TINIER = [  # the tiny demo made smaller still, so that a few steps take seconds
    "img_size=32",
    "model.image_encoder.embed_dim=32", "model.image_encoder.depth=1", "model.image_encoder.num_heads=2",
    "model.text_encoder.config.hidden_size=32", "model.text_encoder.config.num_hidden_layers=1",
    "model.text_encoder.config.num_attention_heads=2", "model.text_encoder.config.intermediate_size=64",
    "model.heads.0.embed_dim=32", "train.batch_size=8", "train.max_steps=3", "train.val_interval=3",
    "train.ckpt_interval=3", "train.log_interval=1", "train.num_workers=0", "optim.warmup_steps=1",
]


@pytest.mark.parametrize(("name", "head_type", "figure"), [
    ("cxr_siglip_tiny.py", SigLipHead, "logit_bias"),
    ("cxr_clip_labels_tiny.py", LabelAwareContrastiveHead, "soft_target_mass"),
])
def test_contrastive_variant_trains(synthetic_cxr, tmp_path, one_thread, name, head_type, figure):
    cfg = Config.fromfile(REPO / "configs" / "demo" / name)
    full = Config.fromfile(REPO / "configs" / name.replace("_tiny", ""))
    assert full.model.heads[0]["type"] == cfg.model.heads[0]["type"]
    cfg.merge_options([f"data.manifest={synthetic_cxr}", *TINIER])
    trainer = Trainer(cfg, tmp_path / "run")
    (head_name, head), = trainer.model.heads.items()
    assert isinstance(head, head_type)
    seen = []
    original = head.forward
    head.forward = lambda image, text, batch: seen.append(batch.get("labels")) or original(image, text, batch)
    metrics = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert all(f"{head_name}/{figure}" in r for r in steps)
    assert "val/i2t_R@5" in metrics
    labels = seen[0]  # (B, L) tensor from the manifest's label dicts: 1 present, 0 absent
    assert labels is not None and labels.shape == (8, len(trainer.train_set.label_names))
    if head_type is LabelAwareContrastiveHead:
        # the synthetic findings overlap between studies, so some target mass moves off the diagonal
        assert any(r[f"{head_name}/soft_target_mass"] > 0 for r in steps)
