"""Training checkpoints: atomic writes with a SHA-256 beside each file, rotation of the last K, choosing the
newest checkpoint that verifies, RNG capture/restore, safe loading (``weights_only=True``)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmvl.errors import CheckpointError
from mmvl.utils import atomic_write, atomic_write_text, get_logger

logger = get_logger(__name__)

STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")


def step_checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def checksum_path(path: str | os.PathLike) -> Path:
    """``<checkpoint>.sha256`` beside the checkpoint, in ``sha256sum`` format (``sha256sum -c`` checks it)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Serialise to memory, then temp file + fsync + rename: a crash never leaves a partial checkpoint. The
    SHA-256 of the bytes is written (atomically too) beside it, after the checkpoint: a checkpoint whose
    checksum is missing was interrupted between the two writes, one whose checksum differs was damaged later."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    digest = hashlib.sha256(buffer.getbuffer()).hexdigest()
    path = atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
    atomic_write_text(checksum_path(path), f"{digest}  {path.name}\n")
    return path


def link_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make ``target`` (e.g. ``last.pt``) the same file as ``source`` without a second copy on disk where the
    file system allows hard links (a copy elsewhere), replacing it atomically; its checksum file follows."""
    source, target = Path(source), Path(target)
    for src, dst in ((source, target), (checksum_path(source), checksum_path(target))):
        if dst.exists() and os.path.samefile(src, dst):  # rename() between two links to one file is a no-op
            continue
        tmp = dst.with_name(f".{dst.name}.link.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network and FAT file systems)
            data = src.read_bytes()
            if dst == checksum_path(target):
                data = data.replace(source.name.encode(), target.name.encode())
            atomic_write(dst, lambda handle, data=data: handle.write(data))
            continue
        os.replace(tmp, dst)
    return target


def verify_checksum(path: str | os.PathLike) -> bool | None:
    """True if ``path`` matches its ``.sha256`` file, False if not, None if there is no checksum file."""
    path = Path(path)
    sums = checksum_path(path)
    if not sums.is_file():
        return None
    fields = sums.read_text().split()
    expected = fields[0] if fields else ""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == expected


def step_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step_<N>.pt`` checkpoints in ``ckpt_dir``, newest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_PATTERN.match(p.name))]
    return sorted(found, reverse=True)


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``step_<N>.pt`` checkpoints (and their checksums); returns the deleted."""
    removed = [path for _, path in step_checkpoints(ckpt_dir)[max(keep, 1):]]
    for path in removed:
        checksum_path(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    return removed


def remove_stale_temp_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Temp files left by a write that a crash (SIGKILL, power loss) interrupted before its rename."""
    ckpt_dir = Path(ckpt_dir)
    stale = list(ckpt_dir.glob(".*.tmp")) if ckpt_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_newest_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint in ``ckpt_dir`` that verifies against its checksum and loads, with its state.

    Candidates are the ``step_<N>.pt`` files, newest first, then ``last.pt`` (work dirs written before the
    rotation existed). A damaged one is renamed ``*.corrupt`` (kept for inspection, never picked again or
    counted in the rotation) with a warning naming it, and the previous one is tried.
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = [path for _, path in step_checkpoints(ckpt_dir)]
    if (ckpt_dir / "last.pt").is_file():
        candidates.append(ckpt_dir / "last.pt")
    problems = []
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            problem = str(err)  # names the file
        problems.append(problem)
        logger.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, problem)
        _set_aside(path)
    detail = "; ".join(problems) if problems else "none found"
    raise CheckpointError(f"--resume: no usable checkpoint in {ckpt_dir} ({detail}); start without --resume")


def _set_aside(path: Path) -> None:
    if path.name == "last.pt":  # a link to a step checkpoint, or the only copy: leave it for inspection
        return
    os.replace(path, path.with_name(path.name + ".corrupt"))
    if checksum_path(path).is_file():
        os.replace(checksum_path(path), checksum_path(path).with_name(checksum_path(path).name + ".corrupt"))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state in ``path``, checked against its ``.sha256`` file where there is one, loaded with
    ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if verify_checksum(path) is False:
        raise CheckpointError(f"{path}: its SHA-256 differs from the one in {checksum_path(path).name} "
                              "(truncated or modified)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, wrong format, disallowed pickle globals
        raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
