"""Small shared helpers: atomic file writes, crash-tolerant JSONL logs, seeding, and the package logger and the
console logging setup of the tools."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file via temp file + fsync + rename so that a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside ``path`` to fill; when the block ends normally its files are fsynced and it
    replaces ``path`` by rename (a crash leaves no half-written folder there), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            fsync_file(file)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """Append whole lines in one write. Logs that grow every step are appended, not rewritten (that would cost
    O(n^2) over a run): a crash can tear only the last line, which :func:`read_jsonl` drops, and the trainer
    syncs them (:func:`fsync_file`) before each checkpoint, so every line up to a checkpoint survives with it."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path`` from the OS cache to the disk, if it exists."""
    if os.path.isfile(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL log; a torn last line (a crash mid-append) is left out."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise
    return records


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_logger(name: str = "mmvl") -> logging.Logger:
    """A logger under ``mmvl``. The library adds no handlers (the package logger has only a ``NullHandler``, as
    the logging HOWTO asks of libraries); applications and ``tools/`` call :func:`setup_logging`."""
    return logging.getLogger(name)


CONSOLE_HANDLER_NAME = "mmvl-console"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record, not the one at setup (pytest's capsys and
    tools called in-process swap it; a stream kept from setup may be closed by then)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> logging.Handler:
    """Console logging for an application (each tool calls this first in ``main``): one stderr handler on the
    root logger, so other libraries' warnings print the same way; ``mmvl`` loggers pass ``level`` and up, the
    others keep the root's level (WARNING by default), so e.g. matplotlib's INFO lines stay quiet. Calling it
    again only changes ``level``; it never adds a second handler."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == CONSOLE_HANDLER_NAME), None)
    if handler is None:
        handler = _StderrHandler()
        handler.set_name(CONSOLE_HANDLER_NAME)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    logging.getLogger("mmvl").setLevel(level)
    return handler
