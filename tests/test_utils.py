"""Atomic writes: a failure part-way leaves the previous file or folder as it was and no temp files."""

from __future__ import annotations

import pytest

from mmvl.utils import atomic_directory, atomic_write, atomic_write_text


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = atomic_write_text(tmp_path / "a.json", "old")

    def fail(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "tokenizer"
    with atomic_directory(target) as tmp:
        (tmp / "vocab.txt").write_text("a\n")
        assert not target.exists()  # nothing visible before the block ends
    assert [p.name for p in target.iterdir()] == ["vocab.txt"]
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(target) as tmp:
            (tmp / "tokenizer.json").write_text("{")
            raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["vocab.txt"]  # the old folder, untouched
    with atomic_directory(target) as tmp:
        (tmp / "tokenizer.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["tokenizer.json"]  # replaced as a whole
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]  # no temp folders left
