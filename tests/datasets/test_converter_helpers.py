"""datasets/_converter.py: what the converter scripts share (CSV reading, hashed splits, the manifest writer)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mmvl.errors import DataError, MMVLError
from tests.conftest import load_script

converter = load_script("_converter")


def test_hashed_split_is_fixed_by_the_key_and_close_to_the_fractions() -> None:
    # Golden values: changing the hash would silently move patients between splits of existing manifests.
    assert converter.hashed_fraction("patient00001") == pytest.approx(0.3731, abs=1e-4)
    assert converter.hashed_fraction("train_1") == pytest.approx(0.0250, abs=1e-4)
    splits = [converter.hashed_split(f"key{number}", 0.1, 0.2) for number in range(10_000)]
    assert splits.count("test") == pytest.approx(2000, abs=150)
    assert splits.count("val") == pytest.approx(1000, abs=150)
    assert converter.hashed_split("anything", 0.0) == "train"


def test_check_fractions() -> None:
    converter.check_fractions(0.0, 0.0)
    with pytest.raises(MMVLError, match="test_fraction=1.5: must be at least 0 and below 1"):
        converter.check_fractions(0.1, 1.5)
    with pytest.raises(MMVLError, match="leave some for train"):
        converter.check_fractions(0.6, 0.4)


def test_read_csv_handles_gzip_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "reports.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8-sig", newline="") as handle:
        handle.write("key,report\nA,Clear.\nB\n")
    assert list(converter.read_csv(path, ["key"])) == [{"key": "A", "report": "Clear."}, {"key": "B", "report": ""}]
    path.write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError, match="cannot read CSV"):
        list(converter.read_csv(path, ["key"]))


def test_manifest_writer_replaces_only_after_a_finished_run(tmp_path: Path) -> None:
    assert converter.manifest_path(tmp_path / "out") == tmp_path / "out" / "manifest.jsonl"
    assert converter.manifest_path(tmp_path / "all.jsonl") == tmp_path / "all.jsonl"
    row = {"image": "a.dcm", "report": "Clear.", "split": "val", "study_id": "s1"}
    with converter.ManifestWriter(tmp_path / "out") as writer:
        writer.write(row)
    assert writer.relative(tmp_path / "images" / "a.dcm") == "../images/a.dcm"
    assert json.loads((tmp_path / "out" / "val.jsonl").read_text(encoding="utf-8")) == row
    with pytest.raises(RuntimeError), converter.ManifestWriter(tmp_path / "out") as writer:
        writer.write({**row, "split": "test"})
        raise RuntimeError("interrupted")
    assert (tmp_path / "out" / "test.jsonl").read_text(encoding="utf-8") == ""  # the earlier, finished run
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "manifest.jsonl",
        "test.jsonl",
        "train.jsonl",
        "val.jsonl",
    ]
    with pytest.raises(MMVLError, match="the per-split files take that name"):
        converter.ManifestWriter(tmp_path / "out" / "train.jsonl")
