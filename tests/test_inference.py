"""mmvl.inference: input discovery for 2D and 3D models, batched preprocessing with per-file errors, and
zero-shot classification through the API (``mmvl.zero_shot``) and the CLI (tools/zero_shot.py)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmvl
import mmvl.loading
from mmvl.config import Config
from mmvl.data.inputs import find_inputs, input_kind
from mmvl.engine.trainer import Trainer
from mmvl.errors import ConfigError, ManifestError
from mmvl.evaluation.zero_shot import auroc
from tests.conftest import load_script, load_tool, make_phantom, write_ct_series
from tests.data.test_inputs import write_dicomdir_export, write_exam_tree

REPO = Path(__file__).resolve().parents[1]
NIBABEL_DATA = Path(__import__("nibabel").__file__).parent / "tests" / "data"
CXR_FINDINGS = ["pleural effusion", "cardiomegaly", "pneumothorax", "nodule"]  # drawn by datasets/synthetic.py


@pytest.fixture
def mixed_folder(synthetic_cxr, tmp_path) -> Path:
    """DICOM, PNG, NIfTI, a corrupt DICOM, a text file and a hidden file, some in a subfolder."""
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(next((synthetic_cxr.parent / "images").glob("*.dcm")), folder / "a_xray.dcm")
    Image.fromarray((np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)).save(folder / "b_photo.png")
    shutil.copy(NIBABEL_DATA / "anatomical.nii", folder / "sub" / "c_volume.nii")
    (folder / "sub" / "d_corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 40)
    (folder / "e_notes.txt").write_text("not an image\n")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    return folder


def test_input_kinds(mixed_folder, tmp_path):
    kinds = {p.name: input_kind(p) for p in [*mixed_folder.rglob("*"), tmp_path / "missing.png"]}
    assert kinds == {"a_xray.dcm": "dicom", "b_photo.png": "raster", "c_volume.nii": "nifti", "sub": "series",
                     "d_corrupt.dcm": "dicom", "e_notes.txt": "unknown", ".DS_Store": "unknown",
                     "missing.png": "missing"}


def test_find_inputs_for_2d_and_3d_models(mixed_folder, tmp_path):
    flat = find_inputs([mixed_folder, tmp_path / "gone.dcm"])
    names = [Path(item.path).name for item in flat]
    assert names == ["a_xray.dcm", "b_photo.png", "e_notes.txt", "c_volume.nii", "d_corrupt.dcm", "gone.dcm"]
    errors = {Path(item.path).name: item.error for item in flat}
    assert errors["a_xray.dcm"] is None and errors["b_photo.png"] is None and errors["d_corrupt.dcm"] is None
    assert "3D volume (NIfTI); this is a 2D model" in errors["c_volume.nii"]
    assert errors["e_notes.txt"].startswith("unsupported kind: not a DICOM (no DICM preamble), NIfTI")
    assert errors["gone.dcm"] == "no such file or folder"

    volumes = {Path(item.path).name: item.error for item in find_inputs([mixed_folder], volumes=True)}
    # the one DICOM at the top is no series, and the NIfTI volume in the sub-folder is not lost under it
    assert list(volumes) == ["a_xray.dcm", "b_photo.png", "e_notes.txt", "c_volume.nii", "d_corrupt.dcm"]
    assert volumes["c_volume.nii"] is None and "single DICOM slice" in volumes["a_xray.dcm"]
    assert "a 2D image; this is a 3D model" in volumes["b_photo.png"] and volumes["d_corrupt.dcm"]
    series = {Path(item.path).name: item.error for item in find_inputs([mixed_folder / "sub",
                                                                          mixed_folder / "b_photo.png"], True)}
    assert list(series) == ["c_volume.nii", "d_corrupt.dcm", "b_photo.png"] and series["c_volume.nii"] is None
    assert "a 2D image; this is a 3D model" in series["b_photo.png"] and series["d_corrupt.dcm"]


def test_zero_shot_beats_chance_on_held_out_studies(tiny_clip, synthetic_cxr):
    work, _ = tiny_clip
    rows, truth = [], []
    for split in ("val", "test"):
        manifest = synthetic_cxr.parent / f"{split}.jsonl"
        rows += mmvl.zero_shot(work, labels=CXR_FINDINGS, manifest=manifest, preset="chexzero", progress=False)
        truth += [json.loads(line)["labels"] for line in manifest.read_text().splitlines()]
    assert len(rows) == len(truth) == 40 and not any(row["error"] for row in rows)
    scores = {label: auroc([row[label] for row in rows], [t[label] for t in truth]) for label in CXR_FINDINGS}
    print("zero-shot AUROC on 40 held-out studies:", {k: round(v, 3) for k, v in scores.items()})
    assert all(score > 0.5 for score in scores.values()), scores
    assert sum(scores.values()) / len(scores) >= 0.7, scores  # chance is 0.5


def test_zero_shot_api_and_cli_on_a_mixed_folder(tiny_clip, mixed_folder, tmp_path, capsys):
    work, _ = tiny_clip
    rows = mmvl.zero_shot(str(work), mixed_folder, "pleural effusion, nodule", preset="ctclip", progress=False)
    by_name = {Path(row["path"]).name: row for row in rows}
    assert list(by_name) == ["a_xray.dcm", "b_photo.png", "e_notes.txt", "c_volume.nii", "d_corrupt.dcm"]
    for name in ("a_xray.dcm", "b_photo.png"):
        assert by_name[name]["error"] == "" and 0 < by_name[name]["nodule"] < 1
    for name in ("e_notes.txt", "c_volume.nii", "d_corrupt.dcm"):
        assert by_name[name]["error"] and np.isnan(by_name[name]["pleural effusion"])
    assert "DICOM" in by_name["d_corrupt.dcm"]["error"]

    frame = mmvl.zero_shot(str(work), mixed_folder / "a_xray.dcm", ["nodule"], progress=False, as_frame=True)
    assert list(frame.columns) == ["path", "study_id", "view", "nodule", "error"] and len(frame) == 1

    out = tmp_path / "preds.csv"
    code = load_tool("zero_shot").main([str(work), str(mixed_folder), "--labels", "pleural effusion,nodule",
                                        "--preset", "ctclip", "--out", str(out), "--batch-size", "2"])
    assert code == 1  # three of five failed; the others were classified
    csv_rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).name for r in csv_rows] == list(by_name)
    for row in csv_rows:
        expected = by_name[Path(row["path"]).name]
        assert row["error"] == expected["error"]
        if not row["error"]:  # same figures as the API, whatever the batch size
            assert float(row["nodule"]) == pytest.approx(expected["nodule"], abs=1e-5)
        else:
            assert row["nodule"] == row["pleural effusion"] == ""
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["n_failed"] == 3 and sidecar["n_inputs"] == 5 and sidecar["preprocess"] == "2d"
    assert sidecar["mmvl_version"] == mmvl.__version__ and sidecar["mode"] == "pairwise"
    assert "error: 3D volume" in capsys.readouterr().out.replace("a 3D", "3D")


def test_prompt_files_modes_and_errors(tiny_clip, synthetic_cxr, tmp_path, capsys):
    work, _ = tiny_clip
    image = next((synthetic_cxr.parent / "images").glob("*.dcm"))
    prompts = {"positive": ["{} is seen", "there is {}"], "negative": ["no {}"]}
    as_json, as_yaml = tmp_path / "p.json", tmp_path / "p.yaml"
    as_json.write_text(json.dumps(prompts))
    as_yaml.write_text("positive:\n  - '{} is seen'\n  - there is {}\nnegative:\n  - no {}\n")
    from_json = mmvl.zero_shot(work, image, CXR_FINDINGS, preset=str(as_json), progress=False)
    from_yaml = mmvl.zero_shot(work, image, CXR_FINDINGS, preset=as_yaml, progress=False)
    from_dict = mmvl.zero_shot(work, image, CXR_FINDINGS, preset=prompts, progress=False)
    assert from_json == from_yaml == from_dict
    assert from_json != mmvl.zero_shot(work, image, CXR_FINDINGS, preset="chexzero", progress=False)
    multiclass = mmvl.zero_shot(work, [image, image], CXR_FINDINGS, mode="multiclass", progress=False)
    assert sum(multiclass[0][label] for label in CXR_FINDINGS) == pytest.approx(1.0, abs=1e-5)
    assert multiclass[0] == multiclass[1]
    with pytest.raises(ConfigError, match="unknown prompt preset 'nope'"):
        mmvl.zero_shot(work, image, ["nodule"], preset="nope")
    with pytest.raises(ConfigError, match="no labels"):
        mmvl.zero_shot(work, image, " , ")
    with pytest.raises(ConfigError, match="no inputs"):
        mmvl.zero_shot(work, [], ["nodule"])
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    tool = load_tool("zero_shot")
    assert tool.main([str(work), str(image), "--labels", "nodule", "--preset", str(tmp_path / "bad.yaml")]) == 2
    assert "a prompt file holds a mapping" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_ct_model(tmp_path_factory):
    """A 3D CLIP model (one step of configs/demo/ct_clip_tiny.py made tiny) and the synthetic CT it saw."""
    out = tmp_path_factory.mktemp("ct")
    manifests = load_script("synthetic_ct").generate_ct(out / "data", n=6, size=32, slices=16, progress=False)
    cfg = Config.fromfile(REPO / "configs" / "demo" / "ct_clip_tiny.py")
    cfg.merge_options([f"data.manifest={manifests['nifti']}", "data.val_split=test", "model.image_encoder.num_layers=1",
                       "model.image_encoder.hidden_size=32", "model.image_encoder.mlp_dim=64",
                       "model.image_encoder.num_heads=2", "model.text_encoder.config.hidden_size=32",
                       "model.text_encoder.config.num_attention_heads=2",
                       "model.text_encoder.config.intermediate_size=64",
                       "model.heads.0.embed_dim=32", "train.batch_size=4", "train.max_steps=1", "train.num_workers=0",
                       "optim.warmup_steps=0"])
    Trainer(cfg, out / "run").fit()
    return out / "run", out / "data"


def test_zero_shot_on_volumes_with_a_3d_model(tiny_ct_model, mixed_folder, tmp_path):
    work, data = tiny_ct_model
    study = "ct000000"
    inputs = [data / "dicom" / study, data / "nifti" / f"{study}.nii.gz", mixed_folder / "b_photo.png",
              mixed_folder / "e_notes.txt"]
    rows = mmvl.zero_shot(work, inputs, ["pleural effusion", "emphysema"], preset="ctclip", progress=False)
    series, nifti, photo, notes = rows
    assert series["error"] == nifti["error"] == ""
    # the DICOM series and its NIfTI copy are the same volume after the recorded preprocessing
    assert series["emphysema"] == pytest.approx(nifti["emphysema"], abs=1e-4)
    assert "a 2D image; this is a 3D model" in photo["error"]
    assert notes["error"].startswith("unsupported kind: not a DICOM")
    # a folder of study folders: one input per series
    found = mmvl.zero_shot(work, data / "dicom", ["emphysema"], progress=False)
    assert [Path(row["path"]).name for row in found] == [f"ct{i:06d}" for i in range(6)]
    assert all(row["error"] == "" for row in found)


def test_every_scan_of_an_exam_tree_through_the_api_and_the_cli(tiny_ct_model, tmp_path):
    """Two series folders, a NIfTI file, a stray DICOM and a text file at the top, a third series and NIfTI
    below: five scans and two error rows, none lost under a folder taken whole."""
    work, _ = tiny_ct_model
    tree = write_exam_tree(tmp_path / "exam")
    rows = mmvl.zero_shot(work, tree, ["emphysema"], progress=False)
    scans = sorted(Path(row["path"]).relative_to(tree).as_posix() for row in rows if not row["error"])
    assert scans == ["ct3.nii.gz", "more/ct4.nii", "more/series_c", "series_a", "series_b"]
    assert len(rows) == 7 and all(0 < row["emphysema"] < 1 for row in rows if not row["error"])
    out = tmp_path / "tree.csv"
    assert load_tool("zero_shot").main([str(work), str(tree), "--labels", "emphysema", "--out", str(out)]) == 1
    csv_rows = list(csv.DictReader(out.open()))
    assert len(csv_rows) == 7 and sum(not row["error"] for row in csv_rows) == 5
    assert json.loads(out.with_suffix(".json").read_text())["n_failed"] == 2


def test_a_dicomdir_export_through_the_api_and_the_cli(tiny_ct_model, tmp_path):
    work, _ = tiny_ct_model
    write_dicomdir_export(tmp_path / "source", tmp_path / "cd")
    rows = mmvl.zero_shot(work, tmp_path / "cd", ["emphysema"], progress=False)
    assert len(rows) == 2 and not any(row["error"] for row in rows)
    out = tmp_path / "cd.csv"
    assert load_tool("zero_shot").main([str(work), str(tmp_path / "cd"), "--labels", "emphysema",
                                        "--out", str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) == 2


def test_allow_gaps_reads_a_gapped_series_refused_without_it(tiny_ct_model, tmp_path, capsys):
    work, _ = tiny_ct_model
    written = write_ct_series(tmp_path / "gapped", make_phantom((12, 10, 8)), instance_order="position")
    written["paths"][3].unlink()
    tool, out = load_tool("zero_shot"), tmp_path / "gaps.csv"
    assert tool.main([str(work), str(tmp_path / "gapped"), "--labels", "emphysema", "--out", str(out)]) == 1
    refused = next(csv.DictReader(out.open()))["error"]
    assert "missing slice" in refused and "--allow-gaps" in refused  # the message names the flag that reads it
    assert tool.main([str(work), str(tmp_path / "gapped"), "--labels", "emphysema", "--out", str(out),
                      "--allow-gaps"]) == 0
    assert next(csv.DictReader(out.open()))["error"] == ""
    assert json.loads(out.with_suffix(".json").read_text())["reader_options"] == {"allow_gaps": True}
    assert tool.main([str(work), str(tmp_path / "gapped"), "--labels", "emphysema", "--out", str(out),
                      "--reader-option", "allow_gaps=true"]) == 0
    rows = mmvl.zero_shot(work, tmp_path / "gapped", ["emphysema"], progress=False,
                          reader_options={"allow_gaps": True})
    assert rows[0]["error"] == ""
    assert tool.main([str(work), str(tmp_path / "gapped"), "--labels", "emphysema", "--out", str(out),
                      "--reader-option", "allow_gap=true"]) == 2
    assert "Did you mean 'allow_gaps'" in capsys.readouterr().err


def test_labels_from_the_zoo_entry_prompts(tiny_clip, synthetic_cxr, tmp_path):
    from mmvl import zoo

    work, _ = tiny_clip
    record = {"labels": ["nodule", "pneumothorax"],
              "prompts": {"nodule": {"positive": ["a nodule"], "negative": ["no nodule"]},
                          "pneumothorax": {"positive": ["pneumothorax"], "negative": ["no pneumothorax"]}}}
    entry = zoo.export(work, "tiny-cxr", out=tmp_path / "zoo" / "tiny-cxr", formats=["mmvl"], prompts=record).path
    image = next((synthetic_cxr.parent / "images").glob("*.dcm"))
    rows = mmvl.zero_shot(entry, image, progress=False)
    assert list(rows[0]) == ["path", "study_id", "view", "nodule", "pneumothorax", "error"]
    out = tmp_path / "entry.csv"
    assert load_tool("zero_shot").main([str(entry), str(image), "--out", str(out)]) == 0
    row = next(csv.DictReader(out.open()))
    assert float(row["nodule"]) == pytest.approx(rows[0]["nodule"], abs=1e-5)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["labels"] == record["labels"] and sidecar["prompts"]["nodule"]["positive"] == ["a nodule"]


def test_arguments_are_checked_with_clear_errors(tiny_clip, synthetic_cxr, tmp_path, capsys):
    work, _ = tiny_clip
    image = next((synthetic_cxr.parent / "images").glob("*.dcm"))
    with pytest.raises(ConfigError, match="no inputs"):
        mmvl.zero_shot(work, None, ["nodule"])
    with pytest.raises(ConfigError, match="model must be a work dir"):
        mmvl.zero_shot(None, image, ["nodule"])
    with pytest.raises(ConfigError, match="labels must be label names"):
        mmvl.zero_shot(work, image, 3)
    with pytest.raises(ConfigError, match="inputs must be a path"):
        mmvl.zero_shot(work, [image, 7], ["nodule"])
    with pytest.raises(ConfigError, match="batch_size"):
        mmvl.zero_shot(work, image, ["nodule"], batch_size=0)
    with pytest.raises(ConfigError, match="mode 'multiclass'.*every probability is 1.0"):
        mmvl.zero_shot(work, image, ["nodule"], mode="multiclass")
    tool = load_tool("zero_shot")
    assert tool.main([str(work), str(image), "--labels", "nodule", "--mode", "multiclass",
                      "--out", str(tmp_path / "p.csv")]) == 2
    assert "give two or more labels" in capsys.readouterr().err
    assert tool.main([str(work), str(image), "--out", str(tmp_path / "p.csv")]) == 2
    assert "give --labels" in capsys.readouterr().err


def test_manifests_default_to_the_trained_data_root(tiny_clip, synthetic_cxr, tmp_path, monkeypatch, capsys):
    work, _ = tiny_clip
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next((synthetic_cxr.parent / "images").glob("*.dcm")), images / "x.dcm")
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "m.jsonl"
    manifest.write_text(json.dumps({"image": "../images/x.dcm", "report": "r"}) + "\n")
    loaded = mmvl.loading.load_model(work)
    with pytest.raises(ManifestError, match="outside the data root"):  # the manifest's folder by default
        mmvl.zero_shot(loaded, labels=["nodule"], manifest=manifest, progress=False)
    trained = dataclasses.replace(loaded, config={**loaded.config, "data": {**loaded.config["data"],
                                                                            "root": str(tmp_path)}})
    rows = mmvl.zero_shot(trained, labels=["nodule"], manifest=manifest, progress=False)
    assert len(rows) == 1 and rows[0]["error"] == ""
    tool = load_tool("zero_shot")
    monkeypatch.setattr(tool, "load_model", lambda model, device=None: trained)
    out = tmp_path / "m.csv"
    assert tool.main([str(work), "--manifest", str(manifest), "--labels", "nodule", "--out", str(out)]) == 0
    assert tool.main([str(work), "--manifest", str(manifest), "--labels", "nodule", "--out", str(out),
                      "--data-root", str(tmp_path / "lists")]) == 2
    assert "outside the data root" in capsys.readouterr().err


def test_evaluate_takes_the_reader_options(tiny_clip, synthetic_cxr, tmp_path, capsys):
    work, _ = tiny_clip
    evaluate, out = load_tool("evaluate"), tmp_path / "metrics.json"
    common = [str(work), "--manifest", str(synthetic_cxr), "--task", "retrieval", "--out", str(out), "--limit", "8"]
    assert evaluate.main([*common, "--reader-option", "voi=minmax"]) == 0
    record = json.loads(out.read_text())
    assert record["reader_options"] == {"voi": "minmax"} and record["n_failed"] == 0
    assert evaluate.main([*common, "--allow-gaps"]) == 2  # a 2D reader has no such option: refused, not ignored
    assert "unknown key 'reader_options.allow_gaps' in transform 'LoadImage'" in capsys.readouterr().err
