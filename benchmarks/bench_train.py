"""Training throughput against open_clip: samples/s and peak memory of a CLIP training step, mmvl's
``Trainer.train_step`` vs open_clip's own ``open_clip_train.train.train_one_epoch``, for the same network, the
same initial weights and the same in-memory batch (data loading is left out on both sides).

``python benchmarks/bench_train.py`` prints a table and one JSON line ``{"bench": "train", ...}``. Runs alternate
mmvl, open_clip, mmvl, open_clip... (``--repeats`` each) and each is a fresh process (this script with
``--case``), so that peak memory is each side's own and a change in the machine's load hits both sides alike;
the medians over the runs are reported, with mmvl / open_clip ratios.

The network is a timm ViT on 1-channel images (registered with timm under a name that says its shape, since
open_clip builds timm towers by name) + a transformers BERT with [CLS] pooling, linear projections and a
learnable logit scale: open_clip's ``CustomTextCLIP``, and mmvl's ``vit2d`` + ``bert`` encoders with a ``clip``
head. A first process builds mmvl's Trainer once to write what both sides read: the synthetic set
(datasets/synthetic.py), the WordPiece tokenizer and BERT config, the first batch of mmvl's training loader
(its ``Collate``), and the initial weights, under mmvl's names and as an open_clip ``local-dir`` folder. Dropout
is off, so both sides compute the same losses, which the table shows.

mmvl: ``Trainer`` from a config, its model loaded with those weights, ``train_step`` called on an iterator that
repeats the loader's first batch. open_clip: ``open_clip.create_model("local-dir:...")``, AdamW with open_clip_train's
parameter groups, ``cosine_lr``, ``create_loss`` and ``train_one_epoch`` on a stand-in loader yielding the same
``(images, token ids)`` each step. Both: AdamW (lr, weight decay, betas, eps as CLIP), gradient clipping at 1.0,
the same warm-up + cosine schedule. Time: the window from the end of the warm-up steps to the end of the last
step (on CUDA waiting for the GPU at both ends), samples/s = batch x steps / window. Memory: peak RSS
(``VmHWM``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA; "built" is the figure before the first step,
"step" the peak minus it. On CPU the minor page faults per timed step are counted too: memory the allocator gave
back to the OS and takes again each step, which costs time. FLOPs of one forward+backward (``FlopCounterMode``;
always on CUDA, ``--flops`` on CPU) give TFLOP/s, and on CUDA MFU against the GPU's dense bf16 peak; the
network's FLOPs are open_clip's count (mmvl's adds the product behind the batch retrieval accuracy it logs, and
attention run by xformers is not counted).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MMVL_NO_PROGRESS", "1")
DEMO_CONFIG = REPO / "configs" / "demo" / "cxr_clip_tiny.py"  # its data pipeline; the model is set below
SIDES = ("mmvl", "open_clip")
HEAD = "clip"  # the mmvl head's name, hence its parameter prefix
# mmvl parameter-name prefixes and their open_clip CustomTextCLIP counterparts (timm trunk + HF transformer).
MMVL_TO_OPEN_CLIP = (
    ("image_encoder.model.", "visual.trunk."),
    (f"heads.{HEAD}.image_proj.", "visual.head.proj."),
    ("text_encoder.model.", "text.transformer."),
    (f"heads.{HEAD}.text_proj.", "text.proj."),
    (f"heads.{HEAD}.logit_scale", "logit_scale"),
)
BATCH_TENSORS = ("image", "input_ids", "attention_mask")
# CLIP's optimizer (open_clip's defaults for ViTs), the same on both sides.
OPTIM = dict(lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
GRAD_CLIP = 1.0
# Dense bf16 tensor-core peaks by device name (first match wins), for MFU; else --peak-tflops.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12))
# Per device type: image size, patch size, batch.
DEVICE_DEFAULTS = {"cpu": (64, 8, 16), "cuda": (224, 16, 256)}


# -- the network, as both sides build it -----------------------------------------------------------------------
def register_vit(width: int, depth: int, patch_size: int, image_size: int) -> str:
    """Register the benchmark's 1-channel ViT with timm; returns its name.

    open_clip builds a timm tower from the model name alone (the timm defaults: 224 px, 3 channels), so the ViT
    both sides train is a registered timm model whose defaults are its shape; mmvl's ``vit2d`` encoder builds it
    by the same name. Heads of 64 channels and an MLP of 4x width, as in ViT-Ti/S/B.
    """
    import timm
    from timm.models import build_model_with_cfg, register_model
    from timm.models.vision_transformer import VisionTransformer

    name = f"bench_vit_w{width}_d{depth}_p{patch_size}_{image_size}px"
    if timm.is_model(name):
        return name
    shape = dict(img_size=image_size, patch_size=patch_size, in_chans=1, embed_dim=width, depth=depth,
                 num_heads=max(1, width // 64), mlp_ratio=4.0, num_classes=0)
    default_cfg = dict(architecture=name, input_size=(1, image_size, image_size), first_conv="patch_embed.proj",
                       num_classes=0, mean=(0.5,), std=(0.25,))

    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
                   **kwargs: Any):
        return build_model_with_cfg(VisionTransformer, name, pretrained=pretrained,
                                    pretrained_cfg=pretrained_cfg or default_cfg,
                                    pretrained_cfg_overlay=pretrained_cfg_overlay, **{**shape, **kwargs})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    register_model(entrypoint)
    return name


def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in ("width", "depth", "patch_size", "image_size", "text_width",
                                                 "text_depth", "max_length", "embed_dim")}


def bert_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """BertConfig fields of the text tower; dropout off, so that both sides compute the very same losses."""
    return dict(hidden_size=spec["text_width"], num_hidden_layers=spec["text_depth"],
                num_attention_heads=max(1, spec["text_width"] // 64), intermediate_size=4 * spec["text_width"],
                max_position_embeddings=max(128, spec["max_length"]), hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


def mmvl_config(spec: dict[str, Any], manifest: Path, tokenizer: Any, case: dict[str, Any]):
    """configs/demo/cxr_clip_tiny.py's data at ``image_size`` with the benchmark's model, optimizer and steps."""
    from mmvl.config import Config

    size = spec["image_size"]
    cfg = Config.fromfile(DEMO_CONFIG)
    cfg.merge_options({
        "data.manifest": str(manifest), "img_size": size,  # the size knob: model and both pipelines
        "model": dict(
            image_encoder=dict(type="vit2d", model_name=case["vit"], in_chans=1, img_size=size),
            text_encoder=dict(type="bert", config=bert_fields(spec), tokenizer=tokenizer, pooling="cls",
                              max_length=spec["max_length"]),
            heads=[dict(type="clip", name=HEAD, embed_dim=spec["embed_dim"])]),
        "optim": dict(type="adamw", **OPTIM, warmup_steps=case["lr_warmup"], min_lr_ratio=0.0),
        "train.max_steps": case["warmup"] + case["steps"], "train.batch_size": case["batch"],
        "train.num_workers": 0, "train.grad_clip": GRAD_CLIP, "train.accum_steps": 1, "train.seed": 0,
        "train.amp": None if case["amp"] == "none" else case["amp"], "train.device": case["device"],
        # glibc keeps freed step buffers on CPU (opt-in, process-wide): ~77 vs ~3.5k page faults per step
        "train.keep_freed_memory": case["device"] == "cpu",
    })
    return cfg


def open_clip_model_cfg(spec: dict[str, Any], vit: str, text_dir: Path) -> dict[str, Any]:
    """open_clip's ``model_cfg``: the registered timm ViT with a linear projection, the HF BERT with [CLS]
    pooling and a linear projection (open_clip's ``CustomTextCLIP``)."""
    return {"embed_dim": spec["embed_dim"],
            "vision_cfg": {"timm_model_name": vit, "timm_model_pretrained": False, "timm_pool": "token",
                           "timm_proj": "linear", "timm_proj_bias": False, "image_size": spec["image_size"]},
            "text_cfg": {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
                         "hf_model_pretrained": False, "hf_proj_type": "linear",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": spec["max_length"]}}


def open_clip_names(state: dict[str, Any]) -> dict[str, Any]:
    """mmvl parameter names -> open_clip's; every tensor must have a counterpart."""
    renamed = {}
    for key, value in state.items():
        for ours, theirs in MMVL_TO_OPEN_CLIP:
            if key.startswith(ours):
                renamed[theirs + key[len(ours):]] = value.detach().contiguous().clone()
                break
        else:
            raise KeyError(f"no open_clip name for mmvl parameter {key}")
    return renamed


def prepare(case: dict[str, Any]) -> dict[str, str]:
    """Everything both sides read, under ``case["work"]``: the synthetic set, the tokenizer + BERT config folder,
    the batch (the first one of mmvl's training loader), the initial weights under mmvl's names and as an
    open_clip folder. Run in a process of its own, as the Trainer it builds stays attached to the log."""
    import torch
    from safetensors.torch import save_file

    from mmvl.engine.trainer import Trainer

    work, spec = Path(case["work"]), case["spec"]
    data = work / "data"
    generated = subprocess.run([sys.executable, str(REPO / "datasets" / "synthetic.py"), "--out", str(data), "--n",
                                str(max(20, 2 * case["batch"])), "--size", str(spec["image_size"]), "--seed", "0"],
                               capture_output=True, text=True)
    if generated.returncode:
        raise RuntimeError(f"datasets/synthetic.py failed: {generated.stderr[-1000:]}")
    manifest = data / "manifest.jsonl"
    tokenizer = dict(type="wordpiece", vocab_size=1000, min_frequency=1)
    trainer = Trainer(mmvl_config(spec, manifest, tokenizer, {**case, "device": "cpu", "amp": "none"}),
                      work / "prepare")
    text_dir = work / "text"  # open_clip's HF tower reads config.json; mmvl's reads the tokenizer
    shutil.copytree(work / "prepare" / "tokenizer", text_dir)
    trainer.model.text_encoder.model.config.save_pretrained(text_dir)
    batch = next(iter(trainer.loader))
    torch.save({key: batch[key] for key in BATCH_TENSORS}, work / "batch.pt")
    state = trainer.model.state_dict()
    torch.save(state, work / "init_mmvl.pt")
    open_clip_dir = work / "open_clip"
    open_clip_dir.mkdir()
    (open_clip_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip_model_cfg(spec, case["vit"], text_dir)}, indent=2), encoding="utf-8")
    save_file(open_clip_names(state), str(open_clip_dir / "open_clip_model.safetensors"))
    return {"manifest": str(manifest), "text_dir": str(text_dir), "batch": str(work / "batch.pt"),
            "init_mmvl": str(work / "init_mmvl.pt"), "open_clip_dir": str(open_clip_dir)}


# -- one run, in its own process ------------------------------------------------------------------------------
def optimizer_kind(optimizer: Any) -> str:
    """Which AdamW implementation runs: torch picks foreach when neither is asked for and every parameter is on
    CUDA, else the per-parameter for-loop."""
    fused, foreach = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if fused:
        return "fused"
    if foreach or (foreach is None and fused is None and all(p.is_cuda for p in params)):
        return "foreach"
    return "for-loop"


def count_flops(step: Any) -> int:
    """FLOPs of ``step()`` (a forward and backward), counted by torch's FlopCounterMode (matmuls, convolutions
    and attention; elementwise work is not counted, as in MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


class Stopwatch:
    """Timestamps at step boundaries; on CUDA the window's first and last one wait for the GPU, the others do
    not (a wait at every step would stop the CPU from running ahead, as training does)."""

    def __init__(self, cuda: bool, warmup: int, total: int):
        self.cuda, self.warmup, self.total = cuda, warmup, total
        self.stamps: list[float] = []
        self.page_faults: list[int] = []  # at the window's ends: memory the steps map afresh each time

    def tick(self) -> None:
        import resource

        if len(self.stamps) in (self.warmup, self.total):
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.page_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        self.stamps.append(time.perf_counter())

    def figures(self, batch: int) -> dict[str, Any]:
        window = self.stamps[self.total] - self.stamps[self.warmup]
        steps = self.total - self.warmup
        step_ms = [1000 * (b - a) for a, b in itertools.pairwise(self.stamps[self.warmup:self.total + 1])]
        return {"ms_per_step": round(1000 * window / steps, 2), "samples_per_s": round(batch * steps / window, 3),
                "step_ms": [round(ms, 2) for ms in step_ms],
                "page_faults_per_step": round((self.page_faults[-1] - self.page_faults[0]) / steps, 1)}


def _decay_tensors(optimizer: Any) -> int:
    return sum(len(group["params"]) for group in optimizer.param_groups if group["weight_decay"] > 0)


def run_mmvl(case: dict[str, Any]) -> dict[str, Any]:
    """Build mmvl's Trainer, load the shared initial weights, time ``train_step`` on the repeated batch."""
    import torch
    from bench_encoders import _current_rss_mb, _peak_rss_mb  # runs are this file as a script: benchmarks/ on path

    from mmvl.engine.trainer import Trainer, to_device
    from mmvl.ops import current_backend

    imports_mb = _current_rss_mb()
    files, spec = case["files"], case["spec"]
    cfg = mmvl_config(spec, Path(files["manifest"]), files["text_dir"], case)
    trainer = Trainer(cfg, Path(case["work"]) / f"mmvl_run{case['run']}")
    trainer.model.load_state_dict(torch.load(files["init_mmvl"], weights_only=True), strict=True)
    batch = next(iter(trainer.loader))  # collated by the trainer's own loader (pinned on CUDA)
    saved = torch.load(files["batch"], weights_only=True)
    same_batch = all(torch.equal(batch[key], saved[key]) for key in BATCH_TENSORS)
    batches = itertools.repeat(batch)
    device = trainer.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    built_mb = torch.cuda.memory_allocated(device) / 2**20 if cuda else _current_rss_mb()
    total = case["warmup"] + case["steps"]
    watch = Stopwatch(cuda, case["warmup"], total)
    losses = []
    watch.tick()
    for _ in range(total):
        logs = trainer.train_step(batches)
        watch.tick()
        if logs is None:
            raise RuntimeError("mmvl skipped a step (non-finite loss or gradient); see bad_steps.jsonl")
        losses.append(logs["loss"])  # tensors: converting each would wait for the device every step
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mb()
    result = {**watch.figures(case["batch"]), "peak_mb": round(peak_mb, 1), "built_mb": round(built_mb, 1),
              "imports_mb": round(imports_mb, 1), "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
              "params": sum(p.numel() for p in trainer.model.parameters()),
              "optimizer": optimizer_kind(trainer.optimizer), "decay_tensors": _decay_tensors(trainer.optimizer),
              "same_batch": same_batch, "text_tokens": int(batch["input_ids"].shape[1]),
              "attention": current_backend(device, torch.bfloat16 if case["amp"] == "bf16" else torch.float32),
              "driver": "mmvl.engine.trainer.Trainer.train_step"}
    if case["flops"]:
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["amp"] == "bf16")
        on_device = to_device(batch, device)

        def forward_backward() -> None:
            with amp:
                loss = trainer.model(on_device)["loss"]
            loss.backward()

        result["flops_per_step"] = count_flops(forward_backward)
        trainer.optimizer.zero_grad(set_to_none=True)
    return result


class RepeatedBatches:
    """A stand-in for open_clip's training DataLoader (what ``DataInfo.dataloader`` holds): the same
    ``(images, texts)`` batch ``num_batches`` times, with a timestamp each time the loop asks for the next one
    (that is, at the end of each step)."""

    def __init__(self, images: Any, texts: Any, num_batches: int, watch: Stopwatch):
        self.images, self.texts, self.watch = images, texts, watch
        self.num_batches, self.num_samples = num_batches, num_batches * len(images)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        self.watch.tick()
        for _ in range(self.num_batches):
            yield self.images, self.texts
            self.watch.tick()


class ScalarRecorder:
    """A tensorboard writer for ``train_one_epoch``: keeps the scalars it logs (the loss at the first and the
    last step)."""

    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.setdefault(name, []).append((step, float(value)))


def run_open_clip(case: dict[str, Any]) -> dict[str, Any]:
    """Load the same network with ``open_clip.create_model`` and train it with open_clip_train's
    ``train_one_epoch``, as open_clip_train.main sets it up (AdamW without decay on gains and biases, cosine
    schedule, ClipLoss from ``create_loss``)."""
    from types import SimpleNamespace

    import open_clip
    import torch
    from bench_encoders import _current_rss_mb, _peak_rss_mb  # runs are this file as a script: benchmarks/ on path
    from open_clip_train.data import DataInfo
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch
    from timm.layers import use_fused_attn

    imports_mb = _current_rss_mb()
    files = case["files"]
    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    precision = "amp_bf16" if case["amp"] == "bf16" else "fp32"
    model = open_clip.create_model(f"local-dir:{files['open_clip_dir']}", precision=precision, device=device,
                                   output_dict=True)  # loads open_clip_model.safetensors, strict
    total = case["warmup"] + case["steps"]
    args = SimpleNamespace(  # the fields of open_clip_train's params that train_one_epoch and create_loss read
        device=str(device), precision=precision, distill=False, accum_freq=1, skip_scheduler=False, horovod=False,
        grad_clip_norm=GRAD_CLIP, log_every_n_steps=100, world_size=1, rank=0, local_rank=0, batch_size=case["batch"],
        wandb=False, model="bench", siglip=False, local_loss=False, gather_with_grad=False)
    loss = open_clip.create_loss(args)
    # open_clip_train.main: no weight decay on gains, biases and the logit scale
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad],
          "weight_decay": OPTIM["weight_decay"]}],
        lr=OPTIM["lr"], betas=OPTIM["betas"], eps=OPTIM["eps"])
    scheduler = cosine_lr(optimizer, OPTIM["lr"], case["lr_warmup"], total)
    saved = torch.load(files["batch"], weights_only=True)
    images, texts = saved["image"], saved["input_ids"]
    if cuda:  # open_clip's loaders pin memory, as mmvl's do
        images, texts = images.pin_memory(), texts.pin_memory()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    built_mb = torch.cuda.memory_allocated(device) / 2**20 if cuda else _current_rss_mb()
    watch = Stopwatch(cuda, case["warmup"], total)
    recorder = ScalarRecorder()
    data = {"train": DataInfo(dataloader=RepeatedBatches(images, texts, total, watch))}
    train_one_epoch(model, data, loss, 0, optimizer, None, scheduler, None, args, tb_writer=recorder)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mb()
    logged = dict(recorder.scalars.get("train/loss", []))
    result = {**watch.figures(case["batch"]), "peak_mb": round(peak_mb, 1), "built_mb": round(built_mb, 1),
              "imports_mb": round(imports_mb, 1), "loss_first": logged.get(0), "loss_last": logged.get(total - 1),
              "params": sum(p.numel() for p in model.parameters()), "optimizer": optimizer_kind(optimizer),
              "decay_tensors": _decay_tensors(optimizer), "text_tokens": int(texts.shape[1]),
              "attention": "sdpa" if use_fused_attn() else "math",  # timm's ViT attention
              "driver": "open_clip_train.train.train_one_epoch"}
    if case["flops"]:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["amp"] == "bf16")
        on_device = images.to(device), texts.to(device)

        def forward_backward() -> None:
            with autocast:
                total_loss = sum(loss(**model(*on_device), output_dict=True).values())
            total_loss.backward()

        result["flops_per_step"] = count_flops(forward_backward)
        optimizer.zero_grad(set_to_none=True)
    return result


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    spec = case["spec"]
    case = {**case, "vit": register_vit(spec["width"], spec["depth"], spec["patch_size"], spec["image_size"])}
    result = {"prepare": prepare, "mmvl": run_mmvl, "open_clip": run_open_clip}[case["side"]](case)
    result["torch_threads"] = torch.get_num_threads()
    return result


def spawn_case(case: dict[str, Any]) -> dict[str, Any]:
    """Run one side (or the preparation) in a fresh interpreter (bench_encoders' runner); returns what it printed,
    or ``{"error": ...}`` when it failed."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # loaded by path (the tests) rather than run as a script
        sys.path.insert(0, here)
    from bench_encoders import run_script_case

    env = dict(os.environ, MMVL_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    result = run_script_case(Path(__file__).resolve(), case, env, "run")
    if "error" not in result:
        result["load_avg"] = round(os.getloadavg()[0], 2)
    return result


# -- the parent: runs, medians, table, JSON ------------------------------------------------------------------------
def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s: ``--peak-tflops`` if given, else by device name, else None."""
    if override_tflops:
        return override_tflops * 1e12
    for key, flops in PEAK_BF16_FLOPS:
        if device_name and key in device_name:
            return flops
    return None


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return round(value / baseline, 3) if value is not None and baseline else None


def summarize(runs: list[dict[str, Any]], peak: float | None) -> dict[str, Any]:
    """Per side: medians over its runs, the runs' samples/s, the first run's facts; then the ratios."""
    sides: dict[str, Any] = {}
    for side in SIDES:
        done = [r for r in runs if r["side"] == side and "error" not in r]
        if not done:
            continue
        first = done[0]
        sides[side] = {
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in done), 3),
            "ms_per_step": round(statistics.median(r["ms_per_step"] for r in done), 2),
            "peak_mb": round(statistics.median(r["peak_mb"] for r in done), 1),
            "built_mb": round(statistics.median(r["built_mb"] for r in done), 1),
            "imports_mb": round(statistics.median(r["imports_mb"] for r in done), 1),
            "page_faults_per_step": round(statistics.median(r["page_faults_per_step"] for r in done), 1),
            "runs_samples_per_s": [r["samples_per_s"] for r in done],
            **{key: first[key] for key in ("params", "optimizer", "decay_tensors", "loss_first", "loss_last",
                                           "driver", "attention", "text_tokens", "torch_threads")},
        }
        sides[side]["step_mb"] = round(sides[side]["peak_mb"] - sides[side]["built_mb"], 1)
        sides[side]["images_per_s"] = sides[side]["samples_per_s"]  # one image (and one report) per sample
        if "flops_per_step" in first:
            sides[side]["flops_per_step"] = first["flops_per_step"]
    mmvl, reference = sides.get("mmvl"), sides.get("open_clip")
    summary: dict[str, Any] = {"sides": sides}
    if mmvl and reference:
        summary.update(speed_ratio=_ratio(mmvl["samples_per_s"], reference["samples_per_s"]),
                       memory_ratio=_ratio(mmvl["peak_mb"], reference["peak_mb"]),
                       params_equal=mmvl["params"] == reference["params"])
        model_flops = reference.get("flops_per_step")  # the network's FLOPs, the same for both sides
        if model_flops:
            for facts in sides.values():
                facts["tflops_per_s"] = round(model_flops / (facts["ms_per_step"] / 1000) / 1e12, 4)
                facts["mfu"] = round(model_flops / (facts["ms_per_step"] / 1000) / peak, 4) if peak else None
    return summary


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def format_table(report: dict[str, Any]) -> str:
    config, summary = report["config"], report["summary"]
    spec, sides = config["model"], summary["sides"]
    cuda = config["device"].startswith("cuda")
    flops = any("tflops_per_s" in facts for facts in sides.values())
    any_side = next(iter(sides.values()))
    lines = [
        f"CLIP training step, batch {config['batch_size']}: ViT {spec['width']} x {spec['depth']} blocks (patch "
        f"{spec['patch_size']}, {spec['image_size']} px, 1 channel) + BERT {spec['text_width']} x "
        f"{spec['text_depth']} layers ({any_side['text_tokens']} tokens), embed {spec['embed_dim']}",
        "  parameters: " + ", ".join(f"{side} {facts['params'] / 1e6:.3f} M" for side, facts in sides.items())
        + (" (equal)" if summary.get("params_equal") else ""),
        f"  {config['device']}{' (' + config['gpu'] + ')' if config['gpu'] else ''}, amp {config['amp']}, torch "
        f"threads {any_side['torch_threads']}; median of {config['repeats']} alternating runs per side, each "
        f"{config['steps']} timed steps after {config['warmup']} warm-up; same initial weights and batch",
        f"  AdamW lr {OPTIM['lr']:g}, wd {OPTIM['weight_decay']:g}, betas {OPTIM['betas']}, eps {OPTIM['eps']:g}, "
        f"grad clip {GRAD_CLIP:g}, cosine schedule; implementation: "
        + ", ".join(f"{side} {facts['optimizer']}" for side, facts in sides.items()),
        "  steps: " + "; ".join(f"{side} {facts['driver']}" for side, facts in sides.items())
        + "; attention: " + ", ".join(f"{side} {facts['attention']}" for side, facts in sides.items()),
        f"  memory: {'torch.cuda.max_memory_allocated' if cuda else 'process peak RSS (VmHWM)'}; built = "
        f"{'allocated' if cuda else 'RSS'} before the first step, step = peak - built"
        f"{'' if cuda else ', imports = RSS after the imports; faults = minor page faults per timed step'}",
    ]
    head = f"  {'side':<10}{'samples/s':>10}{'ms/step':>9}{'peak MB':>9}{'built MB':>10}{'step MB':>9}"
    head += "" if cuda else f"{'imports MB':>12}{'faults/step':>13}"
    head += f"{'TFLOP/s':>9}{'MFU':>7}" if flops else ""
    lines.append(head + "  samples/s of each run")
    for side in SIDES:
        facts = sides.get(side)
        if facts is None:
            error = next(r["error"] for r in report["runs"] if r["side"] == side)
            lines.append(f"  {side:<10}failed: {error[:90]}")
            continue
        row = (f"  {side:<10}{facts['samples_per_s']:>10.2f}{facts['ms_per_step']:>9.1f}{facts['peak_mb']:>9.0f}"
               f"{facts['built_mb']:>10.0f}{facts['step_mb']:>9.0f}")
        if not cuda:
            row += f"{facts['imports_mb']:>12.0f}{facts['page_faults_per_step']:>13.0f}"
        if flops:
            mfu = facts.get("mfu")
            row += f"{facts.get('tflops_per_s', 0):>9.3g}{'-' if mfu is None else f'{100 * mfu:.1f}%':>7}"
        lines.append(row + "  " + " ".join(f"{v:.2f}" for v in facts["runs_samples_per_s"]))
    if "speed_ratio" in summary:
        lines.append(f"  mmvl / open_clip: speed {_x(summary['speed_ratio'])} (target >= 1.00x), peak memory "
                     f"{_x(summary['memory_ratio'])} (target <= 1.00x)")
        mmvl, reference = sides["mmvl"], sides["open_clip"]
        lines.append(f"  loss at the first step: mmvl {_loss(mmvl['loss_first'])}, open_clip "
                     f"{_loss(reference['loss_first'])}; after the last: mmvl {_loss(mmvl['loss_last'])}, open_clip "
                     f"{_loss(reference['loss_last'])}")
    busiest = max([config["load_avg_start"]] + [r["load_avg"] for r in report["runs"] if "load_avg" in r])
    if busiest > (os.cpu_count() or 1) + 1:
        lines.append(f"  note: other work was running (load average up to {busiest:g} on {os.cpu_count()} cores); "
                     "timings are skewed, though alternation spreads it over both sides")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    parser.add_argument("--amp", choices=("none", "bf16"), help="autocast dtype, CUDA only (default: bf16 on "
                                                                  "CUDA, none on CPU)")
    parser.add_argument("--batch-size", type=int, help="samples per step (default: 16 on CPU, 256 on CUDA)")
    parser.add_argument("--image-size", type=int, help="image side in px (default: 64 on CPU, 224 on CUDA)")
    parser.add_argument("--patch-size", type=int, help="ViT patch side (default: 8 on CPU, 16 on CUDA)")
    parser.add_argument("--width", type=int, default=192, help="ViT width, 64 per head, MLP 4x (ViT-Ti: 192)")
    parser.add_argument("--depth", type=int, default=12, help="ViT blocks")
    parser.add_argument("--text-width", type=int, default=256, help="BERT hidden size, 64 per head, MLP 4x")
    parser.add_argument("--text-depth", type=int, default=4, help="BERT layers")
    parser.add_argument("--max-length", type=int, default=64, help="report tokens at most")
    parser.add_argument("--embed-dim", type=int, default=256, help="shared embedding width")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; medians are reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each run")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in each run (default: 1 on CPU, "
                                                     "where other work shares the cores; torch's own on CUDA)")
    parser.add_argument("--flops", action="store_true",
                        help="count the network's FLOPs per step (FlopCounterMode) for TFLOP/s; always on with CUDA, "
                             "where MFU follows (CPU SDPA kernels are not counted)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU, when its name is not "
                                                          f"in the table ({', '.join(k for k, _ in PEAK_BF16_FLOPS)})")
    parser.add_argument("--quick", action="store_true", help="tiny model and batch, 1 run per side, 2 steps (tests)")
    parser.add_argument("--work-dir", help="where to write the data and runs (default: a temp folder, removed)")
    parser.add_argument("--out-json", type=Path, help="also write the JSON line to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one side, print its JSON
    args = parser.parse_args(argv)
    if args.case is not None:
        return args
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    args.amp = args.amp or ("bf16" if cuda else "none")
    if args.amp == "bf16" and not cuda:
        parser.error("--amp bf16 needs --device cuda")
    if args.quick:
        for key, value in dict(width=32, depth=1, text_width=32, text_depth=1, max_length=32, embed_dim=32,
                               image_size=32, patch_size=8, batch_size=4, repeats=1, warmup=1, steps=2).items():
            setattr(args, key, value)
    size, patch, batch = DEVICE_DEFAULTS["cuda" if cuda else "cpu"]
    args.image_size, args.patch_size = args.image_size or size, args.patch_size or patch
    args.batch_size = args.batch_size or batch
    if args.threads is None and not cuda:
        args.threads = 1
    args.flops = args.flops or cuda
    for key in ("batch_size", "image_size", "patch_size", "width", "depth", "text_width", "text_depth",
                "max_length", "embed_dim", "repeats", "steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.image_size % args.patch_size:
        parser.error(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (a contrastive loss needs negatives)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.case is not None:
        print(json.dumps(run_case(json.loads(args.case))))
        return {}
    from importlib.metadata import version

    import torch

    started = time.perf_counter()
    cuda = args.device.startswith("cuda")
    spec = model_spec(args)
    gpu = torch.cuda.get_device_name(args.device) if cuda else None
    peak = peak_flops(gpu, args.peak_tflops) if cuda else None
    config = {key: getattr(args, key) for key in ("device", "amp", "batch_size", "repeats", "warmup", "steps",
                                                   "threads", "flops", "quick")}
    config.update(model=spec, optimizer={**OPTIM, "betas": list(OPTIM["betas"]), "grad_clip": GRAD_CLIP}, gpu=gpu,
                  peak_flops=peak, cpu_count=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                  open_clip=version("open_clip_torch"), load_avg_start=round(os.getloadavg()[0], 2))
    total = args.warmup + args.steps
    base_case = dict(spec=spec, batch=args.batch_size, device=args.device, amp=args.amp, threads=args.threads,
                     flops=args.flops, warmup=args.warmup, steps=args.steps, lr_warmup=max(1, total // 5))
    scratch = Path(tempfile.mkdtemp(prefix="mmvl_bench_train_", dir=args.work_dir))
    runs: list[dict[str, Any]] = []
    try:
        print("preparing data, tokenizer, batch and initial weights ...", file=sys.stderr)
        files = spawn_case({**base_case, "side": "prepare", "work": str(scratch)})
        if "error" in files:
            raise SystemExit(f"preparation failed: {files['error']}\n{files['stderr_tail']}")
        config["prepare_s"] = files.pop("case_s")
        for key in ("load_avg", "torch_threads"):
            files.pop(key)
        for run, side in itertools.product(range(args.repeats), SIDES):
            print(f"run {run + 1}/{args.repeats}: {side} ...", file=sys.stderr)
            result = spawn_case({**base_case, "side": side, "run": run, "files": files, "work": str(scratch)})
            runs.append({"side": side, "run": run, **result})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    config["load_avg_end"] = round(os.getloadavg()[0], 2)
    report = {"bench": "train", "config": config, "summary": summarize(runs, peak), "runs": runs,
              "total_s": round(time.perf_counter() - started, 1)}
    if report["summary"]["sides"]:
        print(format_table(report))
    else:
        print(f"every run failed: {runs[0]['error']}")
    line = json.dumps(report)
    print(line)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(line + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
