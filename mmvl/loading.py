"""Loading a trained model with the preprocessing it was trained with, from a model-zoo entry (a folder, or a name
in a zoo index), a training work directory or a checkpoint: the one place both ``mmvl.inference`` and
``mmvl.zoo`` (which writes entries) read models from.

A zoo entry is a folder::

    config.json          architecture (plain JSON: the model dict of the config, relative tokenizer paths)
    model.safetensors    weights
    preprocess.json      the eval pipeline spec, rebuilt exactly at inference
    prompts.json         zero-shot labels and prompts used in its evaluation (when there were any)
    tokenizer/           the text tower's tokenizer (when it has one)
    README.md            model card
    SHA256SUMS           ``sha256sum -c`` compatible sums of every other file

plus the interop exports (``open_clip/``, ``text_encoder/``, ``configs/`` + ``models/`` of a MONAI bundle,
``torchscript/``, ``onnx/``). A zoo is a folder of entries with an ``index.json`` naming them. A model is rebuilt
from ``config.json`` + ``model.safetensors`` alone: no pickle, no training config.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors
from torch import nn

from mmvl.config import Config
from mmvl.data.transforms import Pipeline, load_preprocess
from mmvl.engine.checkpoint import load_checkpoint
from mmvl.errors import CheckpointError, ConfigError
from mmvl.evaluation.zero_shot import zero_shot_scans
from mmvl.models import EncoderModel, ImageEmbedder, build_model
from mmvl.models.embedders import contrastive_head
from mmvl.models.vlm import tokenizer_users

FORMAT = "mmvl-zoo"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PREPROCESS = "preprocess.json"
PROMPTS = "prompts.json"
CARD = "README.md"
SUMS = "SHA256SUMS"
TOKENIZER = "tokenizer"
INDEX = "index.json"
ZOO_ENV = "MMVL_ZOO"
REPO_ZOO = Path(__file__).resolve().parents[1] / "model_zoo"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PARTS = ("image", "text")


# -- checksums -------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checksums(entry: Path) -> dict[str, str]:
    path = entry / SUMS
    if not path.is_file():
        raise CheckpointError(f"{entry}: no {SUMS}, so its files cannot be checked; export it again with "
                              "tools/export.py (or load with verify=False if you made it yourself)")
    sums = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line.strip())
        if not match:
            raise CheckpointError(f"{path}:{number}: not a '<sha256>  <file>' line: {line[:80]!r}")
        sums[match.group(2)] = match.group(1)
    return sums


def verify_entry(entry: str | os.PathLike, files: Sequence[str] | None = None) -> list[str]:
    """Check ``files`` of the entry (default: every file listed) against ``SHA256SUMS``; returns the files checked.

    A listed file that is missing or whose SHA-256 differs (modified, truncated) is refused with
    :class:`~mmvl.errors.CheckpointError`; so is a file named in ``files`` that ``SHA256SUMS`` does not list.
    """
    entry = Path(entry)
    sums = read_checksums(entry)
    names = list(sums) if files is None else list(files)
    for name in names:
        path = entry / name
        if name not in sums:
            raise CheckpointError(f"{path}: not listed in {entry / SUMS}; it was added or renamed after export. "
                                  "Export the entry again rather than editing it")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {SUMS}); the entry is incomplete, copy it again")
        actual = sha256_file(path)
        if actual != sums[name]:
            raise CheckpointError(
                f"{path}: SHA-256 {actual[:16]}... does not match {sums[name][:16]}... in {SUMS} (the file is "
                f"{path.stat().st_size} bytes now): it was modified or truncated after export. Refusing to load "
                "it; copy or export the entry again")
    return names


def model_files(entry: Path) -> list[str]:
    """The files :func:`load` reads: config, weights, preprocessing, prompts and tokenizer folders."""
    listed = read_checksums(entry)
    names = [CONFIG, WEIGHTS, *(name for name in (PREPROCESS, PROMPTS) if name in listed or (entry / name).exists())]
    model_cfg = read_config(entry)["model"]
    folders = set(tokenizer_folders(model_cfg))
    text_cfg = model_cfg.get("text_encoder") or {}
    if isinstance(text_cfg.get("pretrained"), str):
        folders.add(text_cfg["pretrained"])
    for folder in sorted(folders):
        names += sorted(p.relative_to(entry).as_posix() for p in (entry / folder).rglob("*") if p.is_file())
        in_folder = [n for n in listed if n.startswith(folder + "/")]
        if not in_folder:
            raise CheckpointError(f"{entry / folder}: no files of it are listed in {SUMS}")
        names += [n for n in in_folder if n not in names]  # a listed tokenizer file that was deleted is refused too
    return names


# -- config --------------------------------------------------------------------------------------------------
def read_config(entry: Path) -> dict[str, Any]:
    path = entry / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable zoo config.json: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an mmvl zoo config.json (its 'format' is not '{FORMAT}')")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError(f"{path}: format_version {config['format_version']} is newer than this mmvl reads "
                          f"({FORMAT_VERSION}); upgrade mmvl")
    return config


def is_entry(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not (path / CONFIG).is_file():
        return False
    try:
        return json.loads((path / CONFIG).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def tokenizer_folders(model_cfg: Mapping[str, Any]) -> list[str]:
    return [cfg["tokenizer"] for cfg in tokenizer_users(model_cfg) if isinstance(cfg["tokenizer"], str)]


def resolve_paths(model_cfg: Mapping[str, Any], entry: Path) -> dict[str, Any]:
    """The model dict with the entry-relative tokenizer and text-model folders made absolute."""
    model_cfg = copy.deepcopy(dict(model_cfg))
    for cfg in tokenizer_users(model_cfg):
        if isinstance(cfg["tokenizer"], str):
            cfg["tokenizer"] = str(entry / cfg["tokenizer"])
    text_cfg = model_cfg.get("text_encoder")
    if isinstance(text_cfg, dict) and isinstance(text_cfg.get("pretrained"), str):
        text_cfg["pretrained"] = str(entry / text_cfg["pretrained"])
    return model_cfg


def build_entry_model(config: Mapping[str, Any], entry: Path) -> nn.Module:
    """The model ``config.json`` describes, with the entry's tokenizers, before its weights are loaded."""
    model_cfg = resolve_paths(config["model"], entry)
    if config.get("architecture", "VisionLanguageModel") == "VisionLanguageModel":
        return build_model(model_cfg)
    return EncoderModel(**model_cfg)


def load_weights(model: nn.Module, path: Path) -> None:
    """``model.safetensors`` into ``model``: every tensor must match by name and shape (no pickle involved)."""
    try:
        load_safetensors(model, str(path), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path}: cannot load the weights into the model config.json describes: {err}") from err


# -- zoo index and names ---------------------------------------------------------------------------------------
def zoo_dirs() -> list[Path]:
    """Where names are looked up, in order: ``$MMVL_ZOO`` (one or more folders, ``os.pathsep``-separated),
    ``./model_zoo`` and the ``model_zoo/`` of the mmvl source tree."""
    dirs = [Path(p).expanduser() for p in os.environ.get(ZOO_ENV, "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "model_zoo", REPO_ZOO]
    unique: list[Path] = []
    for folder in dirs:
        if folder.is_dir() and all(not _same(folder, seen) for seen in unique):
            unique.append(folder)
    return unique


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def read_index(zoo_dir: Path) -> dict[str, Any]:
    path = zoo_dir / INDEX
    if not path.is_file():
        return {"format": f"{FORMAT}-index", "format_version": FORMAT_VERSION, "entries": {}}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(index.get("entries"), dict):
            raise ValueError("no 'entries' mapping")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path}: not a readable zoo index: {err}; delete it and export again") from err
    return index


def resolve(path_or_name: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """The entry folder for a path or a name, and its index record (None for a path).

    A name is looked up in the ``index.json`` of every zoo folder (:func:`zoo_dirs`), then as a sub-folder of it.
    """
    path = Path(path_or_name).expanduser()
    if path.exists():
        if not is_entry(path):
            raise ConfigError(f"{path}: not a zoo entry (no config.json with format '{FORMAT}')")
        return path, None
    name = str(path_or_name)
    known: list[str] = []
    for zoo_dir in zoo_dirs():
        entries = read_index(zoo_dir)["entries"]
        if name in entries:
            folder = zoo_dir / entries[name]["path"]
            if not is_entry(folder):
                raise ConfigError(f"{zoo_dir / INDEX}: entry '{name}' points at {folder}, which is not a zoo entry "
                                  "(moved or deleted?); export it again")
            return folder, entries[name]
        if NAME_PATTERN.match(name) and is_entry(zoo_dir / name):
            return zoo_dir / name, None
        known += list(entries)
    searched = ", ".join(str(d) for d in zoo_dirs()) or "none found"
    raise CheckpointError(f"no zoo entry, work dir or checkpoint named '{name}'. Known entries: "
                          f"{', '.join(sorted(set(known))) or 'none'} (zoo folders: {searched}; add yours with "
                          f"{ZOO_ENV}=/path/to/zoo)")


def looks_like_name(path_or_name: Any) -> bool:
    """A string that is not an existing path but could be an entry name."""
    return isinstance(path_or_name, str) and not Path(path_or_name).exists() and bool(NAME_PATTERN.match(path_or_name))


# -- the loaded model ------------------------------------------------------------------------------------------
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
        if contrastive_head(self.model) is not None:
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
        if labels is None:
            labels = (self.prompts or {}).get("labels") or ()
            if not labels:
                raise ConfigError(f"{self.source}: give labels (this model records no zero-shot labels)")
        if preset is None:
            preset = recorded_preset(self.prompts) if self.prompts else "chexzero"
        return zero_shot_scans(self, inputs, labels, preset=preset, **kwargs)


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
    if Path(path_or_name).exists() and not is_entry(path_or_name):
        return load_pretrained(path_or_name, device=device)
    entry, record = resolve(path_or_name)
    if verify:
        if record and record.get("sha256sums") and (entry / SUMS).is_file():
            actual = sha256_file(entry / SUMS)
            if actual != record["sha256sums"]:
                raise CheckpointError(f"{entry / SUMS} differs from the one recorded for '{path_or_name}' in the zoo "
                                      "index; the entry was changed after export")
        verify_entry(entry, model_files(entry))
    config = read_config(entry)
    model = build_entry_model(config, entry)
    load_weights(model, entry / WEIGHTS)
    model.to(device).eval()
    prompts = None
    if (entry / PROMPTS).is_file():
        prompts = json.loads((entry / PROMPTS).read_text(encoding="utf-8"))
    preprocess = load_preprocess(entry / PREPROCESS) if (entry / PREPROCESS).is_file() else None
    return LoadedModel(model=model, preprocess=preprocess, config=config,
                       source=str(entry), prompts=prompts, info={"entry": str(entry), "name": config.get("name")})


def load_image_encoder(path_or_name: str | os.PathLike, device: str | torch.device = "cpu",
                       with_projection: bool = False) -> nn.Module:
    """The image encoder of a zoo entry, work dir or checkpoint, with its trained weights, for fine-tuning.

    Returns the mmvl encoder module (``forward(images) -> EncoderOutput`` with ``pooled`` and ``tokens``), in
    train mode; with ``with_projection`` an :class:`~mmvl.models.ImageEmbedder` (encoder + the contrastive
    projection, L2-normalised output). Its preprocessing: ``mmvl.zoo.load(...).preprocess``.
    """
    model = load_pretrained(path_or_name, device=device).model
    if getattr(model, "image_encoder", None) is None:
        raise ConfigError(f"{path_or_name}: this model has no image encoder")
    module = ImageEmbedder.from_model(model) if with_projection else model.image_encoder
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
    for cfg in tokenizer_users(model_cfg):
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
    if is_entry(path) or looks_like_name(path):
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


def load_model(model: LoadedModel | str | os.PathLike, device: Any = None) -> LoadedModel:
    """A :class:`LoadedModel` from itself (moved to ``device`` when given) or from anything :func:`load_pretrained`
    takes (on ``device``, default the CPU)."""
    if isinstance(model, LoadedModel):
        if device is not None:
            model.model.to(device)
        return model
    return load_pretrained(model, device=device or "cpu")
