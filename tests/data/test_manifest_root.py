"""Manifest image paths must stay inside the data root (the manifest's folder unless ``root`` says otherwise)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmvl.data.check import check_manifest
from mmvl.data.datasets import ManifestDataset
from mmvl.data.manifest import load_manifest
from mmvl.errors import ManifestError


def write_manifest(path, images):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"image": image, "report": "FINDINGS: clear."}) + "\n" for image in images))
    return path


@pytest.mark.parametrize("image", ["../outside.dcm", "sub/../../outside.dcm", "/etc/passwd"])
def test_paths_escaping_the_manifest_folder_are_refused(tmp_path, image):
    manifest = write_manifest(tmp_path / "set" / "m.jsonl", [image])
    with pytest.raises(ManifestError, match="outside the data root") as info:
        load_manifest(manifest)
    assert info.value.path == str(manifest) and "data.allow_outside_root" in str(info.value)
    rows = load_manifest(manifest, allow_outside_root=True)
    assert rows[0]["image"][0].endswith(image.rsplit("/", 1)[-1])


def test_inside_paths_and_an_explicit_root(tmp_path):
    manifest = write_manifest(tmp_path / "set" / "m.jsonl",
                              ["a.dcm", "sub/../b.dcm", str(tmp_path / "set" / "c.dcm"), "../images/d.dcm"])
    with pytest.raises(ManifestError, match="row 4"):
        load_manifest(manifest)
    rows = load_manifest(manifest, root=tmp_path)  # data.root: a folder above both
    assert [row["image"][0] for row in rows] == [str(tmp_path / "set" / n) for n in ("a.dcm", "b.dcm", "c.dcm")] + [
        str(tmp_path / "images" / "d.dcm")]
    with pytest.raises(ManifestError, match="outside the data root"):  # a sibling whose name extends the root's
        load_manifest(write_manifest(tmp_path / "set2" / "m.jsonl", [str(tmp_path / "set2x" / "a.dcm")]))


def test_dataset_and_check_take_the_root_options(tmp_path, make_dicom):
    make_dicom("images/a.dcm", np.zeros((8, 8), np.uint16))
    manifest = write_manifest(tmp_path / "set" / "m.jsonl", ["../images/a.dcm"])
    pipeline = [dict(type="LoadImage")]
    with pytest.raises(ManifestError, match="outside the data root"):
        ManifestDataset(manifest, pipeline)
    assert len(ManifestDataset(manifest, pipeline, root=tmp_path)) == 1
    assert len(ManifestDataset(manifest, pipeline, allow_outside_root=True)) == 1
    with pytest.raises(ManifestError):
        check_manifest(manifest, progress=False)
    assert check_manifest(manifest, progress=False, root=tmp_path) == (1, [])


def test_tools_take_data_root_flags_and_config(tmp_path, make_dicom, capsys):
    """check_data: --data-root / --allow-outside-root, or data.root from --config; refused otherwise (exit 2)."""
    from tests.conftest import load_tool

    make_dicom("images/a.dcm", np.zeros((8, 8), np.uint16))
    manifest = write_manifest(tmp_path / "set" / "m.jsonl", ["../images/a.dcm"])
    check_data = load_tool("check_data").main
    assert check_data([str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "outside the data root" in err and f"such as {tmp_path}" in err  # the root that would do
    assert check_data([str(manifest), "--data-root", str(tmp_path)]) == 0
    assert check_data([str(manifest), "--allow-outside-root"]) == 0
    config = tmp_path / "cfg.py"
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo" / "cxr_clip_tiny.py"
    config.write_text(f"_base_ = [{str(demo)!r}]\ndata = dict(root={str(tmp_path)!r})\n")  # a training config
    assert check_data([str(manifest), "--config", str(config)]) == 0
