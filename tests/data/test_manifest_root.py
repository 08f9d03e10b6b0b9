"""Manifest image paths must stay inside the data root (the manifest's folder unless ``root`` says otherwise); the
refusal names every escaping row and suggests a root no wider than the images' common folder, never a system
folder; tools running a trained model take the root it was trained with."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mmvl.data.check import check_manifest
from mmvl.data.datasets import ManifestDataset
from mmvl.data.manifest import (
    add_root_arguments,
    load_manifest,
    root_options,
    suggest_root,
    too_wide_for_root,
    trained_root,
)
from mmvl.errors import ConfigError, ManifestError


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
    if image == "/etc/passwd":  # its folder is a system folder: no root is suggested, certainly not "/"
        assert "no safe data root can be suggested" in str(info.value) and "such as" not in str(info.value)
    else:
        assert f"such as {tmp_path} (their common folder)" in str(info.value)
    rows = load_manifest(manifest, allow_outside_root=True)
    assert rows[0]["image"][0].endswith(image.rsplit("/", 1)[-1])


def test_every_escaping_row_is_named_in_one_error(tmp_path):
    images = ["a.dcm", "../images/b.dcm", "c.dcm", *(f"../images/sub/{i}.dcm" for i in range(12))]
    manifest = write_manifest(tmp_path / "set" / "m.jsonl", images)
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert f"13 rows with image (or mask) paths outside the data root {tmp_path / 'set'}" in message
    assert f"row 2: {tmp_path / 'images' / 'b.dcm'}" in message and "row 1:" not in message
    assert f"row 12: {tmp_path / 'images' / 'sub' / '8.dcm'}" in message  # the first ten, then a count
    assert "row 13:" not in message and "and 3 more rows" in message
    assert f"such as {tmp_path} (their common folder)" in message  # rows 1 and 3 lie in set/: tmp_path holds all
    rows = load_manifest(manifest, keep_outside_root=True)
    assert [row["line"] for row in rows if row.get("outside_root")] == list(range(2, 3)) + list(range(4, 16))


def test_suggested_roots_are_the_common_folder_and_never_a_system_folder(tmp_path):
    assert suggest_root([tmp_path / "a" / "x.dcm"]) == str(tmp_path / "a")  # a single image: its folder
    assert suggest_root([tmp_path / "a" / "b" / "x.dcm", tmp_path / "a" / "c" / "y.dcm"]) == str(tmp_path / "a")
    assert suggest_root([]) is None
    home = os.path.expanduser("~")
    for images in (["/etc/passwd"], ["/etc/passwd", str(tmp_path / "a.dcm")], [os.path.join(home, ".bashrc")],
                   [os.path.join(tempfile.gettempdir(), "x.dcm")], ["/usr/lib/x.so", "/usr/bin/y"], ["/x.dcm"]):
        assert suggest_root(images) is None, images
    for folder in ("/", "/etc", "/tmp", "/home", "/var", home, tempfile.gettempdir()):
        assert too_wide_for_root(folder), folder
    assert not too_wide_for_root(tmp_path) and not too_wide_for_root(os.path.join(home, "data"))


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
    assert check_manifest(manifest, progress=False, root=tmp_path) == (1, [])
    n_rows, problems = check_manifest(manifest, progress=False)
    assert n_rows == 1 and [(p.line, p.kind) for p in problems] == [(1, "outside_root")]
    assert problems[0].path == str(tmp_path / "images" / "a.dcm")
    assert problems[0].reason == f"outside the data root {tmp_path / 'set'}"


def test_check_lists_every_escaping_row_and_reads_none_of_them(tmp_path, make_dicom):
    """One run lists them all; escaping files are neither read nor looked for (missing.dcm is not 'missing')."""
    make_dicom("set/a.dcm", np.zeros((8, 8), np.uint16))
    manifest = write_manifest(tmp_path / "set" / "m.jsonl", ["a.dcm", "/etc/passwd", "../missing.dcm", "b.dcm"])
    n_rows, problems = check_manifest(manifest, progress=False)
    assert n_rows == 4
    assert [(p.line, p.path, p.kind) for p in problems] == [
        (2, "/etc/passwd", "outside_root"), (3, str(tmp_path / "missing.dcm"), "outside_root"),
        (4, str(tmp_path / "set" / "b.dcm"), "missing_file")]


def test_tools_take_data_root_flags_and_config(tmp_path, make_dicom, capsys):
    """check_data: --data-root / --allow-outside-root, or data.root from --config; refused otherwise (exit 2)."""
    from tests.conftest import load_tool

    make_dicom("images/a.dcm", np.zeros((8, 8), np.uint16))
    manifest = write_manifest(tmp_path / "set" / "m.jsonl", ["../images/a.dcm"])
    check_data = load_tool("check_data").main
    assert check_data([str(manifest)]) == 1  # listed as a problem of its row
    out = capsys.readouterr().out
    assert f"line 1: {tmp_path / 'images' / 'a.dcm'}: [outside_root] outside the data root {tmp_path / 'set'}" in out
    assert f"such as {tmp_path / 'images'} (their common folder)" in out  # the root that would do, no wider
    assert check_data([str(manifest), "--data-root", str(tmp_path)]) == 0
    assert check_data([str(manifest), "--allow-outside-root"]) == 0
    config = tmp_path / "cfg.py"
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo" / "cxr_clip_tiny.py"
    config.write_text(f"_base_ = [{str(demo)!r}]\ndata = dict(root={str(tmp_path)!r})\n")  # a training config
    assert check_data([str(manifest), "--config", str(config)]) == 0


def test_check_data_lists_all_escaping_rows_with_their_count(tmp_path, capsys):
    from tests.conftest import load_tool

    manifest = write_manifest(tmp_path / "set" / "m.jsonl", ["/etc/passwd", "../x/a.dcm", "ok.dcm", "/etc/shadow"])
    assert load_tool("check_data").main([str(manifest), "--no-read"]) == 1
    out = capsys.readouterr().out
    for line, path in ((1, "/etc/passwd"), (2, str(tmp_path / "x" / "a.dcm")), (4, "/etc/shadow")):
        assert f"line {line}: {path}: [outside_root]" in out
    assert "3 rows with images outside the data root: no safe data root can be suggested: the images' common " \
           "folder is /" in out and "such as" not in out
    assert "3 outside_root" in out and "1 missing_file" in out


def options(*argv):
    parser = argparse.ArgumentParser()
    add_root_arguments(parser)
    return parser.parse_args(list(argv))


def test_root_options_default_to_the_recorded_data_root(tmp_path):
    """The one lookup evaluate.py, generate_reports.py and zero_shot.py share: flags, else data.root recorded with
    the model (work dir config or zoo config.json), else None (the manifest's folder)."""
    trained = {"data": {"root": str(tmp_path / "data"), "allow_outside_root": True}}
    assert root_options(options(), trained) == {"root": str(tmp_path / "data"), "allow_outside_root": False}
    assert root_options(options(), {"data": {"root": None}}) == {"root": None, "allow_outside_root": False}
    assert root_options(options(), {"data": {"report_sections": ["findings"]}}) == {"root": None,
                                                                                    "allow_outside_root": False}
    assert root_options(options(), None) == {"root": None, "allow_outside_root": False}
    assert root_options(options("--data-root", "/srv/x/images"), trained) == {"root": "/srv/x/images",
                                                                             "allow_outside_root": False}
    assert root_options(options("--allow-outside-root"), trained)["allow_outside_root"] is True
    with pytest.raises(ConfigError, match="model.pt: its recorded data.root / would let a manifest read"):
        root_options(options(), {"data": {"root": "/"}}, source="model.pt")
    assert root_options(options("--data-root", "/"), {"data": {"root": "/"}})["root"] == "/"  # the user's choice
    # the same lookup without argparse, for library functions (mmvl.zero_shot's data_root=None)
    assert trained_root(trained) == {"root": str(tmp_path / "data"), "allow_outside_root": False}
    assert trained_root(trained, tmp_path / "x") == {"root": str(tmp_path / "x"), "allow_outside_root": False}
    assert trained_root(trained, allow_outside_root=True) == {"root": None, "allow_outside_root": True}


def test_mask_paths_are_held_to_the_data_root_as_images_are(tmp_path):
    """A row's ``masks`` are files the loader reads, so one escaping the data root (``../``, an absolute path
    elsewhere, one entry of a per-image list) is refused like an escaping image, named with its row, and the
    suggested root holds it; masks inside the root pass."""
    rows = [{"image": "a.png", "report": "r", "masks": {"effusion": "masks/a.png"}},
            {"image": "b.png", "report": "r", "masks": {"effusion": "../elsewhere/b.png"}},
            {"image": ["c.png", "d.png"], "report": "r", "masks": {"nodule": [None, "/etc/passwd"]}}]
    manifest = tmp_path / "set" / "m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert "2 rows with image (or mask) paths outside the data root" in message
    assert f"row 2: {tmp_path / 'elsewhere' / 'b.png'}" in message and "row 3: /etc/passwd" in message
    assert "row 1:" not in message and "no safe data root can be suggested" in message  # /etc/passwd: none
    kept = load_manifest(manifest, keep_outside_root=True)
    assert [row.get("outside_root") for row in kept] == [None, [str(tmp_path / "elsewhere" / "b.png")],
                                                         ["/etc/passwd"]]
    rows[2]["masks"] = {"nodule": [None, "masks/d.png"]}
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ManifestError, match=f"such as {tmp_path} \\(their common folder\\)"):
        load_manifest(manifest)
    assert load_manifest(manifest, root=tmp_path)[1]["image"] == [str(tmp_path / "set" / "b.png")]
