"""open_clip interop: an mmvl model exported for open_clip and loaded by open_clip itself; an open_clip checkpoint
on disk (timm vision tower + transformers text tower with an MLP head, as BiomedCLIP) imported into mmvl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmvl import zoo
from mmvl.zoo.export import NotExportable
from tests.zoo.conftest import IMAGE_OPEN_CLIP, PIPELINE_OPEN_CLIP, REPORTS, export_entry, write_work_dir

TEXTS = ["small left pleural effusion", "no pneumothorax", "cardiomegaly"]
MEAN_RGB, STD_RGB = [0.48, 0.45, 0.40], [0.26, 0.27, 0.28]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def test_open_clip_loads_the_export(tmp_path, one_thread):
    import open_clip

    work = write_work_dir(tmp_path / "run", IMAGE_OPEN_CLIP, PIPELINE_OPEN_CLIP)
    entry = export_entry(work, tmp_path / "zoo", "oc", formats="mmvl,open_clip")
    folder = entry / "open_clip"
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "test_vit"
    assert config["preprocess_cfg"]["mean"] == [0.5] * 3 and config["preprocess_cfg"]["std"] == [0.25] * 3
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    mmvl_model = zoo.load(entry)
    gray = torch.randn(2, 1, 160, 160, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        image = model.encode_image(gray.expand(-1, 3, -1, -1), normalize=True)
        text = model.encode_text(tokenizer(TEXTS), normalize=True)
    assert _cosine(mmvl_model.encode_image(gray), image) >= 0.9999
    assert _cosine(mmvl_model.encode_text(TEXTS), text) >= 0.9999
    assert float(model.logit_scale.detach().exp()) == pytest.approx(float(torch.tensor(2.5).exp()), rel=1e-6)


def test_open_clip_refuses_towers_it_cannot_build(clip2d_work_dir, tmp_path):
    with pytest.raises(NotExportable, match="timm towers from the model name alone; .* depth, embed_dim"):
        export_entry(clip2d_work_dir, tmp_path / "zoo", "custom_vit", formats="open_clip")
    assert not (tmp_path / "zoo" / "custom_vit").exists()
    assert [p.name for p in (tmp_path / "zoo").iterdir()] == []  # no half-written entry left behind


def _open_clip_checkpoint(folder: Path) -> Path:
    """A small open_clip CustomTextCLIP (timm test_vit + 1-layer BERT, MLP text head, [CLS] pooling) saved as an
    open_clip folder: open_clip_config.json with per-channel mean/std and a torch checkpoint."""
    import open_clip
    from transformers import BertConfig

    from mmvl.data.tokenizer import train_wordpiece_tokenizer

    text_dir = folder / "text"
    tokenizer = train_wordpiece_tokenizer(REPORTS * 2, text_dir, vocab_size=300, min_frequency=1)
    BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, hidden_size=32, num_hidden_layers=1,
               num_attention_heads=2, intermediate_size=64, max_position_embeddings=64).save_pretrained(text_dir)
    model_cfg = {"embed_dim": 24,
                 "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                                "timm_proj": "linear", "image_size": 160},
                 "text_cfg": {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
                              "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                              "context_length": 32}}
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**{**model_cfg, "text_cfg": {**model_cfg["text_cfg"],
                                                                    "hf_model_pretrained": False}})
    with torch.no_grad():
        for parameter in model.parameters():  # off the initial values (zero biases, unit norms)
            parameter.add_(torch.randn_like(parameter) * 0.02)
        model.logit_scale.fill_(3.0)
    checkpoint_dir = folder / "biomedclip_like"
    shutil.copytree(text_dir, checkpoint_dir)  # a hub download holds the tokenizer files beside the weights
    (checkpoint_dir / "config.json").unlink()
    torch.save(model.state_dict(), checkpoint_dir / "open_clip_pytorch_model.bin")
    (checkpoint_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": MEAN_RGB, "std": STD_RGB}}))
    return checkpoint_dir


def test_import_open_clip_checkpoint(tmp_path, one_thread):
    import open_clip

    folder = _open_clip_checkpoint(tmp_path)
    imported = zoo.import_open_clip(folder)
    assert imported.config["model"]["text_encoder"]["type"] == "open_clip_hf_text"
    normalize = imported.preprocess.spec[-1]
    assert normalize["type"] == "Normalize" and normalize["mean"] == pytest.approx(sum(MEAN_RGB) / 3)

    reference = open_clip.create_model(f"local-dir:{folder}").eval()  # open_clip's own loading of the same files
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    gray = torch.rand(2, 1, 160, 160, generator=torch.Generator().manual_seed(7))  # [0, 1] intensities
    rgb = (gray - torch.tensor(MEAN_RGB).view(1, 3, 1, 1)) / torch.tensor(STD_RGB).view(1, 3, 1, 1)
    with torch.no_grad():
        expected_image = reference.encode_image(rgb, normalize=True)
        expected_text = reference.encode_text(tokenizer(TEXTS), normalize=True)
    assert _cosine(expected_image, imported.encode_image((gray - normalize["mean"]) / normalize["std"])) >= 0.9999
    assert _cosine(expected_text, imported.encode_text(TEXTS)) >= 0.9999
    assert float(imported.model.contrastive_head.scale().detach()) == pytest.approx(float(torch.tensor(3.0).exp()))

    entry = export_entry(imported, tmp_path / "zoo", "imported", formats="mmvl,open_clip,onnx")
    loaded = zoo.load(entry)
    assert torch.equal(loaded.encode_text(TEXTS), imported.encode_text(TEXTS))
    images = (gray - normalize["mean"]) / normalize["std"]
    assert torch.equal(loaded.encode_image(images), imported.encode_image(images))
    again = open_clip.create_model(f"local-dir:{entry / 'open_clip'}").eval()  # and back to open_clip, which now
    with torch.no_grad():  # normalises every channel with the one mean/std: the gray input copied to RGB
        assert _cosine(expected_image, again.encode_image(images.expand(-1, 3, -1, -1), normalize=True)) >= 0.9999
        assert _cosine(expected_text, again.encode_text(tokenizer(TEXTS), normalize=True)) >= 0.9999
