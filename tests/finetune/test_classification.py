"""Classification heads (issue 19, part 1): each trains on tiny synthetic data and beats its untrained self on the
held-out split; the heads' losses and metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmvl.engine.trainer import Trainer
from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.models.heads.classification import MultiClassClassificationHead, MultiLabelClassificationHead
from tests.finetune.conftest import blob_config, finetune_config


def train_and_compare(cfg, work):
    trainer = Trainer(cfg, work)
    untrained = trainer.validate()
    trained = trainer.fit()
    return untrained, trained


def test_multilabel_2d_beats_untrained(synthetic_cxr, tmp_path, one_thread):
    cfg = finetune_config("cls_vit_cxr_tiny", synthetic_cxr, "model.mode=full", "model.lora=None",
                          "train.max_steps=60", "train.val_interval=60", "train.ckpt_interval=60", "optim.lr=2e-3")
    untrained, trained = train_and_compare(cfg, tmp_path / "run")
    # a zero-initialised classifier scores every study alike: AUROC 0.5, loss log 2
    assert untrained["val/cls/macro_auroc"] == pytest.approx(0.5)
    assert untrained["val/cls/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert trained["val/cls/macro_auroc"] > 0.75, trained
    assert trained["val/cls/loss"] < untrained["val/cls/loss"]
    assert {f"val/cls/auroc/{name}" for name in ("cardiomegaly", "pleural effusion")} <= set(trained)
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()  # chosen by train.best_metric


def test_multiclass_2d_beats_untrained(synthetic_cxr, tmp_path, one_thread):
    cfg = finetune_config("multiclass_vit_cxr_tiny", synthetic_cxr, "train.max_steps=60", "train.val_interval=60",
                          "train.ckpt_interval=60", "optim.lr=2e-3", "optim.layer_decay=1.0")
    untrained, trained = train_and_compare(cfg, tmp_path / "run")
    assert untrained["val/cls/loss"] == pytest.approx(math.log(3), abs=1e-5)
    assert untrained["val/cls/macro_auroc"] == pytest.approx(0.5)
    assert trained["val/cls/macro_auroc"] > 0.7, trained
    assert trained["val/cls/loss"] < untrained["val/cls/loss"]


def test_multilabel_3d_beats_untrained(blob_ct, tmp_path, one_thread):
    cfg = blob_config(blob_ct, "model.mode=full", "model.lora=None", "train.max_steps=60", "train.val_interval=60",
                      "train.ckpt_interval=60", "optim.lr=2e-3")
    untrained, trained = train_and_compare(cfg, tmp_path / "run")
    assert untrained["val/cls/macro_auroc"] == pytest.approx(0.5)
    assert trained["val/cls/macro_auroc"] > 0.75, trained
    assert trained["val/cls/loss"] < untrained["val/cls/loss"]


def _features(n: int, dim: int = 4) -> EncoderOutput:
    pooled = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    return EncoderOutput(pooled=pooled, tokens=pooled[:, None])


def test_multilabel_loss_leaves_unknown_labels_out_and_weights_positives():
    head = MultiLabelClassificationHead(4, ["b", "a"], pos_weight=[2.0, 1.0])
    head.bind_labels(["a", "b", "c"])  # the dataset's order: the head reads columns 1 and 0
    torch.nn.init.normal_(head.classifier.weight, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1.0, 0.0, 1.0], [-1.0, 1.0, 0.0], [0.0, -1.0, 1.0]])
    image = _features(3)
    loss = head(image, None, {"labels": labels})["loss"]
    logits = head.logits(image)
    terms = []
    for row, col_a, col_b in ((0, 0, 0), (1, None, 1), (2, 0, None)):
        if col_b is not None:  # label "b" (head column 0), pos_weight 2
            y = labels[row, 1]
            terms.append(-(2.0 * y * torch.log(torch.sigmoid(logits[row, 0]))
                           + (1 - y) * torch.log(1 - torch.sigmoid(logits[row, 0]))))
        if col_a is not None:  # label "a" (head column 1), pos_weight 1
            y = labels[row, 0]
            terms.append(-(y * torch.log(torch.sigmoid(logits[row, 1]))
                           + (1 - y) * torch.log(1 - torch.sigmoid(logits[row, 1]))))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    with pytest.raises(ConfigError, match="not in the manifest's labels"):
        head.bind_labels(["a", "c"])


def test_multiclass_targets_background_and_ignored_rows():
    head = MultiClassClassificationHead(4, ["x", "y"], background="none")
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [-1.0, 1.0]])
    assert head.class_targets(labels).tolist() == [0, 1, 2, -100, -100, 1]
    head.eval()
    out = head(_features(6), None, {"labels": labels})
    assert out["ignored"].item() == pytest.approx(2 / 6)
    scores = out["scores"].numpy()
    assert scores.shape == (6, 3) and np.allclose(scores.sum(1), 1)
    metrics = head.evaluate(scores, labels.long().numpy())
    assert metrics["accuracy"] == pytest.approx(1 / 4)  # zero classifier: class 0 everywhere, right for 1 of 4
    assert metrics["macro_auroc"] == pytest.approx(0.5)
