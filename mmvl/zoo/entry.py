"""The mmvl model-zoo entry: its files, their SHA-256 sums, the zoo index that names entries, and rebuilding a
model from an entry alone (``config.json`` + ``model.safetensors``; no pickle, no training config).

An entry is a folder::

    config.json          architecture (plain JSON: the model dict of the config, relative tokenizer paths)
    model.safetensors    weights
    preprocess.json      the eval pipeline spec, rebuilt exactly at inference
    prompts.json         zero-shot labels and prompts used in its evaluation (when there were any)
    tokenizer/           the text tower's tokenizer (when it has one)
    README.md            model card
    SHA256SUMS           ``sha256sum -c`` compatible sums of every other file

plus the interop exports (``open_clip/``, ``text_encoder/``, ``configs/`` + ``models/`` of a MONAI bundle,
``torchscript/``, ``onnx/``). A zoo is a folder of entries with an ``index.json`` naming them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmvl.errors import CheckpointError, ConfigError
from mmvl.registry import ENCODERS

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
REPO_ZOO = Path(__file__).resolve().parents[2] / "model_zoo"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PARTS = ("image", "text")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise ConfigError(f"zoo entry name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                          "starting with a letter or digit), e.g. cxr_clip_tiny")
    return name


# -- checksums -------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def entry_files(entry: Path) -> list[str]:
    """Every file of the entry but ``SHA256SUMS``, as sorted POSIX paths relative to the entry."""
    names = (p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file())
    return sorted(name for name in names if name != SUMS)


def write_checksums(entry: Path) -> Path:
    """``SHA256SUMS`` over every other file (``sha256sum -c SHA256SUMS`` checks it in the entry folder)."""
    from mmvl.utils import atomic_write_text

    lines = [f"{sha256_file(entry / name)}  {name}\n" for name in entry_files(entry)]
    return atomic_write_text(entry / SUMS, "".join(lines))


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


def tokenizer_users(model_cfg: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The text encoder and head config dicts that carry a ``tokenizer``."""
    heads = model_cfg.get("heads") or []
    for cfg in (model_cfg.get("text_encoder"), *(heads if isinstance(heads, list) else [heads])):
        if isinstance(cfg, dict) and cfg.get("tokenizer") is not None:
            yield cfg


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


# -- models ------------------------------------------------------------------------------------------------
class EncoderModel(nn.Module):
    """The towers of a partial entry (``--parts image`` or ``--parts text``): an image and/or a text encoder with
    the contrastive head's projection to the shared space, if the model had one.

    ``encode_image``/``encode_text`` give what the full model gives: L2-normalised projected embeddings (the
    normalised pooled feature when there is no projection).
    """

    def __init__(self, image_encoder: Mapping[str, Any] | None = None, text_encoder: Mapping[str, Any] | None = None,
                 embed_dim: int | None = None, max_logit_scale: float = 100.0):
        super().__init__()
        if not image_encoder and not text_encoder:
            raise ConfigError("an encoder entry needs an image_encoder or a text_encoder")
        self.image_encoder = ENCODERS.build(image_encoder) if image_encoder else None
        self.text_encoder = ENCODERS.build(text_encoder) if text_encoder else None
        self.image_proj = (nn.Linear(self.image_encoder.out_dim, embed_dim, bias=False)
                           if embed_dim and self.image_encoder is not None else None)
        self.text_proj = (nn.Linear(self.text_encoder.out_dim, embed_dim, bias=False)
                          if embed_dim and self.text_encoder is not None else None)
        self.logit_scale = nn.Parameter(torch.zeros(())) if embed_dim else None
        self.embed_dim = embed_dim
        self.max_log_scale = float(torch.tensor(max_logit_scale).log())

    @property
    def tokenizer(self) -> Any:
        return None if self.text_encoder is None else self.text_encoder.tokenizer

    @property
    def max_length(self) -> int:
        return getattr(self.text_encoder, "max_length", 128)

    @property
    def contrastive_head(self) -> EncoderModel:
        if self.logit_scale is None:
            raise ConfigError("this entry has no contrastive projection, so no shared image-text embedding")
        return self

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_encoder is None:
            raise ConfigError("this zoo entry holds the text encoder only (exported with --parts text)")
        pooled = self.image_encoder(images).pooled
        return F.normalize(self.image_proj(pooled) if self.image_proj is not None else pooled, dim=-1)

    def encode_text(self, texts: Sequence[str] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.text_encoder is None:
            raise ConfigError("this zoo entry holds the image encoder only (exported with --parts image)")
        device = next(self.parameters()).device
        tokens = self.text_encoder.tokenize(texts, device) if not isinstance(texts, Mapping) else texts
        pooled = self.text_encoder(tokens["input_ids"], tokens["attention_mask"]).pooled
        return F.normalize(self.text_proj(pooled) if self.text_proj is not None else pooled, dim=-1)


class ImageEmbedder(nn.Module):
    """Image encoder + projection + L2 normalisation as one module with a tensor output: ``encode_image`` of the
    model, in the form TorchScript, ONNX and MONAI bundles take (``forward(images) -> (B, D)``).

    ``image_encoder``: an encoder config dict (``type=...``) or a built encoder; ``embed_dim``: the projection's
    output size, or None for the normalised pooled feature.
    """

    def __init__(self, image_encoder: Mapping[str, Any] | nn.Module, embed_dim: int | None = None):
        super().__init__()
        self.image_encoder = ENCODERS.build(image_encoder) if isinstance(image_encoder, Mapping) else image_encoder
        self.image_proj = nn.Linear(self.image_encoder.out_dim, embed_dim, bias=False) if embed_dim else None

    @classmethod
    def from_model(cls, model: nn.Module) -> ImageEmbedder:
        """Sharing the modules of a loaded model (no copy)."""
        embedder = cls(model.image_encoder)
        projection = image_projection(model)
        if projection is not None:
            embedder.image_proj = projection
        return embedder.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.image_encoder(images).pooled
        return F.normalize(self.image_proj(pooled) if self.image_proj is not None else pooled, dim=-1)


def contrastive_head(model: nn.Module) -> nn.Module | None:
    try:
        return model.contrastive_head
    except (ConfigError, AttributeError):
        return None


def image_projection(model: nn.Module) -> nn.Linear | None:
    head = contrastive_head(model)
    return None if head is None else head.image_proj


def text_projection(model: nn.Module) -> nn.Linear | None:
    head = contrastive_head(model)
    return None if head is None else head.text_proj


def build_entry_model(config: Mapping[str, Any], entry: Path) -> nn.Module:
    """The model ``config.json`` describes, with the entry's tokenizers, before its weights are loaded."""
    import mmvl.zoo.open_clip_format  # noqa: F401  (registers the encoder types that open_clip imports use)
    from mmvl.models import build_model

    model_cfg = resolve_paths(config["model"], entry)
    if config.get("architecture", "VisionLanguageModel") == "VisionLanguageModel":
        return build_model(model_cfg)
    return EncoderModel(**model_cfg)


def load_weights(model: nn.Module, path: Path) -> None:
    """``model.safetensors`` into ``model``: every tensor must match by name and shape (no pickle involved)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(model, str(path), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path}: cannot load the weights into the model config.json describes: {err}") from err


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    import mmvl

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path), metadata={"format": "pt", "producer": f"mmvl {mmvl.__version__}"},
               force_contiguous=True)


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


@contextlib.contextmanager
def _index_lock(zoo_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of ``index.json`` between concurrent exports (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: last writer wins, each write is still atomic
        yield
        return
    with open(zoo_dir / ".index.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_index(zoo_dir: Path, name: str, record: Mapping[str, Any] | None) -> Path:
    """Add (or with ``record=None`` remove) the entry ``name`` in ``zoo_dir/index.json``."""
    from mmvl.utils import atomic_write_text

    zoo_dir.mkdir(parents=True, exist_ok=True)
    with _index_lock(zoo_dir):
        index = read_index(zoo_dir)
        if record is None:
            index["entries"].pop(name, None)
        else:
            index["entries"][name] = dict(record)
        index["entries"] = dict(sorted(index["entries"].items()))
        return atomic_write_text(zoo_dir / INDEX, json.dumps(index, indent=2) + "\n")


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
