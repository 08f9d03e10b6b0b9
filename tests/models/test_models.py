from __future__ import annotations

import math

import pytest
import torch

from mmvl.data.tokenizer import train_wordpiece_tokenizer
from mmvl.errors import ConfigError, RegistryError
from mmvl.models import build_model
from mmvl.registry import ENCODERS

VIT = dict(type="vit2d", model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
           num_heads=2)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_wordpiece_tokenizer(["no pleural effusion", "large right pneumothorax", "the heart is enlarged"] * 3,
                              out, vocab_size=100, min_frequency=1)
    return out


def text_cfg(tokenizer_dir, pooling="cls"):
    return dict(type="bert", tokenizer=str(tokenizer_dir), pooling=pooling, max_length=16,
                config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))


def test_vit_and_swin_shapes():
    vit = ENCODERS.build(VIT)
    out = vit(torch.randn(3, 1, 32, 32))
    assert out.pooled.shape == (3, 32) and out.tokens.shape == (3, 1 + 16, 32) and vit.out_dim == 32
    swin = ENCODERS.build(dict(type="swin2d", img_size=32, patch_size=4, window_size=4, embed_dim=16,
                               depths=(1, 1), num_heads=(1, 2)))
    out = swin(torch.randn(2, 1, 32, 32))
    assert out.pooled.shape == (2, 32) and out.tokens.shape == (2, 16, 32)
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\)"):
        vit(torch.randn(1, 32, 32))
    with pytest.raises(ConfigError, match="timm has no model 'vit_tinny'"):
        ENCODERS.build({**VIT, "model_name": "vit_tinny"})


def test_pretrained_path_loads_local_timm_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, img_size=32,
                               patch_size=8, embed_dim=32, depth=1, num_heads=2)
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    loaded = ENCODERS.build({**VIT, "pretrained_path": str(tmp_path / "vit.safetensors")})
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="file not found"):
        ENCODERS.build({**VIT, "pretrained_path": str(tmp_path / "missing.safetensors")})


def test_text_encoder_pooling(tokenizer_dir):
    torch.manual_seed(0)
    cls = ENCODERS.build(text_cfg(tokenizer_dir, "cls")).eval()
    tokens = cls.tokenize(["no pleural effusion", "the heart is enlarged and large"])
    out = cls(**tokens)
    assert torch.equal(out.pooled, out.tokens[:, 0])
    mean = ENCODERS.build(text_cfg(tokenizer_dir, "mean")).eval()
    mean.load_state_dict(cls.state_dict())
    pooled = mean(**tokens).pooled
    mask = tokens["attention_mask"][0].bool()
    assert torch.allclose(pooled[0], out.tokens[0][mask].mean(0), atol=1e-6)  # padding excluded
    with pytest.raises(ConfigError, match="pooling must be 'cls' or 'mean'"):
        ENCODERS.build(text_cfg(tokenizer_dir, "max"))


def test_model_forward_loss_and_embeddings(tokenizer_dir):
    torch.manual_seed(0)
    model = build_model(dict(image_encoder=VIT, text_encoder=text_cfg(tokenizer_dir),
                             heads=[dict(type="clip", embed_dim=16, loss_weight=2.0)]))
    tokens = model.text_encoder.tokenize(["no pleural effusion"] * 2 + ["large right pneumothorax"] * 2)
    batch = {"image": torch.randn(4, 1, 32, 32), **tokens}
    out = model(batch)
    assert out["loss"].item() == pytest.approx(2.0 * out["clip/loss"].item())
    assert out["clip/logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    out["loss"].backward()
    assert model.contrastive_head.logit_scale.grad is not None
    assert model.image_encoder.model.patch_embed.proj.weight.grad.abs().sum() > 0
    emb = model.encode_text(["no pleural effusion", "the heart is enlarged"])
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        model.contrastive_head.logit_scale.fill_(math.log(1000.0))
    assert model.contrastive_head.scale().item() == pytest.approx(100.0)  # clamped as in CLIP


def test_model_config_errors(tokenizer_dir):
    with pytest.raises(RegistryError, match="unknown head type 'clips'"):
        build_model(dict(image_encoder=VIT, text_encoder=text_cfg(tokenizer_dir), heads=[dict(type="clips")]))
    with pytest.raises(ConfigError, match="heads is empty"):
        build_model(dict(image_encoder=VIT, heads=[]))
    with pytest.raises(ConfigError, match="tokenizer is not set"):
        ENCODERS.build(dict(type="bert", config=dict(hidden_size=32)))


def test_text_encoder_from_a_pretrained_directory(tmp_path, tokenizer_dir):
    """A BERT-family directory saved by transformers (as CXR-BERT/PubMedBERT downloads are) loads offline."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    reference = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64), add_pooling_layer=False).eval()
    reference.save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp_path / "bert")
    encoder = ENCODERS.build(dict(type="bert", pretrained=str(tmp_path / "bert"), pooling="mean")).eval()
    tokens = encoder.tokenize(["no pleural effusion", "large right pneumothorax"])
    with torch.no_grad():
        expected = reference(**tokens).last_hidden_state
        out = encoder(**tokens)
    assert torch.allclose(out.tokens, expected, atol=1e-6)
    assert encoder.out_dim == 32
