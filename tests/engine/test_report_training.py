"""A tiny report generator trained through the Trainer on the synthetic CXR set, then scored on held-out images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmvl.config import Config
from mmvl.data.datasets import ManifestDataset
from mmvl.engine.trainer import Trainer
from mmvl.evaluation.report_metrics import finding_f1, report_metrics

REPO = Path(__file__).resolve().parents[2]

# The demo config made smaller still, on the impression section (about 14 tokens, where every finding is
# named): 2-layer ViT of width 96 on 16 px patches, 2-layer decoder of width 64; ~40 s on one CPU core.
TINY_REPORT = [
    "data.report_sections=['impression']", "model.heads.0.max_length=48",
    "model.image_encoder.patch_size=16", "model.image_encoder.embed_dim=96", "model.image_encoder.depth=2",
    "model.image_encoder.num_heads=3", "model.heads.0.decoder_dim=64", "model.heads.0.decoder_heads=2",
    "train.num_workers=0", "train.batch_size=32", "optim.lr=2e-3", "optim.warmup_steps=25",
]


@pytest.mark.slow
def test_tiny_report_generator_names_findings_in_held_out_images(synthetic_cxr, tmp_path, one_thread):
    cfg = Config.fromfile(REPO / "configs" / "demo" / "cxr_report_tiny.py")
    cfg.merge_options([f"data.manifest={synthetic_cxr}", *TINY_REPORT, "train.max_steps=400",
                       "train.val_interval=400", "train.ckpt_interval=400", "train.log_interval=50"])
    trainer = Trainer(cfg, tmp_path / "run")
    metrics = trainer.fit()
    assert "val/loss" in metrics and (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()

    model = trainer.model.eval()
    head = model.heads["report_gen"]
    held_out = [ManifestDataset(synthetic_cxr, cfg.data.eval_pipeline, split=split, report_sections=("impression",))
                for split in ("val", "test")]
    samples = [(dataset[i], dataset.rows[i]["labels"]) for dataset in held_out for i in range(len(dataset))]
    images = torch.stack([sample["image"] for sample, _ in samples])
    references = [sample["report"] for sample, _ in samples]
    labels = [row_labels for _, row_labels in samples]
    train_labels = [row["labels"] for row in trainer.train_set.rows]
    with torch.no_grad():
        image_out = model.image_encoder(images)
        greedy = head.generate(image_out, method="greedy")
        beam = head.generate(image_out, method="beam", num_beams=4)
    for name, generated in (("greedy", greedy), ("beam", beam)):
        scores = report_metrics(generated.texts, references, labels, reference_labels=train_labels)
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items() if k != "n"))
        assert scores["bleu1"] > 0.0  # computed on real text, whatever the model learned
    findings = finding_f1(greedy.texts, labels, reference_labels=train_labels)
    model_f1, majority_f1 = findings["model"]["micro"]["f1"], findings["majority_baseline"]["micro"]["f1"]
    assert model_f1 > majority_f1, findings
    # Beating the majority class (F1 0 for findings in 30% of studies) only needs a few right mentions; that
    # the reports follow the image shows in a finding named more accurately than "always present" names it.
    gains = {name: findings["model"]["per_finding"][name]["f1"] - findings["all_positive_baseline"]["per_finding"]
             [name]["f1"] for name in findings["findings"]}
    assert max(gains.values()) > 0.1, gains


def test_clip_and_report_heads_train_together(synthetic_cxr, tmp_path):
    cfg = Config.fromfile(REPO / "configs" / "cxr_clip_report.py")
    cfg.merge_options([
        f"data.manifest={synthetic_cxr}", "img_size=32",  # the encoder and both pipelines' ResizePad
        "model.image_encoder.model_name=vit_tiny_patch16_224",
        "model.image_encoder.patch_size=8", "model.image_encoder.embed_dim=32", "model.image_encoder.depth=1",
        "model.image_encoder.num_heads=2", "model.text_encoder.config.hidden_size=32",
        "model.text_encoder.config.num_hidden_layers=1", "model.text_encoder.config.num_attention_heads=2",
        "model.text_encoder.config.intermediate_size=64", "model.text_encoder.tokenizer.vocab_size=300",
        "model.heads.1.tokenizer.vocab_size=300",  # one vocabulary for both: the two recipes must agree
        "model.heads.0.embed_dim=32", "model.heads.1.decoder_dim=32", "model.heads.1.decoder_heads=2",
        "model.heads.1.decoder_depth=1", "train.max_steps=2", "train.batch_size=8", "train.num_workers=0",
        "train.val_interval=2", "train.amp=None", "optim.warmup_steps=1",
    ])
    trainer = Trainer(cfg, tmp_path / "run")
    metrics = trainer.fit()
    head = trainer.model.heads["report_gen"]
    assert head.tokenizer.vocab == trainer.model.text_encoder.tokenizer.vocab  # one shared vocabulary
    assert {"val/clip/loss", "val/report_gen/loss", "val/report_gen/token_acc", "val/i2t_R@5"} <= set(metrics)
    assert trainer.model.loss_weights == {"clip": 1.0, "report_gen": 0.5}
