"""3D CLIP through the trainer: configs/ct_clip.py and its demo agree, and a tiny 3D ViT + BERT trained with the
demo's recipe on synthetic chest CTs retrieves held-out reports better than chance and classifies their findings
zero-shot; the demo's loader workers augment the volumes of the memory cache into the same batches as the main
process would."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmvl.config import Config
from mmvl.config.validate import validate_config
from mmvl.engine.data import build_datasets, build_train_loader
from mmvl.engine.trainer import Trainer
from tests.conftest import load_script, load_tool

REPO = Path(__file__).resolve().parents[2]


def _step(pipeline: list[dict], kind: str) -> dict:
    return next(step for step in pipeline if step["type"] == kind)


@pytest.mark.parametrize("name", ["ct_clip.py", "demo/ct_clip_tiny.py", "demo/ct_clip_resnet_tiny.py"])
def test_ct_clip_configs(name):
    cfg = Config.fromfile(REPO / "configs" / name)
    tower = "resnet3d" if "resnet" in name else "vit3d"
    assert cfg.model.image_encoder.type == tower and cfg.model.heads[0]["type"] == "clip"
    for pipeline in (cfg.data.train_pipeline, cfg.data.eval_pipeline):
        window = _step(pipeline, "IntensityWindow")
        assert (window["low"], window["high"]) == (-1000.0, 1000.0)  # HU window of the issue and CT-CLIP
        assert _step(pipeline, "Orient")["axcodes"] == "RAS"
        # the volume the pipeline produces is the one the encoder's patch grid is built for
        assert tuple(_step(pipeline, "CropOrPad")["size"]) == tuple(cfg.model.image_encoder.img_size)
    augment = _step(cfg.data.train_pipeline, "RandomAugment3D")
    assert 0 not in augment["flip_axes"]  # reports name sides: no left-right flip
    if "resnet" in name:  # the README's CT demo: its recipe as measured (the config's header)
        assert cfg.data.report_augment == {"shuffle": True, "drop": 0.3} and cfg.train.max_steps == 800
    if name == "ct_clip.py":
        assert tuple(_step(cfg.data.eval_pipeline, "Resample")["spacing"])[:2] == (1.5, 1.5)
        assert cfg.model.image_encoder.grad_checkpointing
    else:
        assert cfg.data.manifest == "data/synthetic_ct/manifest_nifti.jsonl"


@pytest.fixture(scope="module")
def ct_retrieval_set(tmp_path_factory) -> Path:
    """400 synthetic CT studies (NIfTI, 32 x 32 matrix, ~10 s to write): 320 for training, 80 held out."""
    out = tmp_path_factory.mktemp("ct_clip")
    manifest = load_script("synthetic_ct").generate_ct(out, n=400, size=32, slices=16, formats=("nifti",),
                                                            progress=False)["nifti"]
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    for index, row in enumerate(rows):
        row["split"] = "train" if index < 320 else "val"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return manifest


TINY_STEPS = 240


@pytest.fixture(scope="module")
def tiny_ct_clip(ct_retrieval_set, tmp_path_factory) -> tuple[Path, dict, Trainer]:
    """The README's CT demo (configs/demo/ct_clip_resnet_tiny.py: a 3D ResNet tower; findings + impression, weight
    decay, volume and report augmentation) at half its widths, a 3^3 stem, batch 16 and 240 steps (~2 min on one
    core), trained once
    for the slow tests below: ``(work dir, untrained validation metrics, trainer)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture (function-scoped, so not usable here)
    try:
        cfg = Config.fromfile(REPO / "configs" / "demo" / "ct_clip_resnet_tiny.py")
        cfg.merge_options([
            f"data.manifest={ct_retrieval_set}", "model.image_encoder.widths=(8,16,32,64)",
            "model.image_encoder.conv1_size=3", "train.batch_size=16",
            "model.text_encoder.config.hidden_size=64",
            "model.text_encoder.config.num_attention_heads=2", "model.text_encoder.config.intermediate_size=128",
            "model.heads.0.embed_dim=64", f"train.max_steps={TINY_STEPS}", "train.val_interval=80",
            f"train.ckpt_interval={TINY_STEPS}", "train.log_interval=20", "optim.warmup_steps=20",
        ])
        work = tmp_path_factory.mktemp("tiny_ct_clip") / "run"
        trainer = Trainer(cfg, work)
        untrained = trainer.validate()
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return work, untrained, trainer



@pytest.mark.slow
def test_tiny_ct_clip_retrieves_held_out_reports_above_chance(tiny_ct_clip):
    work, untrained, trainer = tiny_ct_clip
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in records if "val/i2t_R@5" in r]
    assert [r["step"] for r in held_out] == [80, 160, 240]
    # A random ranking puts the right report in the top 5 of 80 with probability 5/80. Reports of studies with the
    # same findings differ only in details a 48^3 volume at 8 mm cannot show (nodule sizes, lobes, wording), and
    # about a fifth of the studies have no finding at all, so perfect retrieval is out of reach.
    chance = 5 / 80
    best = max(held_out, key=lambda r: r["val/i2t_R@5"] + r["val/t2i_R@5"])
    print(f"untrained R@5 i2t {untrained['val/i2t_R@5']:.3f} t2i {untrained['val/t2i_R@5']:.3f}; "
          + "; ".join(f"step {r['step']}: i2t {r['val/i2t_R@5']:.3f} t2i {r['val/t2i_R@5']:.3f} "
                      f"loss {r['val/loss']:.3f}" for r in held_out))
    assert best["val/i2t_R@5"] > chance and best["val/t2i_R@5"] > chance, held_out
    assert (best["val/i2t_R@5"] + best["val/t2i_R@5"]) / 2 >= 2 * chance, held_out
    # best.pt: the lowest validation loss (the demo's train.best_metric)
    assert trainer.best_value == pytest.approx(min(r["val/loss"] for r in held_out))
    assert (work / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
def test_tiny_ct_clip_classifies_held_out_findings_zero_shot(tiny_ct_clip, ct_retrieval_set, tmp_path, one_thread):
    # Issue 22: a smaller version of the demo classifies held-out studies zero-shot at macro AUROC >= 0.65. Measured
    # (seed 0, 240 steps, with the demo's sentence shuffle and drop and the lobe-averaged ctrate prompts): macro 0.704
    # (cardiomegaly 0.96, effusion 0.94, emphysema 0.60, consolidation 0.54, nodule 0.49). Before those two: 0.678
    # (seed 0), 0.699 (seed 1); with the demo's 7^3 stem and batch 32 for 300 steps (same widths): 0.696. With the ViT
    # tower of configs/demo/ct_clip_tiny.py at a quarter of its width the same test measured 0.59, below the bar.
    out = tmp_path / "zero_shot.json"
    code = load_tool("evaluate").main([
        str(tiny_ct_clip[0]), "--manifest", str(ct_retrieval_set), "--task", "zero_shot", "--split", "val",
        "--val-split", "", "--preset", "ctrate", "--n-bootstrap", "0", "--device", "cpu", "--out", str(out),
    ])
    assert code == 0
    metrics = json.loads(out.read_text())["metrics"]
    aurocs = {label: entry["auroc"] for label, entry in metrics["labels"].items()}
    print(f"zero-shot AUROC: {aurocs}; macro {metrics['macro']['auroc']:.3f}")
    assert set(aurocs) == {"lung nodule", "pleural effusion", "emphysema", "cardiomegaly", "consolidation"}
    assert metrics["macro"]["auroc"] >= 0.65, aurocs
    assert aurocs["pleural effusion"] >= 0.75, aurocs


def _images(items: list[dict]) -> torch.Tensor:
    return torch.stack([item["image"] for item in items])


def test_ct_demo_augments_in_loader_workers_into_the_same_batches(tmp_path):
    # Issue 22, part 5: with 0 workers the 3D affine ran in the main process (30-34% of each demo step waiting for
    # data, measured); the demo now runs it in 2 workers, which read the memory cache filled before they fork
    manifest = load_script("synthetic_ct").generate_ct(tmp_path / "ct", n=16, size=32, slices=16, formats=("nifti",),
                                                       progress=False)["nifti"]
    cfg = Config.fromfile(REPO / "configs" / "demo" / "ct_clip_tiny.py")
    assert cfg.train.num_workers == 2 and cfg.data.cache == "memory"
    cfg.merge_options([f"data.manifest={manifest}"])
    cfg = validate_config(cfg)
    train_set, _ = build_datasets(cfg["data"], tmp_path / "work", seed=0)
    assert train_set.loader_workers(2) == 2  # a random step follows the cache, so workers are kept
    strategy = SimpleNamespace(device=torch.device("cpu"), dist=SimpleNamespace(world_size=1, rank=0))
    batches = {}
    for workers in (0, 2):
        loader, sampler = build_train_loader(train_set, _images, {**cfg["train"], "batch_size": 4,
                                                                  "num_workers": workers}, strategy)
        assert loader.num_workers == workers
        sampler.set_epoch(1)
        batches[workers] = list(loader)
    assert len(batches[0]) >= 2 and len(batches[0]) == len(batches[2])
    for main, worker in zip(batches[0], batches[2]):
        assert torch.equal(main, worker)
    assert not torch.equal(batches[0][0], batches[0][1])
