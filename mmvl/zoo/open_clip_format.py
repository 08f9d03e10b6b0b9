"""open_clip interop: export an mmvl CLIP model as an open_clip folder (``open_clip_config.json`` +
``open_clip_model.safetensors`` + the text model's config and tokenizer, loadable with
``open_clip.create_model_and_transforms("local-dir:...")``), and import an open_clip checkpoint (a timm vision
tower + a transformers text tower, such as a BiomedCLIP download) as an mmvl model.

open_clip builds a timm tower from the timm model name alone (its default image size, depth, width...), with
three input channels. mmvl's radiograph encoders take one channel: on export the stem's filters are split over
the three channels (each a third), with the pipeline's mean/std on every channel, so a gray image copied to RGB
gives the same features; on import open_clip's per-channel normalisation is folded into a one-channel stem
(weights ``sum_c W_c s/s_c``, bias ``b + sum_c (m - m_c)/s_c sum W_c``), exact for gray images.
"""

from __future__ import annotations

import json
import math
import os
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
def open_clip_state(model: nn.Module, in_chans: int) -> dict[str, torch.Tensor]:
    """mmvl weights under open_clip ``CustomTextCLIP`` names (timm trunk + HF transformer + projections)."""
    head = model.contrastive_head
    image, text = model.image_encoder, model.text_encoder
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


def open_clip_config(context: ExportContext, folder: Path) -> dict[str, Any]:
    """``open_clip_config.json``; ``folder`` is where it will be read (open_clip resolves ``hf_model_name``, the
    text model's config, with transformers: an absolute path)."""
    model = context.model
    head = model.contrastive_head
    image_cfg = context.loaded.config["model"]["image_encoder"]
    extra = sorted(set(image_cfg) - TIMM_ENCODER_ARGS - {"global_pool", "fc_norm"})  # pooling: checked on load
    if extra:
        raise NotExportable(f"open_clip builds timm towers from the model name alone; this image encoder also sets "
                            f"{', '.join(extra)} ({image_cfg.get('model_name')} with its defaults would be another "
                            "network)")
    text = model.text_encoder
    mean, std = _normalisation(context.loaded.preprocess.spec)
    size = context.input["spatial_size"]
    text_cfg: dict[str, Any] = {
        "hf_model_name": str(folder.resolve()), "hf_tokenizer_name": str(folder.resolve()),
        "hf_model_pretrained": False, "hf_pooler_type": POOLERS[text.pooling], "context_length": text.max_length}
    if isinstance(text, ProjectedHFTextEncoder):
        if not torch.equal(head.text_proj.weight, torch.eye(head.embed_dim)):
            raise NotExportable("the text tower has its own projection and the head projects again")
        text_cfg["hf_proj_type"] = text.proj_type
    else:
        text_cfg["hf_proj_type"] = "linear"
    model_cfg: dict[str, Any] = {
        "embed_dim": int(head.embed_dim),
        "vision_cfg": {"timm_model_name": image_cfg["model_name"], "timm_model_pretrained": False,
                       "timm_pool": image_cfg.get("global_pool", ""), "timm_proj": "linear", "timm_proj_bias": False,
                       "image_size": size[0] if size[0] == size[1] else size},
        "text_cfg": text_cfg,
    }
    if getattr(head, "logit_bias", None) is not None:
        model_cfg["init_logit_bias"] = float(head.logit_bias)
    preprocess_cfg = {"size": model_cfg["vision_cfg"]["image_size"], "mode": "RGB", "mean": [mean] * 3,
                      "std": [std] * 3, "interpolation": "bilinear", "resize_mode": "longest", "fill_color": 0}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


@torch.no_grad()
def export_open_clip(context: ExportContext) -> dict[str, Any]:
    """``open_clip/``; read back with ``open_clip.create_model_and_transforms`` and ``open_clip.get_tokenizer``
    and compared with mmvl's image and text embeddings (the image as gray copied to RGB)."""
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
    import open_clip  # heavy (torchvision, hub clients): imported only when open_clip interop runs
    from open_clip.hf_configs import arch_dict

    if model.text_encoder.model.config.model_type not in arch_dict:
        raise NotExportable(f"open_clip's HF text tower does not know model_type "
                            f"'{model.text_encoder.model.config.model_type}' ({', '.join(arch_dict)})")
    try:
        head = model.contrastive_head
    except ConfigError as err:
        raise NotExportable(str(err)) from err
    if head.image_proj.bias is not None or head.text_proj.bias is not None:
        raise NotExportable("open_clip projections have no bias")
    folder = context.out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    config = open_clip_config(context, (context.final or context.out) / FOLDER)
    model.text_encoder.model.config.save_pretrained(str(folder))
    model.text_encoder.tokenizer.save_pretrained(str(folder))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(open_clip_state(model, context.input["in_chans"]), str(folder / WEIGHTS_FILE))

    try:
        here = {**config["model_cfg"]["text_cfg"], "hf_model_name": str(folder), "hf_tokenizer_name": str(folder)}
        oc_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}", text_cfg=here)
    except RuntimeError as err:  # strict load: the state does not fit the network open_clip builds
        raise NotExportable(f"open_clip builds a different network from this config ({str(err)[:300]}); its timm "
                            "tower uses the timm model's defaults (image size, patch size, pooling)") from err
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    oc_model.eval()
    images = context.probe_images
    rgb = images.expand(-1, 3, *images.shape[2:]) if images.shape[1] == 1 else images
    texts = context.probe_texts
    return {"image": compare(model.encode_image(images), oc_model.encode_image(rgb, normalize=True), "open_clip image"),
            "text": compare(model.encode_text(texts), oc_model.encode_text(tokenizer(texts), normalize=True),
                            "open_clip text"),
            "logit_scale": {"mmvl": float(head.scale()), "open_clip": float(oc_model.logit_scale.exp())}}


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
    text["hf_model_name"] = str(text_model or text["hf_model_name"])
    text["hf_tokenizer_name"] = str(tokenizer or text.get("hf_tokenizer_name") or text["hf_model_name"])
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
