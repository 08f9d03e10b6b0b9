"""Load a trained model from a work directory or a checkpoint, with the preprocessing it was trained with."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmvl.config import Config
from mmvl.data.transforms import Pipeline, load_preprocess
from mmvl.engine.checkpoint import load_checkpoint
from mmvl.errors import CheckpointError
from mmvl.models import VisionLanguageModel, build_model


@dataclass
class LoadedModel:
    model: VisionLanguageModel
    preprocess: Pipeline
    config: dict[str, Any]
    source: str


def _find_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("best.pt", "last.pt"):
        candidate = path / "checkpoints" / name
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt; is this a training work dir?")


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """``path``: a work directory (uses ``checkpoints/best.pt``, else ``last.pt``) or a checkpoint file.

    The architecture comes from the config stored in the checkpoint, the preprocessing from the work
    dir's ``preprocess.json`` (or the config's eval pipeline), the tokenizer from ``tokenizer/`` beside it.
    """
    path = Path(path)
    checkpoint = _find_checkpoint(path)
    state = load_checkpoint(checkpoint)
    config = Config(state["config"])
    work_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    text_cfg = config["model"].get("text_encoder")
    if text_cfg and (work_dir / "tokenizer").is_dir():
        text_cfg["tokenizer"] = str(work_dir / "tokenizer")  # the work dir may have moved since training
    model = build_model(config["model"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint}: weights do not match the stored config: {err}") from err
    model.to(device).eval()
    preprocess_file = work_dir / "preprocess.json"
    pipeline = load_preprocess(preprocess_file) if preprocess_file.is_file() else Pipeline(
        config["data"]["eval_pipeline"])
    return LoadedModel(model=model, preprocess=pipeline, config=config.to_dict(), source=str(checkpoint))
