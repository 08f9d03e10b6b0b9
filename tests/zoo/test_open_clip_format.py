"""open_clip interop: an mmvl model exported for open_clip (any timm ViT as open_clip's own VisionTransformer),
moved elsewhere and loaded by open_clip alone; what open_clip's ViT cannot express refused with the reason; an
open_clip checkpoint on disk (timm vision tower + transformers text tower with an MLP head, as BiomedCLIP)
imported into mmvl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmvl import zoo
from mmvl.zoo.export import NotExportable
from tests.conftest import REPO
from tests.zoo.conftest import REPORTS, export_entry, write_work_dir

TEXTS = ["small left pleural effusion", "no pneumothorax", "cardiomegaly"]
MEAN_RGB, STD_RGB = [0.48, 0.45, 0.40], [0.26, 0.27, 0.28]
# What a user runs, with only open_clip: in the moved folder, offline; mmvl must not even be imported.
OPEN_CLIP_ONLY = """
import json, os, sys
import torch, open_clip
from safetensors.torch import load_file, save_file
for job in json.loads(sys.argv[1]):  # one interpreter for every export: open_clip + torch import once
    os.chdir(job["dir"])
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:.")
    tokenizer = open_clip.get_tokenizer("local-dir:.")
    model.eval()
    images = load_file(job["images"])["images"]
    with torch.no_grad():
        image = model.encode_image(images.expand(-1, 3, -1, -1), normalize=True)
        text = model.encode_text(tokenizer(json.loads(sys.argv[2])), normalize=True)
    save_file({"image": image, "text": text, "scale": model.logit_scale.exp().reshape(1)}, job["out"])
assert not [m for m in sys.modules if m.split(".")[0] == "mmvl"], "open_clip imported mmvl"
"""


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def _pipeline(size: int) -> list[dict]:
    return [{"type": "LoadImage", "frame": 0, "voi": "auto"}, {"type": "ResizePad", "size": size},
            {"type": "Normalize", "mean": 0.5, "std": 0.25}]


def _demo_model() -> tuple[dict, dict]:
    """The image and text encoders of configs/demo/cxr_clip_tiny.py (what `make demo` trains)."""
    from mmvl.config import Config

    model = json.loads(json.dumps(Config.fromfile(REPO / "configs" / "demo" / "cxr_clip_tiny.py")["model"]))
    text = {key: value for key, value in model["text_encoder"].items() if key != "tokenizer"}
    return dict(model["image_encoder"]), text


VITS = {
    # resized: 64 px, 16 px patches, 2 blocks, [CLS] pooling with the final norm before it
    "resized": {"type": "vit2d", "model_name": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16,
                "embed_dim": 48, "depth": 2, "num_heads": 3},
    # CLIP-style pre-norm (no patch bias), no qkv bias, layer scale, class token without a position embedding,
    # [CLS] pooling with the norm after it, MLP ratio 2.5, tanh GELU
    "variant": {"type": "vit2d", "model_name": "vit_tiny_patch16_224", "img_size": 48, "patch_size": 12,
                "embed_dim": 32, "depth": 2, "num_heads": 2, "pre_norm": True, "qkv_bias": False,
                "init_values": 0.5, "no_embed_class": True, "global_pool": "token", "fc_norm": True,
                "mlp_ratio": 2.5, "act_layer": "gelu_tanh"},
}


def _work_dir(root: Path, vit: str) -> Path:
    if vit == "demo":
        image, text = _demo_model()
        text["tokenizer"] = str(root / "tokenizer")  # write_work_dir trains it there
    else:
        image, text = VITS[vit], None
    heads = [{"type": "clip", "embed_dim": 128 if vit == "demo" else 24}]
    return write_work_dir(root, image, _pipeline(image["img_size"]), heads=heads, text_encoder=text, perturb=0.05)


MOVED = ("demo", "resized", "variant")


@pytest.fixture(scope="module")
def moved_exports(tmp_path_factory) -> dict:
    """Each of MOVED exported with ``--formats mmvl,open_clip``, its open_clip folder moved away and the rest of the
    entry deleted, then all loaded by open_clip alone in one fresh interpreter (cwd: each folder):
    ``{vit: (work dir, open_clip_config.json text, image config, images, open_clip's outputs)}``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture (function-scoped, so not usable here)
    try:
        root = tmp_path_factory.mktemp("moved_exports")
        built, jobs = {}, []
        for vit in MOVED:
            work = _work_dir(root / vit / "run", vit)
            entry = export_entry(work, root / vit / "zoo", "oc", formats="mmvl,open_clip")
            config_text = (entry / "open_clip" / "open_clip_config.json").read_text()
            moved = root / vit / "elsewhere" / "my_model"
            moved.parent.mkdir()
            shutil.move(entry / "open_clip", moved)
            shutil.rmtree(entry)  # nothing of the entry is left to point at
            image_cfg = _demo_model()[0] if vit == "demo" else VITS[vit]
            gray = torch.randn(3, 1, image_cfg["img_size"], image_cfg["img_size"],
                               generator=torch.Generator().manual_seed(6))
            save_file({"images": gray}, str(root / vit / "images.safetensors"))
            jobs.append({"dir": str(moved), "images": str(root / vit / "images.safetensors"),
                         "out": str(root / vit / "out.safetensors")})
            built[vit] = (work, config_text, image_cfg, gray)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", OPEN_CLIP_ONLY, json.dumps(jobs), json.dumps(TEXTS)],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return {vit: (*built[vit], load_file(job["out"]), root / vit) for vit, job in zip(MOVED, jobs, strict=True)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("vit", MOVED)
def test_open_clip_loads_a_moved_export_without_mmvl(vit, moved_exports, one_thread):
    work, config_text, image_cfg, gray, got, root = moved_exports[vit]
    config = json.loads(config_text)
    vision = config["model_cfg"]["vision_cfg"]
    assert "timm_model_name" not in vision and config["model_cfg"]["text_cfg"]["hf_model_name"] == "./text_model"
    assert (vision["image_size"], vision["patch_size"], vision["layers"]) == (
        image_cfg["img_size"], image_cfg["patch_size"], image_cfg["depth"])
    assert str(root) not in config_text
    trained = zoo.load_pretrained(work)  # the work dir's own model, not the export
    assert _cosine(trained.encode_image(gray), got["image"]) >= 0.9999
    assert _cosine(trained.encode_text(TEXTS), got["text"]) >= 0.9999
    assert float(got["scale"][0]) == pytest.approx(float(torch.tensor(2.5).exp()), rel=1e-6)


@pytest.mark.parametrize(("change", "reason"), [
    ({"class_token": False, "global_pool": "avg"}, "no class token"),
    ({"reg_tokens": 1}, "1 register token"),
    ({"global_pool": "max"}, "global_pool='max'"),
    ({"qk_norm": True}, "q_norm, k_norm"),
])
def test_open_clip_refuses_what_its_vit_cannot_express(change, reason, tmp_path):
    work = write_work_dir(tmp_path / "run", {**VITS["resized"], **change}, _pipeline(64))
    with pytest.raises(NotExportable, match=f"--formats open_clip: open_clip's VisionTransformer cannot express "
                                            f"this timm ViT exactly: .*{reason}"):
        export_entry(work, tmp_path / "zoo", "refused", formats="open_clip")
    assert [p.name for p in (tmp_path / "zoo").iterdir()] == []  # no half-written entry left behind


def test_skipped_open_clip_leaves_no_folder(tmp_path, one_thread):
    work = write_work_dir(tmp_path / "run", {**VITS["resized"], "reg_tokens": 1}, _pipeline(64))
    result = zoo.export(work, "skipped", out=tmp_path / "zoo" / "skipped", formats="all")
    assert "open_clip" in result.skipped and "register token" in result.skipped["open_clip"]
    assert not (result.path / "open_clip").exists()
    assert "| open_clip | not exported: open_clip's VisionTransformer cannot express" in (
        result.path / "README.md").read_text()


def test_other_timm_towers_go_by_name_at_their_defaults(tmp_path, monkeypatch, one_thread):
    """A timm tower that is not a ViT (here ConvNeXt) is open_clip's timm tower, built from the name alone."""
    import open_clip

    tower = {"type": "vit2d", "model_name": "test_convnext", "img_size": None}
    work = write_work_dir(tmp_path / "run", tower, _pipeline(64), perturb=0.05)
    entry = export_entry(work, tmp_path / "zoo", "convnext", formats="mmvl,open_clip")
    config = json.loads((entry / "open_clip" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "test_convnext"
    monkeypatch.chdir(entry / "open_clip")
    model = open_clip.create_model("local-dir:.").eval()
    gray = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.encode_image(gray.expand(-1, 3, -1, -1), normalize=True)
    assert _cosine(zoo.load_pretrained(work).encode_image(gray), got) >= 0.9999

    work = write_work_dir(tmp_path / "resized", {**tower, "drop_path_rate": 0.1}, _pipeline(64))
    with pytest.raises(NotExportable, match="from the model name alone; this image encoder also sets drop_path_rate"):
        export_entry(work, tmp_path / "zoo", "resized", formats="open_clip")


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


def test_import_open_clip_checkpoint(tmp_path, monkeypatch, one_thread):
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
    monkeypatch.chdir(entry / "open_clip")  # open_clip reads the text model's config (./text_model) from there
    again = open_clip.create_model("local-dir:.").eval()  # and back to open_clip, which now normalises every
    with torch.no_grad():  # channel with the one mean/std: the gray input copied to RGB
        assert _cosine(expected_image, again.encode_image(images.expand(-1, 3, -1, -1), normalize=True)) >= 0.9999
        assert _cosine(expected_text, again.encode_text(tokenizer(TEXTS), normalize=True)) >= 0.9999
