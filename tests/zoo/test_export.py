"""tools/export.py and mmvl.zoo.export: the entry's files, model card, plain-JSON config without local paths or
patient identifiers, all-or-nothing writes, and zero-shot from the entry by name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import mmvl
from mmvl import zoo
from mmvl.errors import CheckpointError, ConfigError
from mmvl.zoo.export import NotExportable
from tests.conftest import load_tool, write_dicom

LABELS = "pleural effusion,pneumothorax"


def test_entry_files_and_model_card(entry2d):
    files = set(zoo.entry.entry_files(entry2d))
    assert {"model.safetensors", "config.json", "preprocess.json", "README.md", "tokenizer/tokenizer.json",
            "configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
            "text_encoder/model.safetensors", "torchscript/image_encoder.pt", "onnx/image_encoder.onnx",
            "open_clip/open_clip_config.json", "open_clip/open_clip_model.safetensors"} <= files
    assert not any(name.endswith((".bin", ".pth", ".pkl")) for name in files)
    sums = (entry2d / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split("  ", 1)[1] for line in sums) == sorted(files)
    assert zoo.verify_entry(entry2d) == sorted(files)
    card = (entry2d / "README.md").read_text()
    for text in ("license: other", "## Model", "| parameters: total | 30,689 |", "## Training",
                 "| data: manifest file | manifest.jsonl |", "| steps trained (checkpoint) | 7 |", "val/i2t_R@5",
                 "## Intended use and limits", "not a medical device", "## Licence", "| onnx |", "| open_clip |",
                 "Present in this entry: mmvl, open_clip, hf, monai, torchscript, onnx."):
        assert text in card, text
    config = json.loads((entry2d / "config.json").read_text())
    assert config["input"] == {"kind": "2d", "in_chans": 1, "spatial_size": [32, 32]}
    assert config["formats"] == ["mmvl", "open_clip", "hf", "monai", "torchscript", "onnx"]
    assert "Not written" not in card


def test_no_local_paths_or_patient_identifiers_in_the_entry(clip2d_work_dir, tmp_path, one_thread):
    scan = write_dicom(tmp_path / "scans" / "a.dcm", np.full((40, 40), 900, np.uint16))  # PatientID PID-SECRET-0001
    zero_shot = load_tool("zero_shot")
    out = clip2d_work_dir / "zero_shot_scans.csv"
    try:
        assert zero_shot.main([str(clip2d_work_dir), str(scan), "--labels", LABELS, "--out", str(out)]) == 0
        entry = zoo.export(clip2d_work_dir, "private", out=tmp_path / "zoo" / "private").path
    finally:
        out.unlink()
        out.with_suffix(".json").unlink()
    assert json.loads((entry / "prompts.json").read_text())["source"] == "zero_shot_scans.json"
    for path in entry.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (b"SECRET", b"/site/private", str(tmp_path).encode(), str(clip2d_work_dir).encode()):
                assert secret not in data, (path.name, secret)


def test_failed_export_leaves_nothing_and_existing_entries_are_kept(clip2d_work_dir, entry2d, tmp_path, monkeypatch):
    import mmvl.zoo.compiled as compiled

    def broken(context):
        raise CheckpointError("ONNX: embeddings differ")

    zoo_dir = tmp_path / "zoo"
    first = zoo.export(clip2d_work_dir, "kept", out=zoo_dir / "kept", formats="mmvl").path
    before = (first / "SHA256SUMS").read_text()
    monkeypatch.setattr(compiled, "export_onnx", broken)
    with pytest.raises(CheckpointError, match="embeddings differ"):
        zoo.export(clip2d_work_dir, "kept", out=zoo_dir / "kept", formats="mmvl,onnx", overwrite=True)
    assert sorted(p.name for p in zoo_dir.iterdir()) == [".index.lock", "index.json", "kept"]
    assert (first / "SHA256SUMS").read_text() == before
    with pytest.raises(ConfigError, match="an entry exists already"):
        zoo.export(clip2d_work_dir, "kept", out=zoo_dir / "kept")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not a zoo entry"):
        zoo.export(clip2d_work_dir, "other", out=tmp_path / "other")
    with pytest.raises(ConfigError, match="entry name"):
        zoo.export(clip2d_work_dir, "../escape")
    with pytest.raises(ConfigError, match="--formats: unknown 'keras'"):
        zoo.export(clip2d_work_dir, "x", out=zoo_dir / "x", formats="mmvl,keras")


def test_default_formats_are_lean(clip2d_work_dir, tmp_path, monkeypatch, one_thread):
    """By default the entry holds the mmvl format and the transformers text folder only; the card says which
    formats are present and which are opt-in. A format skipped half-way leaves nothing behind."""
    import mmvl.zoo.hf_text as hf_text

    result = zoo.export(clip2d_work_dir, "lean", out=tmp_path / "zoo" / "lean")
    assert result.formats == ["mmvl", "hf"] and result.skipped == {}
    top = {path.name for path in result.path.iterdir()}
    assert top == {"model.safetensors", "config.json", "preprocess.json", "tokenizer",
                   "text_encoder", "README.md", "SHA256SUMS"}, top
    card = (result.path / "README.md").read_text()
    assert "Present in this entry: mmvl, hf." in card
    assert ("Not written (opt-in: `tools/export.py --formats all`, or by name): open_clip, monai, torchscript, "
            "onnx.") in card

    def half_written(context):
        (context.out / "text_encoder").mkdir()
        (context.out / "text_encoder" / "config.json").write_text("{}")
        raise NotExportable("not today")

    monkeypatch.setattr(hf_text, "export_hf_text", half_written)
    result = zoo.export(clip2d_work_dir, "skipped", out=tmp_path / "zoo" / "skipped")
    assert result.formats == ["mmvl"] and result.skipped == {"hf": "not today"}
    assert not (result.path / "text_encoder").exists()
    assert "| hf | not exported: not today | |" in (result.path / "README.md").read_text()


def test_export_tool_and_zero_shot_by_name(clip2d_work_dir, tmp_path, png_images, monkeypatch, capsys, one_thread):
    export = load_tool("export")
    zoo_dir = tmp_path / "zoo"
    code = export.main([str(clip2d_work_dir), "--name", "cli_tiny", "--out", str(zoo_dir / "cli_tiny"),
                        "--formats", "mmvl,torchscript", "--license", "apache-2.0"])
    printed = capsys.readouterr().out
    assert code == 0 and "wrote" in printed and "model.safetensors" in printed and "torchscript: min cosine" in printed
    assert "license: apache-2.0" in (zoo_dir / "cli_tiny" / "README.md").read_text()
    assert export.main(["--verify", str(zoo_dir / "cli_tiny")]) == 0
    (zoo_dir / "cli_tiny" / "preprocess.json").write_text("{}")
    assert export.main(["--verify", str(zoo_dir / "cli_tiny")]) == 1
    assert export.main([str(clip2d_work_dir), "--name", "cli_tiny", "--out", str(zoo_dir / "cli_tiny"),
                        "--overwrite"]) == 0
    assert export.main([str(clip2d_work_dir), "--name", "x", "--formats", "openclip",
                        "--out", str(zoo_dir / "x")]) == 2
    assert "--formats: unknown 'openclip'; did you mean 'open_clip'?" in capsys.readouterr().err
    assert export.main([str(clip2d_work_dir), "--name", "x", "--formats", "auto", "--out", str(zoo_dir / "x")]) == 2
    assert "--formats auto is now --formats all" in capsys.readouterr().err
    assert export.main([str(clip2d_work_dir), "--name", "x", "--parts", "image", "--formats", "open_clip",
                        "--out", str(zoo_dir / "x")]) == 2  # named, but does not apply to an image-only entry
    assert "--formats open_clip: open_clip needs the image and the text tower" in capsys.readouterr().err
    assert not (zoo_dir / "x").exists()

    monkeypatch.setenv("MMVL_ZOO", str(zoo_dir))
    zero_shot = load_tool("zero_shot")
    rows = {}
    for model in ("cli_tiny", str(clip2d_work_dir)):
        out = tmp_path / f"{Path(model).name}.csv"
        assert zero_shot.main([model, str(png_images[0].parent), "--labels", LABELS, "--out", str(out)]) == 0
        rows[model] = list(csv.DictReader(out.open()))
    assert rows["cli_tiny"] == rows[str(clip2d_work_dir)] and len(rows["cli_tiny"]) == 3
    assert json.loads((tmp_path / "cli_tiny.json").read_text())["model"] == str(zoo_dir / "cli_tiny")


@pytest.mark.slow
def test_trained_demo_model_exports_and_classifies(tiny_clip, tmp_path, capsys, one_thread):
    """The tiny CLIP trained on the synthetic CXR set: exported with the default formats (mmvl, hf) and with all
    of them (its ViT goes to open_clip too), then zero-shot from the entry equals zero-shot from the work dir."""
    work_dir, _ = tiny_clip
    export = load_tool("export")
    sizes = {}
    for formats in ([], ["--formats", "all"]):
        out = tmp_path / f"cxr_clip_tiny{'_all' if formats else ''}"
        assert export.main([str(work_dir), "--name", out.name, "--out", str(out), *formats]) == 0
        print(capsys.readouterr().out)  # the file list and sizes (shown with pytest -s)
        config = json.loads((out / "config.json").read_text())
        sizes[bool(formats)] = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    assert config["formats"] == ["mmvl", "open_clip", "hf", "monai", "torchscript", "onnx"]
    assert json.loads((tmp_path / "cxr_clip_tiny" / "config.json").read_text())["formats"] == ["mmvl", "hf"]
    assert sizes[False] < sizes[True] / 2  # the image tower once, not five times
    manifest = zoo.load_pretrained(work_dir).config["data"]["manifest"]
    labels = ["pleural effusion", "cardiomegaly", "pneumothorax", "nodule"]
    expected = mmvl.zero_shot(work_dir, manifest=manifest, labels=labels, limit=8, progress=False)
    got = mmvl.zero_shot(str(tmp_path / "cxr_clip_tiny"), manifest=manifest, labels=labels, limit=8, progress=False)
    assert got == expected and not any(row["error"] for row in got)


def test_card_and_prompts_take_evaluate_results(clip2d_work_dir, tmp_path, one_thread):
    """A tools/evaluate.py --task zero_shot result in the work dir: its metrics go to the card, its prompts to
    prompts.json; its model/manifest paths and unreadable-file list do not."""
    record = {"task": "zero_shot", "model": str(clip2d_work_dir / "checkpoints" / "last.pt"),
              "manifest": "/site/private/manifest.jsonl", "split": "test", "val_split": "val", "n_rows": {"test": 40},
              "n_failed": 1, "failed": [{"path": "/site/private/PID-SECRET-0001/a.dcm", "reason": "corrupt"}],
              "labels": ["nodule"], "preset": "chexzero", "mode": "pairwise",
              "prompts": {"nodule": {"positive": ["nodule"], "negative": ["no nodule"]}},
              "metrics": {"labels": {"nodule": {"auroc": 0.8125, "auroc_ci": [0.7, 0.9], "auroc_n_resamples": 1000,
                                                "threshold": 0.4}},
                          "macro": {"auroc": 0.8125, "f1": 0.5}, "bootstrap": {"seed": 0}}}
    (clip2d_work_dir / "eval_zero_shot.json").write_text(json.dumps(record))
    try:
        entry = zoo.export(clip2d_work_dir, "evaluated", out=tmp_path / "zoo" / "evaluated", formats="mmvl").path
    finally:
        (clip2d_work_dir / "eval_zero_shot.json").unlink()
    card = (entry / "README.md").read_text()
    assert "`tools/evaluate.py --task zero_shot` on split `test` (test: 40 rows; preset `chexzero`" in card
    assert "| labels/nodule/auroc | 0.8125 |" in card and "| labels/nodule/auroc_ci | [0.7000, 0.9000] |" in card
    assert "| macro/f1 | 0.5000 |" in card and "threshold" not in card and "n_resamples" not in card
    prompts = json.loads((entry / "prompts.json").read_text())
    assert prompts["labels"] == ["nodule"] and prompts["source"] == "eval_zero_shot.json"
    for path in entry.rglob("*"):
        if path.is_file():
            assert b"SECRET" not in path.read_bytes() and b"/site/private" not in path.read_bytes(), path.name
