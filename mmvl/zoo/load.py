"""Load a trained model with the preprocessing it was trained with: from a model-zoo entry (a folder or a name in
a zoo index), a training work directory or a checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmvl.config import Config
from mmvl.data.transforms import Pipeline, load_preprocess
from mmvl.engine.checkpoint import load_checkpoint
from mmvl.errors import CheckpointError, ConfigError
from mmvl.models import build_model
from mmvl.zoo import entry as zoo_entry


@dataclass
class LoadedModel:
    """A model ready for inference: ``model`` (eval mode), its ``preprocess`` pipeline (``preprocess(path)`` gives
    ``{"image": array, "meta": ...}``), the ``config`` it was built from and where it came from (``source``).

    ``encode_image``, ``encode_text`` and ``zero_shot`` run it; ``prompts`` holds the zero-shot labels and prompts
    recorded with a zoo entry (``prompts.json``), which ``zero_shot`` uses when given none.
    """

    model: nn.Module
    preprocess: Pipeline | None
    config: dict[str, Any]
    source: str
    prompts: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_images(self, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> torch.Tensor:
        """Preprocess image files / volumes into one batch ``(B, C, ...)`` on the model's device."""
        if self.preprocess is None:
            raise ConfigError(f"{self.source}: this model has no image preprocessing (a text-only model)")
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        images = [torch.from_numpy(self.preprocess(path)["image"]) for path in paths]
        return torch.stack(images).to(self.device)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike]) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, D)`` for a preprocessed batch or for image paths. Models without a
        contrastive head give their normalised pooled image feature."""
        if not isinstance(images, torch.Tensor):
            images = self.load_images(images)
        images = images.to(self.device)
        if zoo_entry.contrastive_head(self.model) is not None:
            return self.model.encode_image(images)
        return F.normalize(self.model.image_encoder(images).pooled, dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, D)`` in the space shared with the images."""
        return self.model.encode_text([texts] if isinstance(texts, str) else list(texts))

    def zero_shot(self, inputs: Any = (), labels: Sequence[str] | str | None = None,
                  preset: str | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """:func:`mmvl.zero_shot` with this model; ``labels`` and ``preset`` default to the entry's ``prompts.json``
        (its labels, and its prompts and templates), else to the ``chexzero`` preset."""
        from mmvl.inference import zero_shot

        if labels is None:
            labels = (self.prompts or {}).get("labels") or ()
            if not labels:
                raise ConfigError(f"{self.source}: give labels (this model records no zero-shot labels)")
        if preset is None:
            preset = recorded_preset(self.prompts) if self.prompts else "chexzero"
        return zero_shot(self, inputs, labels, preset=preset, **kwargs)


def recorded_preset(prompts: Mapping[str, Any]) -> Any:
    """A prompt set for :func:`mmvl.evaluation.zero_shot.build_prompts` from ``prompts.json``: its per-label prompts,
    and its templates for other labels."""
    templates = prompts.get("templates") or {}
    per_label = prompts.get("prompts") or {}
    if not templates and not per_label:
        return prompts.get("preset") or "chexzero"
    return {**templates, **per_label}


# -- zoo entries -----------------------------------------------------------------------------------------------
def load(path_or_name: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> LoadedModel:
    """A zoo entry, by folder or by name (``model_zoo/index.json``, ``$MMVL_ZOO``), as a :class:`LoadedModel`.

    With ``verify`` (default) the files it reads are checked against ``SHA256SUMS`` first, and a modified or
    truncated file is refused (:class:`~mmvl.errors.CheckpointError`). Weights are read from safetensors only.
    A training work dir or checkpoint is loaded as :func:`load_pretrained` does.
    """
    if Path(path_or_name).exists() and not zoo_entry.is_entry(path_or_name):
        return load_pretrained(path_or_name, device=device)
    entry, record = zoo_entry.resolve(path_or_name)
    if verify:
        if record and record.get("sha256sums") and (entry / zoo_entry.SUMS).is_file():
            actual = zoo_entry.sha256_file(entry / zoo_entry.SUMS)
            if actual != record["sha256sums"]:
                raise CheckpointError(f"{entry / zoo_entry.SUMS} differs from the one recorded for "
                                      f"'{path_or_name}' in the zoo index; the entry was changed after export")
        zoo_entry.verify_entry(entry, zoo_entry.model_files(entry))
    config = zoo_entry.read_config(entry)
    model = zoo_entry.build_entry_model(config, entry)
    zoo_entry.load_weights(model, entry / zoo_entry.WEIGHTS)
    model.to(device).eval()
    prompts = None
    if (entry / zoo_entry.PROMPTS).is_file():
        prompts = json.loads((entry / zoo_entry.PROMPTS).read_text(encoding="utf-8"))
    preprocess = load_preprocess(entry / zoo_entry.PREPROCESS) if (entry / zoo_entry.PREPROCESS).is_file() else None
    return LoadedModel(model=model, preprocess=preprocess, config=config,
                       source=str(entry), prompts=prompts, info={"entry": str(entry), "name": config.get("name")})


def load_image_encoder(path_or_name: str | os.PathLike, device: str | torch.device = "cpu",
                       with_projection: bool = False) -> nn.Module:
    """The image encoder of a zoo entry, work dir or checkpoint, with its trained weights, for fine-tuning.

    Returns the mmvl encoder module (``forward(images) -> EncoderOutput`` with ``pooled`` and ``tokens``), in
    train mode; with ``with_projection`` an :class:`~mmvl.zoo.entry.ImageEmbedder` (encoder + the contrastive
    projection, L2-normalised output). Its preprocessing: ``mmvl.zoo.load(...).preprocess``.
    """
    model = load_pretrained(path_or_name, device=device).model
    if getattr(model, "image_encoder", None) is None:
        raise ConfigError(f"{path_or_name}: this model has no image encoder")
    module = zoo_entry.ImageEmbedder.from_model(model) if with_projection else model.image_encoder
    return module.train()


def load_text_encoder(path_or_name: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The text encoder (with its tokenizer, ``.tokenizer``) of a zoo entry, work dir or checkpoint, in train mode."""
    model = load_pretrained(path_or_name, device=device).model
    if getattr(model, "text_encoder", None) is None:
        raise ConfigError(f"{path_or_name}: this model has no text encoder")
    return model.text_encoder.train()


# -- work dirs and checkpoints -------------------------------------------------------------------------------
def _find_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("best.pt", "last.pt"):
        candidate = path / "checkpoints" / name
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt; is this a training work dir?")


def repoint_tokenizers(model_cfg: dict[str, Any], tokenizer_dir: Path) -> None:
    """Point the text encoder and heads at ``tokenizer_dir`` where their tokenizer is the one the trainer built in
    the work dir (a ``dict(type="wordpiece")`` config, or a path to a ``tokenizer`` folder that moved with the
    work dir): the work dir may have been moved or copied since training."""
    for cfg in zoo_entry.tokenizer_users(model_cfg):
        value = cfg["tokenizer"]
        if isinstance(value, (str, os.PathLike)):
            folder = Path(value)
            in_work_dir = folder.name == "tokenizer" and (not folder.is_dir() or (folder.parent / "config.py").is_file()
                                                          or (folder.parent / "checkpoints").is_dir())
            if not in_work_dir:
                continue  # a tokenizer the config named itself (a pretrained model's), left as it is
        elif not isinstance(value, Mapping):
            continue
        cfg["tokenizer"] = str(tokenizer_dir)


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """``path``: a zoo entry (folder or name, see :func:`load`), a work directory (uses ``checkpoints/best.pt``,
    else ``last.pt``) or a checkpoint file.

    For work dirs and checkpoints the architecture comes from the config stored in the checkpoint, the
    preprocessing from the work dir's ``preprocess.json`` (or the config's eval pipeline), the tokenizer from
    ``tokenizer/`` beside it.
    """
    if zoo_entry.is_entry(path) or zoo_entry.looks_like_name(path):
        return load(path, device=device)
    path = Path(path)
    checkpoint = _find_checkpoint(path)
    state = load_checkpoint(checkpoint)
    config = Config(state["config"])
    work_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    if (work_dir / "tokenizer").is_dir():
        model_cfg = config["model"]
        repoint_tokenizers(model_cfg, work_dir / "tokenizer")
    model = build_model(config["model"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint}: weights do not match the stored config: {err}") from err
    model.to(device).eval()
    preprocess_file = work_dir / "preprocess.json"
    pipeline = load_preprocess(preprocess_file) if preprocess_file.is_file() else Pipeline(
        config["data"]["eval_pipeline"])
    info = {"work_dir": str(work_dir), "checkpoint": str(checkpoint), "step": state.get("step"),
            "mmvl_version": state.get("mmvl_version"), "best_value": state.get("best_value")}
    return LoadedModel(model=model, preprocess=pipeline, config=config.to_dict(), source=str(checkpoint), info=info)
