"""Writing a model-zoo entry's bookkeeping: its name, ``SHA256SUMS``, the weights file and the zoo index that names
entries. The entry's layout, and reading all of it back, is :mod:`mmvl.loading`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn

import mmvl
from mmvl.errors import ConfigError
from mmvl.loading import INDEX, NAME_PATTERN, SUMS, read_index, sha256_file
from mmvl.models import ImageEmbedder  # noqa: F401  (the MONAI bundles of older entries name mmvl.zoo.entry.ImageEmbedder)
from mmvl.utils import atomic_write_text


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise ConfigError(f"zoo entry name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                          "starting with a letter or digit), e.g. cxr_clip_tiny")
    return name


def entry_files(entry: Path) -> list[str]:
    """Every file of the entry but ``SHA256SUMS``, as sorted POSIX paths relative to the entry."""
    names = (p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file())
    return sorted(name for name in names if name != SUMS)


def write_checksums(entry: Path) -> Path:
    """``SHA256SUMS`` over every other file (``sha256sum -c SHA256SUMS`` checks it in the entry folder)."""
    lines = [f"{sha256_file(entry / name)}  {name}\n" for name in entry_files(entry)]
    return atomic_write_text(entry / SUMS, "".join(lines))


def save_weights(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path), metadata={"format": "pt", "producer": f"mmvl {mmvl.__version__}"},
               force_contiguous=True)


@contextlib.contextmanager
def _index_lock(zoo_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of ``index.json`` between concurrent exports (POSIX advisory lock)."""
    try:
        import fcntl  # POSIX only
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
    zoo_dir.mkdir(parents=True, exist_ok=True)
    with _index_lock(zoo_dir):
        index = read_index(zoo_dir)
        if record is None:
            index["entries"].pop(name, None)
        else:
            index["entries"][name] = dict(record)
        index["entries"] = dict(sorted(index["entries"].items()))
        return atomic_write_text(zoo_dir / INDEX, json.dumps(index, indent=2) + "\n")
