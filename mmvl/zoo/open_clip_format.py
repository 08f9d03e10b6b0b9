"""open_clip interop: export an mmvl CLIP model as an open_clip folder (``open_clip_config.json`` +
``open_clip_model.safetensors`` + the text model's config and tokenizer, loadable with
``open_clip.create_model_and_transforms("local-dir:...")``), and import an open_clip checkpoint (a timm vision
tower + a transformers text tower, such as a BiomedCLIP download) as an mmvl model.

A timm ViT of any size is written as open_clip's own ``VisionTransformer`` (width, depth, heads, patch and image
size, MLP ratio, pre-norm, class-token or mean pooling, final norm before or after pooling, layer scale, LayerNorm
epsilon); what that class has no setting for is refused with the reason, never approximated. Other timm towers
(Swin...) go as open_clip's timm tower, which open_clip builds from the model name alone: only at that name's
defaults. open_clip takes three input channels, mmvl's radiograph encoders one: on export the stem's filters are
split over the three channels (each a third), with the pipeline's mean/std on every channel, so a gray image
copied to RGB gives the same features; on import open_clip's per-channel normalisation is folded into a
one-channel stem (weights ``sum_c W_c s/s_c``, bias ``b + sum_c (m - m_c)/s_c sum W_c``), exact for gray images.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmvl.data.transforms import Pipeline
from mmvl.errors import CheckpointError, ConfigError
from mmvl.loading import LoadedModel
from mmvl.models import build_model
from mmvl.models.encoders import HFTextEncoder, ProjectedHFTextEncoder, TimmImageEncoder
from mmvl.zoo._context import PROBE_TEXTS, ExportContext, NotExportable, bert_config_fields, compare

FOLDER = "open_clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "model.pth")
# The text model's config.json, in a subfolder named with "./": from a working directory without that folder
# transformers refuses the name ("./" is never a hub repo id) instead of reading some other config.json there.
TEXT_MODEL_FOLDER = "text_model"
TEXT_MODEL_NAME = f"./{TEXT_MODEL_FOLDER}"
TOKENIZER_NAME = "."  # the tokenizer files: open_clip's get_tokenizer("local-dir:...") reads them from the folder
POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
TIMM_ENCODER_ARGS = {"type", "model_name", "in_chans", "img_size", "pretrained", "pretrained_path",
                     "grad_checkpointing", "token_drop", "attention"}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default preprocess_cfg (OpenAI CLIP)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _stem_name(timm_model: nn.Module) -> str:
    """The first convolution's parameter prefix (timm records it in the pretrained config, e.g. patch_embed.proj)."""
    first_conv = (getattr(timm_model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first_conv, (list, tuple)):
        first_conv = first_conv[0]
    if not first_conv:
        raise NotExportable(f"{type(timm_model).__name__}: timm names no first_conv, so the input stem is unknown")
    return first_conv


def _normalisation(pipeline: list[Mapping[str, Any]]) -> tuple[float, float]:
    """Mean and std of the pipeline's last ``Normalize`` (on [0, 1] intensities)."""
    mean, std = 0.0, 1.0
    for step in pipeline:
        if step.get("type") == "Normalize":
            mean, std = float(step.get("mean", 0.5)), float(step.get("std", 0.5))
    return mean, std


# -- export --------------------------------------------------------------------------------------------------
def _refuse_vit(why: str) -> NotExportable:
    return NotExportable(f"open_clip's VisionTransformer cannot express this timm ViT exactly: {why}")


def _layer_norm_eps(norms: Mapping[str, nn.Module]) -> float:
    """The one epsilon of ``norms``: open_clip gives every LayerNorm of its ViT the same ``norm_kwargs``."""
    eps = set()
    for where, norm in norms.items():
        if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
            raise _refuse_vit(f"{where} is a {type(norm).__name__} without weight and bias (open_clip: LayerNorm)")
        eps.add(float(norm.eps))
    if len(eps) != 1:
        raise _refuse_vit(f"its LayerNorms use different epsilons {sorted(eps)}")
    return eps.pop()


def _gelu_approximation(act: nn.Module) -> str | None:
    """``approximate`` of a GELU module (torch's, or timm's GELU/GELUTanh), None for another activation."""
    from timm.layers.activations import GELU, GELUTanh

    if type(act) is nn.GELU:
        return act.approximate
    return {GELU: "none", GELUTanh: "tanh"}.get(type(act))


def is_timm_vit(trunk: nn.Module) -> bool:
    """A timm ``VisionTransformer`` itself (not a subclass with extra tokens, such as DeiT's distilled ViT)."""
    from timm.models.vision_transformer import VisionTransformer

    return type(trunk) is VisionTransformer


def vit_vision_cfg(trunk: nn.Module) -> dict[str, Any]:
    """open_clip ``vision_cfg`` of its own ``VisionTransformer`` computing what mmvl computes with the timm ViT
    ``trunk`` (patch and position embedding, pre-norm, pre-LN blocks, class-token or mean pooling, final norm
    before or after pooling) at the entry's input size (a ``dynamic_img_size`` ViT uses its position embedding
    unchanged at that size); NotExportable naming what open_clip's ViT has no setting for."""
    from timm.layers import Attention, LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block

    if trunk.cls_token is None:
        raise _refuse_vit("it has no class token (open_clip's ViT always has one, and it takes part in attention)")
    if trunk.reg_token is not None:
        raise _refuse_vit(f"it has {trunk.num_reg_tokens} register token(s)")
    embed = trunk.patch_embed
    proj = getattr(embed, "proj", None)
    if (type(embed) is not PatchEmbed or not isinstance(getattr(embed, "norm", None), nn.Identity)
            or embed.dynamic_img_pad or not isinstance(proj, nn.Conv2d)
            or tuple(proj.kernel_size) != tuple(proj.stride) or tuple(proj.padding) != (0, 0)
            or tuple(proj.dilation) != (1, 1) or proj.groups != 1):
        raise _refuse_vit("its patch embedding is not a plain strided convolution (no norm, no padding)")
    pool = trunk.global_pool
    if trunk.attn_pool is not None or pool not in ("token", "avg") or (pool == "avg" and trunk.pool_include_prefix):
        raise _refuse_vit(f"global_pool={pool!r} (open_clip pools the class token, 'token', or the mean of the "
                          "patch tokens, 'avg')")
    norm_after_pool = not isinstance(trunk.fc_norm, nn.Identity)
    final_norm = trunk.fc_norm if norm_after_pool else trunk.norm
    if isinstance(final_norm, nn.Identity):
        raise _refuse_vit("it has no final norm (final_norm=False; open_clip's ViT always has ln_post)")
    norms = {"norm_pre": trunk.norm_pre} if not isinstance(trunk.norm_pre, nn.Identity) else {}
    norms["fc_norm" if norm_after_pool else "norm"] = final_norm
    dim = int(trunk.embed_dim)
    shapes = set()
    for i, block in enumerate(trunk.blocks):
        where = f"blocks.{i}"
        attn, mlp = block.attn, block.mlp
        if type(block) is not Block or not isinstance(attn, Attention) or type(mlp) is not Mlp:
            raise _refuse_vit(f"{where} is a {type(block).__name__} with {type(attn).__name__} and "
                              f"{type(mlp).__name__} (open_clip: timm's Block, Attention and Mlp)")
        extras = [name for name, module in (("q_norm", attn.q_norm), ("k_norm", attn.k_norm), ("attn.norm", attn.norm),
                                            ("mlp.norm", mlp.norm)) if not isinstance(module, nn.Identity)]
        if getattr(attn, "gate", None) is not None:
            extras.append("attn.gate")
        if extras:
            raise _refuse_vit(f"{where} has {', '.join(extras)} (qk_norm, scale_attn_norm, scale_mlp_norm, gated)")
        approximate = _gelu_approximation(mlp.act)
        if approximate is None:
            raise _refuse_vit(f"{where}.mlp uses {type(mlp.act).__name__} (open_clip's ViT: GELU, exact or tanh)")
        scales = (isinstance(block.ls1, LayerScale), isinstance(block.ls2, LayerScale))
        if scales[0] != scales[1] or not all(isinstance(m, (LayerScale, nn.Identity)) for m in (block.ls1, block.ls2)):
            raise _refuse_vit(f"{where} has layer scale on one branch only")
        if attn.attn_dim != dim:
            raise _refuse_vit(f"{where} attends in {attn.attn_dim} dimensions, not the width {dim}")
        shapes.add((attn.num_heads, mlp.fc1.out_features, scales[0], approximate))
        norms[f"{where}.norm1"], norms[f"{where}.norm2"] = block.norm1, block.norm2
    if len(shapes) != 1:
        raise _refuse_vit("its blocks differ in heads, MLP width, layer scale or GELU (open_clip: one of each)")
    eps = _layer_norm_eps(norms)
    heads, hidden, layer_scale, approximate = shapes.pop()
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # open_clip sizes the MLP as int(width * mlp_ratio)
        raise _refuse_vit(f"an MLP width of {hidden} is not int({dim} * mlp_ratio) for any float mlp_ratio")
    size, patch = tuple(embed.img_size), tuple(embed.patch_size)
    cfg: dict[str, Any] = {
        "image_size": size[0] if size[0] == size[1] else list(size),
        "patch_size": patch[0] if patch[0] == patch[1] else list(patch),
        "width": dim, "layers": len(trunk.blocks), "head_width": dim // heads, "mlp_ratio": mlp_ratio,
        "no_ln_pre": isinstance(trunk.norm_pre, nn.Identity), "pool_type": {"token": "tok", "avg": "avg"}[pool],
        "final_ln_after_pool": norm_after_pool, "norm_kwargs": {"eps": eps}}
    if layer_scale:
        cfg["ls_init_value"] = 1.0  # builds the LayerScale modules; the trained gammas are in the weights
    if approximate != "none":
        cfg["act_kwargs"] = {"approximate": approximate}
    return cfg


def vit_state(trunk: nn.Module, in_chans: int) -> dict[str, torch.Tensor]:
    """The timm ViT's weights under open_clip ``VisionTransformer`` names (``visual.`` prefix, no projection).

    open_clip's patch convolution has no bias: the bias, added to every patch token, goes into the patch tokens'
    position embeddings. A position embedding timm does not give the class token (``no_embed_class``), or none at
    all (``pos_embed=''``), is zero there. Missing qkv/projection/MLP biases are zeros. Every timm weight must be
    used: one left over is refused."""
    own = trunk.state_dict()
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return own[key]

    def linear(key: str, module: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        bias = take(f"{key}.bias") if module.bias is not None else torch.zeros(module.out_features)
        return take(f"{key}.weight"), bias

    dim = int(trunk.embed_dim)
    stem = take("patch_embed.proj.weight")
    if in_chans == 1:
        stem = stem.repeat(1, 3, 1, 1) / 3
    elif in_chans != 3:
        raise _refuse_vit(f"in_chans={in_chans} (open_clip's ViT takes RGB; mmvl exports 1 or 3 channels)")
    n_patches = int(trunk.patch_embed.num_patches)
    if trunk.pos_embed is None:
        pos = torch.zeros(n_patches + 1, dim)
    else:
        pos = take("pos_embed")[0]
        if trunk.no_embed_class:
            pos = torch.cat([pos.new_zeros(1, dim), pos])
    if trunk.patch_embed.proj.bias is not None:
        pos = torch.cat([pos[:1], pos[1:] + take("patch_embed.proj.bias")])
    state = {"conv1.weight": stem, "class_embedding": take("cls_token").reshape(dim), "positional_embedding": pos}
    if not isinstance(trunk.norm_pre, nn.Identity):
        state.update({f"ln_pre.{p}": take(f"norm_pre.{p}") for p in ("weight", "bias")})
    for i, block in enumerate(trunk.blocks):
        src, dst = f"blocks.{i}", f"transformer.resblocks.{i}"
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            state.update({f"{dst}.{b}.{p}": take(f"{src}.{a}.{p}") for p in ("weight", "bias")})
        (state[f"{dst}.attn.in_proj_weight"], state[f"{dst}.attn.in_proj_bias"]) = linear(f"{src}.attn.qkv",
                                                                                          block.attn.qkv)
        (state[f"{dst}.attn.out_proj.weight"], state[f"{dst}.attn.out_proj.bias"]) = linear(f"{src}.attn.proj",
                                                                                            block.attn.proj)
        for a, b in (("fc1", "c_fc"), ("fc2", "c_proj")):
            (state[f"{dst}.mlp.{b}.weight"], state[f"{dst}.mlp.{b}.bias"]) = linear(f"{src}.mlp.{a}",
                                                                                  getattr(block.mlp, a))
        for a, b in (("ls1", "ls_1"), ("ls2", "ls_2")):
            if f"{src}.{a}.gamma" in own:
                state[f"{dst}.{b}.gamma"] = take(f"{src}.{a}.gamma")
    final = "fc_norm" if not isinstance(trunk.fc_norm, nn.Identity) else "norm"
    state.update({f"ln_post.{p}": take(f"{final}.{p}") for p in ("weight", "bias")})
    left = sorted(set(own) - used)
    if left:
        raise _refuse_vit(f"open_clip's ViT has no place for {', '.join(left[:5])}")
    return {f"visual.{key}": value for key, value in state.items()}


def _timm_vision_cfg(context: ExportContext) -> dict[str, Any]:
    """``vision_cfg`` of open_clip's timm tower for a timm model that is not a plain ViT (Swin, ConvNeXt...):
    open_clip builds it from the timm model name alone, so only a model at that name's defaults exports."""
    image_cfg = context.loaded.config["model"]["image_encoder"]
    extra = sorted(set(image_cfg) - TIMM_ENCODER_ARGS - {"global_pool", "fc_norm"})  # pooling: checked on load
    if extra:
        raise NotExportable(f"open_clip builds timm towers other than ViTs from the model name alone; this image "
                            f"encoder also sets {', '.join(extra)} ({image_cfg.get('model_name')} with its defaults "
                            "would be another network)")
    size = context.input["spatial_size"]
    return {"timm_model_name": image_cfg["model_name"], "timm_model_pretrained": False,
            "timm_pool": image_cfg.get("global_pool", ""), "timm_proj": "linear", "timm_proj_bias": False,
            "image_size": size[0] if size[0] == size[1] else size}


def open_clip_state(model: nn.Module, in_chans: int) -> dict[str, torch.Tensor]:
    """mmvl weights under open_clip ``CustomTextCLIP`` names: its own ``VisionTransformer`` for a timm ViT (else
    a timm trunk), the HF transformer, and the projections."""
    head = model.contrastive_head
    image, text = model.image_encoder, model.text_encoder
    if is_timm_vit(image.model):
        state = vit_state(image.model, in_chans)
        state["visual.proj"] = head.image_proj.weight.T  # open_clip computes pooled @ proj
    else:
        stem = _stem_name(image.model) + ".weight"
        state = {}
        for key, value in image.model.state_dict().items():
            if key == stem and in_chans == 1:
                value = value.repeat(1, 3, *([1] * (value.ndim - 2))) / 3
            state[f"visual.trunk.{key}"] = value
        state["visual.head.proj.weight"] = head.image_proj.weight
    state.update({f"text.transformer.{k}": v for k, v in text.model.state_dict().items()})
    if isinstance(text, ProjectedHFTextEncoder):
        state.update({f"text.proj.{k}": v for k, v in text.proj.state_dict().items()})
    else:
        state["text.proj.weight"] = head.text_proj.weight
    state["logit_scale"] = head.logit_scale.detach().clamp(max=head.max_log_scale)
    if getattr(head, "logit_bias", None) is not None:
        state["logit_bias"] = head.logit_bias.detach()
    return {key: value.detach().contiguous().clone() for key, value in state.items()}


def open_clip_config(context: ExportContext) -> dict[str, Any]:
    """``open_clip_config.json``. Nothing in it names a path outside the folder: the text model is
    ``"./text_model"`` (its ``config.json``; the weights are in ``open_clip_model.safetensors``), the tokenizer
    ``"."``. open_clip 3.3 reads ``hf_model_name`` with ``transformers.AutoConfig`` as given, which resolves it
    against the working directory (not the ``local-dir:`` folder); the tokenizer it reads from the folder."""
    model = context.model
    head = model.contrastive_head
    trunk = model.image_encoder.model
    vision_cfg = vit_vision_cfg(trunk) if is_timm_vit(trunk) else _timm_vision_cfg(context)
    text = model.text_encoder
    mean, std = _normalisation(context.loaded.preprocess.spec)
    text_cfg: dict[str, Any] = {
        "hf_model_name": TEXT_MODEL_NAME, "hf_tokenizer_name": TOKENIZER_NAME, "hf_model_pretrained": False,
        "hf_pooler_type": POOLERS[text.pooling], "context_length": text.max_length}
    if isinstance(text, ProjectedHFTextEncoder):
        if not torch.equal(head.text_proj.weight, torch.eye(head.embed_dim)):
            raise NotExportable("the text tower has its own projection and the head projects again")
        text_cfg["hf_proj_type"] = text.proj_type
    else:
        text_cfg["hf_proj_type"] = "linear"
    model_cfg: dict[str, Any] = {"embed_dim": int(head.embed_dim), "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if getattr(head, "logit_bias", None) is not None:
        model_cfg["init_logit_bias"] = float(head.logit_bias)
    preprocess_cfg = {"size": vision_cfg["image_size"], "mode": "RGB", "mean": [mean] * 3, "std": [std] * 3,
                      "interpolation": "bilinear", "resize_mode": "longest", "fill_color": 0}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


# Run by a fresh Python in a moved copy of the folder: what a user does with open_clip alone (no mmvl), offline.
LOAD_SCRIPT = """
import json, sys
from pathlib import Path
import torch, open_clip
from safetensors.torch import load_file, save_file
io = Path(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
try:
    model, _, _ = open_clip.create_model_and_transforms("local-dir:.")
except RuntimeError as err:
    print(err, file=sys.stderr)
    sys.exit(3)
tokenizer = open_clip.get_tokenizer("local-dir:.")
model.eval()
images = load_file(str(io / "probe.safetensors"))["images"]
texts = json.loads((io / "texts.json").read_text())
with torch.no_grad():
    out = {"image": model.encode_image(images, normalize=True),
           "text": model.encode_text(tokenizer(texts), normalize=True),
           "logit_scale": model.logit_scale.exp().reshape(1)}
save_file({k: v.float().contiguous() for k, v in out.items()}, str(io / "embeddings.safetensors"))
(io / "modules.json").write_text(json.dumps({"mmvl_imported": any(m.split(".")[0] == "mmvl" for m in sys.modules)}))
"""


def load_moved_copy(folder: Path, images: torch.Tensor, texts: list[str], timeout: float = 600.0
                    ) -> tuple[dict[str, torch.Tensor], bool]:
    """open_clip's embeddings of ``images`` (RGB) and ``texts`` from a copy of ``folder`` in a new temporary
    directory, loaded with ``create_model_and_transforms``/``get_tokenizer("local-dir:.")`` by a fresh Python
    working in that copy with the Hugging Face hub offline; and whether that process imported mmvl."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix="mmvl-open_clip-") as tmp:
        moved, io = Path(tmp) / "moved_elsewhere", Path(tmp) / "io"
        shutil.copytree(folder, moved)
        io.mkdir()
        save_file({"images": images.float().contiguous()}, str(io / "probe.safetensors"))
        (io / "texts.json").write_text(json.dumps(list(texts)))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        try:
            done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(io), str(torch.get_num_threads())],
                                  cwd=moved, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise CheckpointError(f"open_clip did not load the exported folder within {timeout:.0f} s") from err
        if done.returncode == 3:
            raise NotExportable(f"open_clip builds a different network from this config ({done.stderr[-300:]})")
        if done.returncode != 0:
            raise CheckpointError(f"open_clip cannot load the exported folder from a moved copy (exit "
                                  f"{done.returncode}): {done.stderr[-800:]}")
        imported = json.loads((io / "modules.json").read_text())["mmvl_imported"]
        return load_file(str(io / "embeddings.safetensors")), imported


@torch.no_grad()
def export_open_clip(context: ExportContext) -> dict[str, Any]:
    """``open_clip/``: ``open_clip_config.json``, ``open_clip_model.safetensors`` and the text model's config and
    tokenizer. Checked as a user would load it: a copy moved to a new temporary directory, loaded by open_clip in
    a fresh process without mmvl, its image (gray copied to RGB) and text embeddings compared with mmvl's."""
    from safetensors.torch import save_file

    model = context.model
    if set(context.parts) != {"image", "text"} or getattr(model, "heads", None) is None:
        raise NotExportable("open_clip needs the image and the text tower with a contrastive head")
    if context.input.get("kind") != "2d":
        raise NotExportable("open_clip models take 2D images")
    if not isinstance(model.image_encoder, TimmImageEncoder):
        raise NotExportable(f"open_clip takes timm vision towers; this one is {type(model.image_encoder).__name__}")
    if not isinstance(model.text_encoder, HFTextEncoder):
        raise NotExportable("open_clip takes transformers text towers")
    from open_clip.hf_configs import arch_dict  # heavy (torchvision, hub clients): imported only when exporting

    if model.text_encoder.model.config.model_type not in arch_dict:
        raise NotExportable(f"open_clip's HF text tower does not know model_type "
                            f"'{model.text_encoder.model.config.model_type}' ({', '.join(arch_dict)})")
    try:
        head = model.contrastive_head
    except ConfigError as err:
        raise NotExportable(str(err)) from err
    if head.image_proj.bias is not None or head.text_proj.bias is not None:
        raise NotExportable("open_clip projections have no bias")
    config = open_clip_config(context)  # every refusal before anything is written
    state = open_clip_state(model, context.input["in_chans"])

    folder = context.out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    model.text_encoder.model.config.save_pretrained(str(folder / TEXT_MODEL_FOLDER))
    model.text_encoder.tokenizer.save_pretrained(str(folder))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(folder / WEIGHTS_FILE))

    images = context.probe_images
    rgb = images.expand(-1, 3, *images.shape[2:]) if images.shape[1] == 1 else images
    texts = context.probe_texts
    got, mmvl_imported = load_moved_copy(folder, rgb, texts)
    if mmvl_imported:
        raise CheckpointError("loading the open_clip folder imported mmvl: it would not load without mmvl")
    return {"image": compare(model.encode_image(images), got["image"], "open_clip image (moved copy)"),
            "text": compare(model.encode_text(texts), got["text"], "open_clip text (moved copy)"),
            "logit_scale": {"mmvl": float(head.scale()), "open_clip": float(got["logit_scale"][0])},
            "loaded": "a copy in a new folder, by open_clip in a fresh process without mmvl, hub offline"}


# -- import --------------------------------------------------------------------------------------------------
def _find_checkpoint(folder: Path) -> Path:
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"{folder}: no open_clip checkpoint ({', '.join(CHECKPOINT_NAMES)}); pass checkpoint=")


def _read_open_clip_config(model_config: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], Path | None]:
    path = Path(model_config)
    folder = path if path.is_dir() else None
    if folder is not None:
        path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable open_clip config: {err}") from err
    model_cfg = data.get("model_cfg", data)
    if not all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"{path}: an open_clip model config holds embed_dim, vision_cfg and text_cfg")
    return model_cfg, data.get("preprocess_cfg", {}), folder


def _inside(folder: Path | None, name: str | None) -> str | None:
    """A relative text model/tokenizer name that is a folder inside the open_clip folder (as mmvl
    writes it) resolved there, not against the working directory; a hub id or an absolute path as given."""
    if folder is not None and name and not os.path.isabs(name) and (folder / name).is_dir():
        return str(folder / name)
    return name


def _fold_stem(weight: torch.Tensor, bias: torch.Tensor | None, mean_rgb: list[float], std_rgb: list[float],
               mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 1-channel stem taking ``(g - mean) / std`` that equals the RGB stem on ``(g - mean_c) / std_c``."""
    scale = torch.tensor([std / s for s in std_rgb], dtype=torch.float64).view(1, 3, *([1] * (weight.ndim - 2)))
    shift = torch.tensor([(mean - m) / s for m, s in zip(mean_rgb, std_rgb)], dtype=torch.float64)
    folded = (weight.double() * scale).sum(dim=1, keepdim=True)
    offset = (weight.double().flatten(2).sum(-1) * shift).sum(dim=1)  # (out_channels,)
    if bias is None:
        if offset.abs().max() > 1e-6:
            raise ConfigError("the open_clip stem has no bias, so its per-channel normalisation cannot be folded; "
                              "its preprocess_cfg mean/std must be equal across channels")
        return folded.to(weight.dtype), None
    return folded.to(weight.dtype), (bias.double() + offset).to(bias.dtype)


def import_open_clip(model_config: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                     text_model: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                     ) -> LoadedModel:
    """An mmvl model (a :class:`~mmvl.loading.LoadedModel` with ``encode_image``/``encode_text``/``zero_shot``) from an
    open_clip model config and checkpoint on disk.

    ``model_config``: an ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``), a bare model config JSON,
    or a folder holding ``open_clip_config.json`` and the checkpoint (a BiomedCLIP download). ``checkpoint``: the
    weights (safetensors, or a torch file read with ``weights_only=True``). ``text_model``/``tokenizer``: local
    transformers folders for a ``text_cfg.hf_model_name``/``hf_tokenizer_name`` that names a hub repo (or set
    ``HF_HUB_OFFLINE=1`` to use the Hugging Face cache). Supported: timm vision towers with a linear projection,
    BERT-family text towers with mean or [CLS] pooling and a linear or MLP projection.

    The imported model is checked against open_clip's own on a probe (gray images copied to RGB); write it as a
    zoo entry with ``mmvl.zoo.export(model, name)``.
    """
    import open_clip  # heavy (torchvision, hub clients): imported only when open_clip interop runs
    from transformers import AutoTokenizer

    model_cfg, preprocess_cfg, folder = _read_open_clip_config(model_config)
    checkpoint = Path(checkpoint) if checkpoint is not None else _find_checkpoint(folder or Path(model_config).parent)
    vision, text = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    if not vision.get("timm_model_name"):
        raise ConfigError("import_open_clip: only timm vision towers (vision_cfg.timm_model_name) are supported; for "
                          "open_clip's own ViTs use image_encoder=dict(type='open_clip', ...) in a config")
    if vision.get("timm_proj", "linear") != "linear" or vision.get("timm_proj_bias"):
        raise ConfigError(f"import_open_clip: vision_cfg.timm_proj={vision.get('timm_proj')!r}, "
                          f"timm_proj_bias={vision.get('timm_proj_bias')}: mmvl takes a linear projection without bias")
    if not text.get("hf_model_name"):
        raise ConfigError("import_open_clip: only transformers text towers (text_cfg.hf_model_name) are supported")
    proj_type = text.get("hf_proj_type", "mlp")
    pooler = text.get("hf_pooler_type", "mean_pooler")
    pooling = {v: k for k, v in POOLERS.items()}.get(pooler)
    if pooling is None or proj_type not in ("linear", "mlp"):
        raise ConfigError(f"import_open_clip: text_cfg.hf_pooler_type={pooler!r}, hf_proj_type={proj_type!r}; mmvl "
                          f"takes {sorted(POOLERS.values())} and 'linear'/'mlp' projections")
    text["hf_model_name"] = str(text_model or _inside(folder, text["hf_model_name"]))
    text["hf_tokenizer_name"] = str(tokenizer or _inside(folder, text.get("hf_tokenizer_name"))
                                    or text["hf_model_name"])
    text["hf_model_pretrained"] = False
    reference = open_clip.CustomTextCLIP(**{**model_cfg, "vision_cfg": vision, "text_cfg": text})
    open_clip.load_checkpoint(reference, str(checkpoint))  # strict; torch files with weights_only=True
    reference.eval()

    trunk = reference.visual.trunk
    image_size = vision.get("image_size", 224)  # open_clip builds the timm model at its default size, though
    spatial = tuple(getattr(getattr(trunk, "patch_embed", None), "img_size", None) or (
        (image_size, image_size) if isinstance(image_size, int) else image_size))
    image_cfg: dict[str, Any] = {"type": "vit2d", "model_name": vision["timm_model_name"], "in_chans": 1,
                                 "img_size": list(spatial)}
    pool = vision.get("timm_pool", "avg")
    if pool:  # open_clip built the timm default, then reset its pooling: a ViT keeps its norm placement
        image_cfg["global_pool"] = pool
        if hasattr(trunk, "fc_norm") and (pool in ("avg", "avgmax", "max")) == isinstance(trunk.fc_norm, nn.Identity):
            image_cfg["fc_norm"] = not isinstance(trunk.fc_norm, nn.Identity)
    text_tokenizer = AutoTokenizer.from_pretrained(text["hf_tokenizer_name"], local_files_only=True)
    bert = bert_config_fields(reference.text.config, text_tokenizer)
    if bert is None:
        raise ConfigError(f"import_open_clip: the text tower ({reference.text.config.model_type}) is not a BERT-family "
                          "model whose vocabulary matches its tokenizer")
    embed_dim = int(model_cfg["embed_dim"])
    text_cfg: dict[str, Any] = {"type": "bert", "config": bert, "tokenizer": text["hf_tokenizer_name"],
                                "pooling": pooling, "max_length": int(text.get("context_length", 77))}
    if proj_type == "mlp":
        text_cfg.update(type="open_clip_hf_text", proj_type="mlp", proj_dim=embed_dim)
    siglip = getattr(reference, "logit_bias", None) is not None
    scale = float(reference.logit_scale.detach().exp())
    head_cfg = {"type": "siglip" if siglip else "clip", "embed_dim": embed_dim,
                "max_logit_scale": max(100.0, math.ceil(scale))}
    mmvl_cfg = {"image_encoder": image_cfg, "text_encoder": text_cfg, "heads": [head_cfg]}
    model = build_model(mmvl_cfg)

    mean_rgb = list(preprocess_cfg.get("mean", OPENAI_MEAN))
    std_rgb = list(preprocess_cfg.get("std", OPENAI_STD))
    mean, std = sum(mean_rgb) / 3, sum(std_rgb) / 3
    state = _imported_state(model, reference, mean_rgb, std_rgb, mean, std, proj_type, siglip)
    model.load_state_dict(state, strict=True)
    model.eval()
    if spatial[0] != spatial[1]:
        raise ConfigError(f"import_open_clip: a {spatial} tower; mmvl's 2D pipeline (ResizePad) makes square images")
    pipeline = [{"type": "LoadImage", "frame": 0, "voi": "auto"}, {"type": "ResizePad", "size": int(spatial[0])},
                {"type": "Normalize", "mean": mean, "std": std}]
    checks = _check_import(model, reference, spatial, mean_rgb, std_rgb, mean, std, text)
    config = {"model": mmvl_cfg, "data": {"eval_pipeline": pipeline},
              "imported_from": {"open_clip": Path(checkpoint).name}}
    return LoadedModel(model=model, preprocess=Pipeline(pipeline), config=config, source=str(checkpoint),
                       info={"imported": "open_clip", "checks": checks})


def _imported_state(model: nn.Module, reference: nn.Module, mean_rgb: list[float], std_rgb: list[float], mean: float,
                    std: float, proj_type: str, siglip: bool) -> dict[str, torch.Tensor]:
    trunk = reference.visual.trunk
    stem = _stem_name(trunk)
    trunk_state = dict(trunk.state_dict())
    weight, bias = _fold_stem(trunk_state[f"{stem}.weight"], trunk_state.get(f"{stem}.bias"), mean_rgb, std_rgb,
                              mean, std)
    trunk_state[f"{stem}.weight"] = weight
    if bias is not None:
        trunk_state[f"{stem}.bias"] = bias
    state = {f"image_encoder.model.{k}": v for k, v in trunk_state.items()}
    state.update({f"text_encoder.model.{k}": v for k, v in reference.text.transformer.state_dict().items()})
    head_name = next(iter(model.heads))
    state[f"heads.{head_name}.image_proj.weight"] = reference.visual.head.proj.weight
    embed_dim = model.contrastive_head.embed_dim
    if proj_type == "mlp":
        state.update({f"text_encoder.proj.{k}": v for k, v in reference.text.proj.state_dict().items()})
        state[f"heads.{head_name}.text_proj.weight"] = torch.eye(embed_dim)
    else:
        state[f"heads.{head_name}.text_proj.weight"] = reference.text.proj.weight
    state[f"heads.{head_name}.logit_scale"] = reference.logit_scale.detach().reshape(())
    if siglip:
        state[f"heads.{head_name}.logit_bias"] = reference.logit_bias.detach().reshape(())
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"import_open_clip: no open_clip weights for {missing[:5]}")
    return {key: state[key] for key in own}


@torch.no_grad()
def _check_import(model: nn.Module, reference: nn.Module, size: tuple[int, int], mean_rgb: list[float],
                  std_rgb: list[float], mean: float, std: float, text: Mapping[str, Any]) -> dict[str, Any]:
    """mmvl on ``(g - mean) / std`` against open_clip on ``(g - mean_c) / std_c`` for random gray images ``g``."""
    from open_clip.tokenizer import HFTokenizer

    gray = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(0))
    rgb = (gray - torch.tensor(mean_rgb).view(1, 3, 1, 1)) / torch.tensor(std_rgb).view(1, 3, 1, 1)
    tokenizer = HFTokenizer(text["hf_tokenizer_name"], context_length=int(text.get("context_length", 77)))
    return {"image": compare(reference.encode_image(rgb, normalize=True), model.encode_image((gray - mean) / std),
                             "imported open_clip image tower"),
            "text": compare(reference.encode_text(tokenizer(PROBE_TEXTS), normalize=True),
                            model.encode_text(PROBE_TEXTS), "imported open_clip text tower")}
