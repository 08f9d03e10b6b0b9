"""Fine-tuning modes (issue 19, part 2): what each mode trains (LoRA: adapters and head only, base weights
bitwise unchanged), LoRA merged into plain weights gives the adapted model's outputs, layer-wise learning-rate
decay and the encoder multiplier give the expected per-layer rates, DropPath on the 3D ViT, ``model.init_from``
from a work dir and a zoo entry, exact resume in the LoRA mode, and config refusals (exit 2)."""

from __future__ import annotations

import copy

import pytest
import torch

from mmvl.data.tokenizer import train_wordpiece_tokenizer
from mmvl.engine.checkpoint import load_checkpoint
from mmvl.engine.optim import build_optimizer
from mmvl.engine.trainer import Trainer
from mmvl.errors import ConfigError
from mmvl.models import build_model
from mmvl.models.finetune import encoder_layer_id, lora_layers, merge_lora, merged_model_config
from tests.conftest import REPO, load_tool, tiny_clip_config
from tests.engine.test_crash_safety import TINIER, assert_same_training_state
from tests.finetune.conftest import blob_config, finetune_config

VIT2D = dict(type="vit2d", model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
             num_heads=2)
VIT3D = dict(type="vit3d", img_size=16, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)
SWIN3D = dict(type="swin3d", embed_dim=12, depths=(1, 1, 2, 1), num_heads=(3, 3, 3, 3), window_size=2)
HEAD = dict(type="multilabel_cls", name="cls", label_names=["a", "b"])


def classifier(encoder: dict, mode: str = "full", **kwargs):
    return build_model(dict(image_encoder=encoder, heads=[HEAD], mode=mode, **kwargs))


def trained_state(cfg, work):
    trainer = Trainer(cfg, work)
    before = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    trainer.fit()
    return trainer, before, trainer.model.state_dict()


def changed(before: dict, after: dict) -> set[str]:
    return {key for key in before if not torch.equal(before[key], after[key])}


@pytest.mark.parametrize("mode", ["lora", "lora+head", "linear"])
def test_mode_trains_only_its_parameters(synthetic_cxr, tmp_path, one_thread, mode):
    cfg = finetune_config("cls_vit_cxr_tiny", synthetic_cxr, f"model.mode={mode}", "train.max_steps=3",
                          "train.val_interval=1000", "train.ckpt_interval=1000", "optim.weight_decay=0.1")
    if mode == "linear":
        cfg.model["lora"] = None
    trainer, before, after = trained_state(cfg, tmp_path / "run")
    moved = changed(before, after)
    encoder = {key for key in before if key.startswith("image_encoder.")}
    adapters = {key for key in encoder if "lora_" in key}
    lora_b = {key for key in adapters if "lora_B" in key}
    if mode == "linear":
        assert not adapters and not moved & encoder
        assert not trainer.model.image_encoder.training  # frozen features come from the eval-mode encoder
    else:
        assert lora_b and lora_b <= moved  # every adapter learned (B starts at zero)
        assert moved & encoder <= adapters, sorted(moved & encoder - adapters)[:5]  # base weights bitwise equal
        assert any(".base_layer." in key for key in encoder)
    head_moved = {key.split(".")[2] for key in moved if key.startswith("heads.")}
    assert head_moved == ({"classifier"} if mode == "lora" else {"classifier", "norm"})
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert all(name.startswith("heads.") or "lora_" in name for name in trainable)


def test_lora_3d_trains_only_adapters_and_head(blob_ct, tmp_path, one_thread):
    cfg = blob_config(blob_ct, "train.max_steps=3", "train.val_interval=1000", "train.ckpt_interval=1000")
    trainer, before, after = trained_state(cfg, tmp_path / "run")
    moved = changed(before, after)
    encoder = {key for key in before if key.startswith("image_encoder.")}
    adapters = {key for key in encoder if "lora_" in key}
    assert {key for key in adapters if "lora_B" in key} <= moved
    assert moved & encoder <= adapters  # the MONAI ViT's base weights bitwise unchanged
    assert {key.split(".")[2] for key in moved if key.startswith("heads.")} == {"classifier"}


def test_clip_model_in_linear_and_lora_modes_freezes_both_towers(tmp_path):
    tokenizer = tmp_path / "tokenizer"  # a clean clone has no model_zoo/cxr_clip_tiny: a tokenizer of the test's own
    train_wordpiece_tokenizer(["no pleural effusion.", "the heart is enlarged."] * 4, tokenizer, vocab_size=60,
                              min_frequency=1)
    text = dict(type="bert", tokenizer=str(tokenizer),
                config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    for mode in ("linear", "lora"):
        model = build_model(dict(image_encoder=VIT2D, text_encoder=text, heads=[dict(type="clip", embed_dim=16)],
                                 mode=mode))
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert not any(name.startswith("text_encoder.") for name in trainable)
        assert all(name.startswith("heads.") or "lora_" in name for name in trainable)
        model.train()
        assert model.text_encoder.training == (mode != "linear")


@pytest.mark.parametrize("encoder,shape", [(VIT2D, (3, 1, 32, 32)), (VIT3D, (3, 1, 16, 16, 16)),
                                           (SWIN3D, (3, 1, 32, 32, 32))])
def test_merged_lora_gives_the_adapted_outputs(encoder, shape):
    torch.manual_seed(0)
    model = classifier(encoder, "lora", lora=dict(rank=4, alpha=8)).eval()
    wrapped = [name for name, _ in lora_layers(model.image_encoder)]
    assert wrapped and all(name.rsplit(".", 1)[-1] in ("qkv", "proj", "out_proj", "fc1", "fc2", "linear1", "linear2")
                           for name in wrapped)
    with torch.no_grad():  # as after training: adapters and classifier away from their zero initialisation
        for name, param in model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.normal_(0, 0.5)
    images = torch.randn(*shape)
    with torch.no_grad():
        adapted = model.image_encoder(images).pooled
        merged_model = merge_lora(copy.deepcopy(model))
        merged = merged_model.image_encoder(images).pooled
        config = merged_model_config(dict(image_encoder=encoder, heads=[HEAD], mode="lora", lora=dict(rank=4),
                                          init_from="somewhere"))
        assert config["mode"] == "full" and "lora" not in config and "init_from" not in config
        plain = build_model(config).eval()
        plain.load_state_dict(merged_model.state_dict())  # the merged weights carry plain names: exportable
        again = plain.image_encoder(images).pooled
    assert not any("lora_" in key or "base_layer" in key for key in merged_model.state_dict())
    assert not torch.equal(adapted, classifier(encoder, "full").eval().image_encoder(images).pooled)
    # float32: x (W + s B A) against x W + s (x A) B differ by reassociation only, ~1e-7 relative per layer
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, merged)


def test_layer_decay_gives_the_expected_per_layer_rates():
    model = classifier(VIT2D)
    optimizer = build_optimizer(model, dict(lr=1.0, layer_decay=0.5, encoder_lr_mult=0.1, weight_decay=0.05))
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected_layers = {"model.cls_token": 0, "model.pos_embed": 0, "model.patch_embed.proj.weight": 0,
                       "model.blocks.0.attn.qkv.weight": 1, "model.blocks.1.mlp.fc2.bias": 2, "model.norm.weight": 3}
    names = dict(model.image_encoder.named_parameters())
    for name, layer in expected_layers.items():
        assert encoder_layer_id(model.image_encoder, name) == layer
        assert rate[id(names[name])] == pytest.approx(0.1 * 0.5 ** (3 - layer)), name
    assert all(rate[id(p)] == 1.0 for p in model.heads.parameters())  # the new head at the full rate
    decays = {group["name"]: group["weight_decay"] for group in optimizer.param_groups}
    assert decays["decay/layer1"] == 0.05 and decays["gains_biases/layer1"] == 0.0
    # 3D ViT and Swin: embeddings 0, blocks 1..depth in order (Swin's downsampling with the stage it closes)
    vit3d = classifier(VIT3D).image_encoder
    assert [encoder_layer_id(vit3d, n) for n in ("vit.patch_embedding.position_embeddings",
                                                  "vit.blocks.1.attn.qkv.weight", "vit.norm.weight")] == [0, 2, 3]
    swin = classifier(SWIN3D).image_encoder
    assert [encoder_layer_id(swin, n) for n in ("swin.patch_embed.proj.weight", "swin.layers1.0.blocks.0.norm1.weight",
                                                "swin.layers3.0.blocks.1.mlp.linear1.weight",
                                                "swin.layers3.0.downsample.reduction.weight",
                                                "swin.layers4.0.blocks.0.attn.qkv.weight")] == [0, 1, 4, 4, 5]
    # the defaults keep the optimizer's plain groups
    assert [g["name"] for g in build_optimizer(model, dict(lr=1.0)).param_groups] == ["decay", "gains_biases"]


def test_drop_path_on_the_3d_vit_keeps_monai_names():
    torch.manual_seed(0)
    plain = classifier(VIT3D).image_encoder
    dropped = classifier({**VIT3D, "drop_path_rate": 0.5}).image_encoder
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    images = torch.randn(4, 1, 16, 16, 16)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(images).pooled, dropped(images).pooled)  # eval: no drop
    dropped.train()
    torch.manual_seed(1)
    first = dropped(images).pooled
    assert not torch.equal(first, dropped(images).pooled)
    with pytest.raises(ConfigError, match="drop_path_rate"):
        classifier({**VIT3D, "drop_path_rate": 1.5})


def test_init_from_work_dir_and_zoo_entry(synthetic_cxr, tmp_path, one_thread, monkeypatch):
    from mmvl.loading import load_pretrained

    source_cfg = tiny_clip_config(synthetic_cxr, *TINIER, "train.max_steps=1", "train.val_interval=1000",
                                  "optim.warmup_steps=0")
    Trainer(source_cfg, tmp_path / "clip").fit()
    source = load_pretrained(tmp_path / "clip").model.image_encoder.state_dict()
    cfg = finetune_config("cls_vit_cxr_tiny", synthetic_cxr, f"model.init_from={tmp_path / 'clip'}",
                          "model.image_encoder.depth=1", "train.max_steps=1", "train.val_interval=1000")
    trainer = Trainer(cfg, tmp_path / "lora")
    encoder = trainer.model.image_encoder.state_dict()
    for key, value in source.items():  # the LoRA-wrapped layers hold the source's weights as their base
        match = [k for k in encoder if k.replace(".base_layer.", ".") == key]
        assert len(match) == 1 and torch.equal(encoder[match[0]], value), key

    # a zoo entry by name: the same run exported to a zoo folder of the test's own ($MMVL_ZOO), found by its name
    from mmvl.loading import load

    assert load_tool("export").main([str(tmp_path / "clip"), "--name", "ft_source", "--out",
                                     str(tmp_path / "zoo_dir" / "ft_source"), "--formats", "mmvl"]) == 0
    monkeypatch.setenv("MMVL_ZOO", str(tmp_path / "zoo_dir"))
    zoo_cfg = finetune_config("cls_vit_cxr_tiny", synthetic_cxr, "model.init_from=ft_source",
                              "model.image_encoder.depth=1", "model.mode=full", "model.lora=None",
                              "train.max_steps=1", "train.val_interval=1000")
    trainer = Trainer(zoo_cfg, tmp_path / "zoo")
    entry = load("ft_source").model.image_encoder.state_dict()
    assert entry and all(torch.equal(trainer.model.image_encoder.state_dict()[key], value)
                         for key, value in entry.items())

    wrong = finetune_config("cls_vit_cxr_tiny", synthetic_cxr, f"model.init_from={tmp_path / 'clip'}",
                            "model.image_encoder.depth=2")
    with pytest.raises(ConfigError, match="model.init_from"):
        Trainer(wrong, tmp_path / "wrong")


@pytest.mark.parametrize("mode", ["lora", "lora+head", "linear", "full"])
def test_resume_is_exact_in_every_mode(synthetic_cxr, tmp_path, one_thread, mode):
    options = [f"model.mode={mode}", "train.max_steps=4", "train.ckpt_interval=2", "train.val_interval=1000",
               "optim.layer_decay=0.7", "optim.encoder_lr_mult=0.5", "optim.warmup_steps=1",
               "model.heads.0.dropout=0.1"]  # dropout: the RNG streams must resume too
    options += ["model.lora.dropout=0.1"] if mode.startswith("lora") else ["model.lora=None"]
    straight = Trainer(finetune_config("cls_vit_cxr_tiny", synthetic_cxr, *options), tmp_path / "straight")
    straight.fit()
    Trainer(finetune_config("cls_vit_cxr_tiny", synthetic_cxr, *options, "train.max_steps=2"),
            tmp_path / "resumed").fit()
    torch.manual_seed(99)
    resumed = Trainer(finetune_config("cls_vit_cxr_tiny", synthetic_cxr, *options, "train.max_steps=2"),
                      tmp_path / "resumed", resume=True, resume_override=["train.max_steps=4"])
    assert resumed.step == 2
    resumed.fit()
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert_same_training_state(a, b)
    groups_a, groups_b = a["optimizer"]["param_groups"], b["optimizer"]["param_groups"]
    assert [(g["name"], g["lr"], g["lr_scale"]) for g in groups_a] == [(g["name"], g["lr"], g["lr_scale"])
                                                                      for g in groups_b]
    if mode != "linear":  # the layer-decayed encoder groups survived the resume
        assert len({g["lr_scale"] for g in groups_a}) > 2


@pytest.mark.parametrize("option,message", [
    ("model.mode=lorra", "Did you mean 'lora'"),
    ("model.lora.rnak=4", "Did you mean 'rank'"),
    ("data.label_fracton=0.1", "Did you mean 'label_fraction'"),
    ("optim.layer_decy=0.5", "Did you mean 'layer_decay'"),
    ("model.init_frm=x", "Did you mean 'init_from'"),
])
def test_unknown_mode_and_misspelt_keys_exit_2(tmp_path, capsys, option, message):
    train = load_tool("train")
    code = train.main([str(REPO / "configs" / "finetune" / "cls_vit_cxr_tiny.py"), "--work-dir",
                       str(tmp_path / "run"), "--cfg-options", option])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
