"""Segmentation fine-tuning (issue 19, last part): UNETR and SwinUNETR decoders of MONAI's blocks on mmvl's
encoders (2D and 3D shapes), the Dice + BCE loss against MONAI's DiceCELoss, validation Dice from voxel counts
against hand-computed values, masks carried through the preprocessing with the image, a tiny 3D fine-tune on a
test-made blob set beating its untrained self, sliding-window inference, export -> predict round trip (NIfTI with
the scan's affine, PNG at the image's size), the LoRA mode leaving base weights alone, and config refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmvl.engine.trainer import Trainer
from mmvl.errors import ConfigError, ManifestError
from mmvl.models import build_model
from mmvl.models.heads.segmentation import (
    THRESHOLDS,
    SegmentationHead,
    choose_dice_thresholds,
    dice_counts,
    dice_from_counts,
)
from tests.finetune.conftest import TINY_3D, finetune_config

VIT3D = dict(type="vit3d", img_size=16, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)
VIT2D = dict(type="vit2d", model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
             num_heads=2)
SWIN3D = dict(type="swin3d", embed_dim=6, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2)


def segmenter(encoder: dict, mode: str = "full", labels=("a", "b"), **head):
    head = dict(type="segmentation", name="seg", label_names=list(labels), feature_size=4, **head)
    return build_model(dict(image_encoder=encoder, heads=[head], mode=mode))


# -- decoders ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder, size, decoder", [
    (VIT3D, (16, 16, 16), "UnetrDecoder"),
    ({**VIT3D, "img_size": (16, 16, 8), "patch_size": (8, 8, 4)}, (16, 16, 8), "UnetrDecoder"),  # anisotropic
    (VIT2D, (32, 32), "UnetrDecoder"),
    (SWIN3D, (64, 64, 64), "SwinUnetrDecoder"),  # the last stage at 1/32: 2^3 (instance norm needs > 1 voxel)
])
def test_decoder_gives_a_logit_per_label_and_voxel(one_thread, encoder, size, decoder):
    torch.manual_seed(0)
    model = segmenter(encoder, roi_size=size).eval()
    head = model.heads["seg"]
    assert type(head.decoder).__name__ == decoder
    images = torch.randn(1, 1, *size)
    with torch.no_grad():
        logits = head.logits(model.image_encoder(images, hidden_states=True), images)
    assert logits.shape == (1, 2, *size) and torch.isfinite(logits).all()
    if decoder == "UnetrDecoder" and len(size) == 3:  # UNETR's skips: 1 of 2 blocks for an 8-voxel patch (3 levels)
        assert head.decoder.levels == 3 and head.decoder.skip_layers == [1, 1]


def test_sliding_window_segments_a_volume_larger_than_the_roi(one_thread):
    torch.manual_seed(0)
    model = segmenter(VIT3D).eval()
    volume = torch.randn(1, 1, 24, 20, 40)  # every side but one beyond the 16^3 ROI, one not a multiple of it
    logits = model.heads["seg"].predict_logits(model.image_encoder, volume)
    assert logits.shape == (1, 2, 24, 20, 40) and torch.isfinite(logits).all()
    # at the ROI size, one pass: the same as the head on the encoder's output
    roi = volume[..., :16, :16, :16]
    direct = model.heads["seg"].logits(model.image_encoder(roi, hidden_states=True), roi)
    torch.testing.assert_close(model.heads["seg"].predict_logits(model.image_encoder, roi), direct)


# -- loss and Dice ------------------------------------------------------------------------------------------------
def test_loss_is_monai_dice_ce_per_label(one_thread):
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    model = segmenter(VIT3D, labels=("a", "b", "c"))
    head: SegmentationHead = model.heads["seg"]
    logits = torch.randn(3, 3, 6, 5, 4)
    targets = (torch.rand(3, 3, 6, 5, 4) > 0.7).float()
    targets[:, 2] = 0  # a label absent from the whole batch
    monai = DiceCELoss(sigmoid=True, batch=True)
    one_label = [monai(logits[:, k:k + 1], targets[:, k:k + 1]) for k in range(3)]
    # float32 sums over 360 voxels, a few ulps apart in order of summation
    torch.testing.assert_close(head.loss(logits, targets), torch.stack(one_label).mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.loss(logits[:, :1], targets[:, :1]), one_label[0], rtol=1e-6, atol=1e-6)


def test_dice_per_label_from_voxel_counts_equals_hand_computed():
    probabilities = torch.zeros(2, 3, 4, 4)
    targets = torch.zeros(2, 3, 4, 4)
    # label 0: sample 0 predicts 4 voxels, 3 of them in a 6-voxel target; sample 1 has 2 false positives
    targets[0, 0, 0, :] = targets[0, 0, 1, :2] = 1
    probabilities[0, 0, 0, :3] = probabilities[0, 0, 3, 3] = 0.9
    probabilities[1, 0, 2, :2] = 0.6
    # label 1: perfect at 0.5, lost at 0.7 (probabilities 0.6)
    targets[:, 1, 1, 1] = 1
    probabilities[:, 1, 1, 1] = 0.6
    # label 2: absent and never predicted
    counts = dice_counts(probabilities, targets)
    assert counts.shape == (2, 3, len(THRESHOLDS), 3)
    dice = dice_from_counts(counts.numpy())
    at = {t: THRESHOLDS.index(t) for t in (0.5, 0.7)}
    assert dice[0, at[0.5]] == pytest.approx(2 * 3 / ((4 + 2) + 6))  # 0.5: 3 of 6 predicted voxels right
    assert dice[0, at[0.7]] == pytest.approx(2 * 3 / (4 + 6))  # 0.7: the 0.6 false positives gone
    assert dice[1, at[0.5]] == pytest.approx(1.0) and dice[1, at[0.7]] == 0.0
    assert np.isnan(dice[2]).all()
    head = segmenter(VIT3D, labels=("a", "b", "c")).heads["seg"]
    metrics = head.evaluate(counts.numpy())
    assert metrics["dice/a"] == pytest.approx(0.5) and metrics["dice/b"] == pytest.approx(1.0)
    assert np.isnan(metrics["dice/c"]) and metrics["mean_dice"] == pytest.approx(0.75)
    # MONAI's Dice of the whole split as one volume gives the same
    from monai.metrics import compute_dice

    flat = lambda x: x.permute(1, 0, 2, 3).reshape(1, 3, 8, 4)  # noqa: E731  the two samples side by side
    monai = compute_dice((flat(probabilities) >= 0.5).float(), flat(targets), include_background=True)
    assert monai[0, 0].item() == pytest.approx(metrics["dice/a"]) and monai[0, 1].item() == pytest.approx(1.0)
    thresholds, sources = choose_dice_thresholds(counts.numpy(), ["a", "b", "c"])
    assert thresholds[0] >= 0.6 and thresholds[1] <= 0.6 and thresholds[2] == 0.5 and "no voxel" in sources[2]
    missed = counts.clone()
    missed[:, 0, :, 0] = 0  # label a never overlaps its target: 0.5 stays, not the lowest threshold
    assert choose_dice_thresholds(missed.numpy(), ["a", "b", "c"])[0][0] == 0.5


# -- data ---------------------------------------------------------------------------------------------------------
def write_blob_set(out: Path, n: int = 80, n_train: int = 56, size: int = 16) -> Path:
    """``n`` CT-like NIfTI volumes (``size``^3 voxels of 16 mm, a soft-tissue body in air) with two findings and
    their masks: "mass" (a dense 4^3 cube, in 60% of them) and "cyst" (a sphere of radius 2 at -300 HU, in 60%)."""
    import nibabel as nib

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    index = np.stack(np.meshgrid(*(np.arange(size),) * 3, indexing="ij"))
    body = ((index - (size - 1) / 2) ** 2).sum(0) < (0.45 * size) ** 2
    affine = np.diag([16.0, 16.0, 16.0, 1.0])
    rows = []
    for k in range(n):
        volume = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, body.shape)
        masks = {}
        if rng.random() < 0.6:
            x, y, z = rng.integers(4, size - 8, size=3)
            mask = np.zeros(body.shape, np.uint8)
            mask[x:x + 4, y:y + 4, z:z + 4] = 1
            masks["mass"] = mask
        if rng.random() < 0.6:
            centre = rng.integers(5, size - 5, size=3)
            masks["cyst"] = (((index - centre[:, None, None, None]) ** 2).sum(0) <= 4).astype(np.uint8)
        for label, value in (("mass", 500.0), ("cyst", -300.0)):
            if label in masks:
                volume[masks[label] > 0] = value
                nib.save(nib.Nifti1Image(masks[label], affine), out / f"{k:04d}_{label}.nii.gz")
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), out / f"{k:04d}.nii.gz")
        rows.append({"image": f"{k:04d}.nii.gz", "report": "IMPRESSION: blob.", "study_id": f"blob{k:04d}",
                     "masks": {label: f"{k:04d}_{label}.nii.gz" for label in masks},
                     "split": "train" if k < n_train else "val"})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return manifest


@pytest.fixture(scope="module")
def blob_seg(tmp_path_factory) -> Path:
    return write_blob_set(tmp_path_factory.mktemp("blob_seg"))


SEG_3D = ["spacing=(16.0,16.0,16.0)", "volume_size=(16,16,16)", "model.image_encoder.patch_size=(8,8,8)",
          "model.heads.0.label_names=['mass','cyst']", "model.heads.0.feature_size=4", "data.cache=None",
          "train.batch_size=8", "optim.lr=3e-3"]


def seg_config(manifest: Path, *options: str):
    """configs/finetune/seg_unetr_ct_tiny.py on the blob set, without augmentation (MONAI's random affine would
    take most of a test's time)."""
    cfg = finetune_config("seg_unetr_ct_tiny", manifest, *SEG_3D, *options, size="3d")
    cfg.data.train_pipeline = cfg.data.eval_pipeline
    return cfg


def test_masks_follow_the_image_through_the_pipeline(tmp_path):
    """A volume stored LPS (x and y reversed), reoriented to RAS and cropped: the mask still covers the mass; an
    absent label is an empty mask; a missing mask file is refused naming it."""
    import nibabel as nib

    from mmvl.data.datasets import ManifestDataset

    volume = np.full((12, 10, 8), -1000.0, np.float32)
    volume[5:8, 4:7, 3:6] = 500.0
    mask = (volume > 0).astype(np.uint8)
    lps = np.diag([-16.0, -16.0, 16.0, 1.0])
    nib.save(nib.Nifti1Image(volume, lps), tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(mask, lps), tmp_path / "scan_mass.nii.gz")
    rows = [{"image": "scan.nii.gz", "report": "x", "masks": {"mass": "scan_mass.nii.gz"}, "split": "train"}]
    (tmp_path / "m.jsonl").write_text(json.dumps(rows[0]) + "\n")
    pipeline = [dict(type="LoadVolume"), dict(type="Orient", axcodes="RAS"), dict(type="IntensityWindow"),
                dict(type="CropOrPad", size=(8, 8, 8), pad_value=0.0),
                dict(type="RandomAugment3D", flip_axes=(0, 1), flip_prob=1.0, rotate=0, scale=0, intensity_shift=0)]
    item = ManifestDataset(tmp_path / "m.jsonl", pipeline, mask_labels=["mass", "absent"])[(0, 7)]
    image, masks = item["image"][0], item["masks"]
    assert masks.shape == (2, 8, 8, 8) and masks[1].sum() == 0
    assert torch.equal(masks[0] > 0, image > 0.5) and masks[0].sum() == 27  # the whole mass, on the image's mass
    rows[0]["masks"] = {"mass": "gone.nii.gz"}
    (tmp_path / "m.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ManifestError, match="gone.nii.gz"):
        ManifestDataset(tmp_path / "m.jsonl", pipeline, mask_labels=["mass"])


def test_disk_and_memory_caches_hold_the_masks(blob_seg, tmp_path):
    from mmvl.data.datasets import ManifestDataset

    pipeline = seg_config(blob_seg).data.eval_pipeline
    common = dict(manifest=blob_seg, pipeline=pipeline, split="val", mask_labels=["mass", "cyst"])
    plain = ManifestDataset(**common)
    for cache in ("disk", "memory"):
        cached = ManifestDataset(**common, cache=cache, cache_dir=tmp_path / "cache")
        for index in (0, 5):  # disk: the first read fills the entry, the second is a hit
            for _ in range(2):
                assert torch.equal(cached[index]["masks"], plain[index]["masks"])
    assert sum(float(plain[i]["masks"].sum()) for i in range(len(plain))) > 0


def test_2d_masks_are_resized_and_padded_with_the_image(synthetic_cxr):
    from mmvl.data.datasets import ManifestDataset

    pipeline = [dict(type="LoadImage"), dict(type="ResizePad", size=32)]
    dataset = ManifestDataset(synthetic_cxr, pipeline, mask_labels=["cardiomegaly", "nodule"])
    found = next(k for k, row in enumerate(dataset.rows) if (row.get("masks") or {}).get("cardiomegaly"))
    item = dataset[found]
    assert item["masks"].shape == (2, 32, 32) and item["masks"][0].sum() > 0
    assert set(item["masks"].unique().tolist()) <= {0.0, 1.0}


# -- training -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_seg(blob_seg, tmp_path_factory):
    """The tiny 3D segmenter fine-tuned on the blob set (30 steps), with its untrained validation metrics."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("seg_run") / "run"
    cfg = seg_config(blob_seg, "train.max_steps=30", "train.val_interval=30", "train.ckpt_interval=30")
    trainer = Trainer(cfg, work)
    before = trainer.validate()
    after = trainer.fit()
    return work, before, after


def test_tiny_3d_fine_tune_beats_its_untrained_self(trained_seg):
    work, before, after = trained_seg
    assert {"val/seg/dice/mass", "val/seg/dice/cyst", "val/seg/mean_dice", "val/seg/loss"} <= set(after)
    # untrained: the sigmoid at ~0.5 everywhere marks the whole volume; trained: the findings
    assert after["val/seg/mean_dice"] > before["val/seg/mean_dice"] + 0.2, (before, after)
    assert after["val/seg/loss"] < before["val/seg/loss"]
    assert (work / "checkpoints" / "best.pt").exists()


def test_export_then_predict_writes_masks_on_the_scan(trained_seg, blob_seg, tmp_path):
    import nibabel as nib

    from mmvl import predict
    from mmvl.zoo.export import export

    work, _, after = trained_seg
    result = export(work, "seg_blob", out=tmp_path / "zoo" / "seg_blob", index=False)
    record = result.config["segmenter"]
    assert record["labels"] == ["mass", "cyst"] and all(t in THRESHOLDS for t in record["thresholds"])
    assert record["n_val"] == 24 and all(d is not None for d in record["val_dice"])
    card = (result.path / "README.md").read_text()
    assert "## Thresholds" in card and f"| mass | {record['thresholds'][0]:.4f} |" in card
    scans = [blob_seg.parent / "0060.nii.gz", blob_seg.parent / "nothing.nii.gz"]
    rows = predict(result.path, scans, mask_dir=tmp_path / "masks", progress=False)
    assert rows[1]["error"] and not rows[1]["mass_mask"]
    scan = nib.load(scans[0])
    for label in ("mass", "cyst"):
        written = nib.load(rows[0][f"{label}_mask"])
        assert written.shape == scan.shape and np.array_equal(written.affine, scan.affine)
        assert int(np.asarray(written.dataobj).sum()) == rows[0][f"{label}_voxels"]
    # a scan larger than the 16^3 ROI: the centred ROI by default, the whole scan by sliding windows on request
    big = blob_seg.parent / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.pad(np.asarray(scan.dataobj), ((2, 2), (0, 0), (4, 4)), constant_values=-1000.0),
                             scan.affine), big)
    for whole in (False, True):
        row = predict(result.path, [big], mask_dir=tmp_path / f"big{whole}", progress=False, whole_scan=whole)[0]
        written = nib.load(row["mass_mask"])
        assert written.shape == (20, 16, 24) and np.array_equal(written.affine, scan.affine) and not row["error"]
    # the entry predicts what the work dir does (same weights, same recorded thresholds)
    again = predict(work, scans[:1], mask_dir=tmp_path / "again", progress=False,
                    thresholds=dict(zip(record["labels"], record["thresholds"])))
    assert again[0]["mass_voxels"] == rows[0]["mass_voxels"]


def test_predict_cli_writes_png_masks_at_the_image_size(synthetic_cxr, tmp_path, one_thread):
    """A 2D segmenter (one training step; its masks need not be right) through tools/predict.py: one PNG per label
    at each image's own rows and columns."""
    from PIL import Image

    from mmvl.data.io import read_image
    from tests.conftest import load_tool

    cfg = finetune_config("seg_vit_cxr_tiny", synthetic_cxr, "model.mode=full", "model.lora=None",
                          "train.max_steps=1", "train.ckpt_interval=1", "model.heads.0.feature_size=4",
                          "data.val_split=None")  # no validation split: thresholds 0.5
    Trainer(cfg, tmp_path / "run").fit()
    images = sorted((synthetic_cxr.parent / "images").glob("*.dcm"))[:2]
    out = tmp_path / "preds.csv"
    code = load_tool("predict").main([str(tmp_path / "run"), *map(str, images), "--out", str(out),
                                      "--device", "cpu"])
    assert code == 0
    import csv

    rows = list(csv.DictReader(out.open()))
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["segmenter"]["labels"] == ["cardiomegaly", "nodule", "pleural effusion", "pneumothorax"]
    assert sidecar["segmenter"]["thresholds"] == [0.5] * 4 and len(rows) == 2
    for row, image in zip(rows, images):
        shape = read_image(image)[0].shape
        for label in sidecar["segmenter"]["labels"]:
            png = Image.open(row[f"{label}_mask"])
            assert png.size == (shape[1], shape[0])  # PIL: (width, height)
            assert Path(row[f"{label}_mask"]).parent == tmp_path / "preds_masks"


def test_transfer_scores_a_segmenter_by_mean_dice(trained_seg, blob_seg, tmp_path, one_thread):
    from tests.conftest import REPO, load_tool

    work, _, _ = trained_seg
    out = tmp_path / "transfer"
    argv = [str(REPO / "configs/finetune/seg_unetr_ct_tiny.py"), "--init-from", str(work), "--out", str(out),
            "--modes", "linear", "--fractions", "1", "--seeds", "0", "--eval-split", "val", "--cfg-options",
            f"data.manifest={blob_seg}", *TINY_3D, *SEG_3D, "train.max_steps=2",
            "train.val_interval=2", "train.ckpt_interval=2"]
    assert load_tool("transfer").main(argv) == 0
    report = json.loads((out / "transfer.json").read_text(encoding="utf-8"))
    assert report["metric"] == "val mean Dice"
    assert sorted(run["name"] for run in report["runs"]) == ["pretrained_linear_f1_s0", "random_full_f1_s0"]
    for run in report["runs"]:
        assert run["n_eval"] == 24 and set(run["per_label_dice"]) == {"mass", "cyst"}
        known = [v for v in run["per_label_dice"].values() if v is not None]
        assert 0 <= run["value"] <= 1 and run["value"] == pytest.approx(sum(known) / len(known))
    assert "val mean Dice" in (out / "transfer.md").read_text(encoding="utf-8")


# -- modes and config -------------------------------------------------------------------------------------------
def test_lora_trains_adapters_and_decoder_and_leaves_base_weights(blob_seg, tmp_path, one_thread):
    cfg = seg_config(blob_seg, "model.mode=lora", "train.max_steps=2", "train.val_interval=1000",
                     "train.ckpt_interval=1000")
    trainer = Trainer(cfg, tmp_path / "run")
    before = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    base = {key for key in before if key.startswith("image_encoder.") and "lora_" not in key}
    assert not moved & base
    assert any("lora_B" in key for key in moved)
    assert any(key.startswith("heads.seg.decoder.stem.") for key in moved)  # the new decoder trains whole
    assert any(key.startswith("heads.seg.decoder.out.") for key in moved)


@pytest.mark.parametrize("key, value, message", [
    ("feature_szie", 8, "Did you mean 'feature_size'"),
    ("decoder", "unetrr", "Did you mean 'unetr'"),
])
def test_head_typos_are_refused_with_the_closest_match(blob_seg, tmp_path, capsys, key, value, message):
    from tests.conftest import REPO, load_tool

    with pytest.raises(ConfigError, match=message):  # given on the command line (keys: refused by the merge)
        Trainer(seg_config(blob_seg, f"model.heads.0.{key}={value!r}"), tmp_path / "run")
    path = tmp_path / "typo.py"  # written in a config file: tools/train.py exits 2 naming the closest key
    path.write_text(f"_base_ = ['{REPO / 'configs/finetune/seg_unetr_ct_tiny.py'}']\n"
                    f"model = dict(heads=[dict(type='segmentation', name='seg', label_names=['mass'], "
                    f"{key}={value!r})])\n")
    code = load_tool("train").main([str(path), "--work-dir", str(tmp_path / "run"), "--cfg-options",
                                    f"data.manifest={blob_seg}"])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_segmentation_refuses_token_drop(one_thread):
    with pytest.raises(ConfigError, match="token_drop"):
        segmenter({**VIT3D, "token_drop": 0.25})


def test_an_edited_mask_file_misses_the_disk_cache(blob_seg, tmp_path):
    """The disk cache keys an entry on the mask files' size and mtime as on the image's: a corrected mask is
    read again, not served from the entry made with the old one."""
    import os

    import nibabel as nib

    from mmvl.data.datasets import ManifestDataset

    pipeline = seg_config(blob_seg).data.eval_pipeline
    common = dict(manifest=blob_seg, pipeline=pipeline, split="val", mask_labels=["mass", "cyst"], cache="disk",
                  cache_dir=tmp_path / "cache")
    first = ManifestDataset(**common)
    index = next(i for i in range(len(first)) if float(first[i]["masks"].sum()) > 0)  # fills that entry
    path = next(p for p in first.rows[index]["mask_paths"][0] if p)
    mask = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(mask.shape, dtype=np.uint8), mask.affine), path)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on a coarse clock
    again = ManifestDataset(**common)
    assert float(again[index]["masks"].sum()) < float(first[index]["masks"].sum())
