"""Fine-tuning cost by mode: trainable parameters, peak memory and step time of ``linear``, ``lora`` and ``full``
fine-tuning (mmvl/models/finetune.py) of a ViT-B/16 on 224 px 2D images and a 3D ViT-B/16 on 96^3 volumes, with a
``multilabel_cls`` head, side by side in one run.

``python benchmarks/bench_finetune.py [--device cpu|cuda] [--batch-size 8] [--steps 3] [--tiny] [--out-json F]``
prints a table and one JSON line ``{"bench": "finetune", ...}``. Every (encoder, mode) is a fresh process (this
script with ``--case``), so each peak memory is that case's own. A step is forward, BCE loss, backward and an AdamW
step over the trainable parameters (LoRA: rank 8, alpha 16 on the attention and MLP projections, the
configs' default targets) on a random batch; time is the median of ``--steps`` steps after one warm-up step
(on CUDA waiting for the GPU). Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak
RSS (``VmHWM``, as benchmarks/bench_encoders.py reads it); "built" is the figure before the first step, "step" the
peak minus it (activations, gradients and optimizer state). ``--tiny``: 2-block width-32 encoders at 32 px and
32^3, batch 2, one timed step: the CI smoke test (tests/benchmarks/test_bench_finetune.py).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODES = ("linear", "lora", "full")
LABELS = ["a", "b", "c", "d", "e"]
ENCODERS = {
    "vit_b16_2d_224": dict(type="vit2d", model_name="vit_base_patch16_224", img_size=224, patch_size=16),
    "vit3d_b16_96": dict(type="vit3d", img_size=96, patch_size=16, hidden_size=768, mlp_dim=3072, num_layers=12,
                         num_heads=12),
}
TINY = {
    "vit_b16_2d_224": dict(type="vit2d", model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                           depth=2, num_heads=2),
    "vit3d_b16_96": dict(type="vit3d", img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2,
                         num_heads=2),
}
LORA = dict(rank=8, alpha=16, dropout=0.0)


@functools.cache
def _bench_encoders() -> Any:
    """benchmarks/bench_encoders.py, loaded once: its peak/current RSS readers (one definition of what "peak"
    means) and its fresh-interpreter case runner."""
    spec = importlib.util.spec_from_file_location("bench_encoders", Path(__file__).with_name("bench_encoders.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- one case, in its own process ------------------------------------------------------------------------------
def run_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from mmvl.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(int(case["threads"]))
    rss = _bench_encoders()
    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    encoder = dict(case["encoder"])
    model = build_model(dict(image_encoder=encoder, heads=[dict(type="multilabel_cls", name="cls",
                                                                label_names=LABELS)],
                             mode=case["mode"], lora=LORA if case["mode"] == "lora" else None)).to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
    size = encoder["img_size"]
    spatial = (size,) * (3 if encoder["type"] == "vit3d" else 2)
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(case["batch_size"], 1, *spatial, generator=generator).to(device),
             "labels": torch.randint(0, 2, (case["batch_size"], len(LABELS)), generator=generator).float().to(device)}
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        built = torch.cuda.memory_allocated(device) / 2**20
    else:
        built = rss._current_rss_mb()

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = model.heads["cls"](model.image_encoder(batch["image"]), None, batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    step()  # warm-up: optimizer state allocated, kernels chosen
    times = [step() for _ in range(case["steps"])]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else rss._peak_rss_mb()
    total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    return {"encoder": case["name"], "mode": case["mode"], "params": total, "trainable": n_trainable,
            "trainable_pct": round(100.0 * n_trainable / total, 3), "ms_per_step": round(1000 * statistics.median(
                times), 1), "step_ms": [round(1000 * t, 1) for t in times], "peak_mb": round(peak, 1),
            "built_mb": round(built, 1), "step_mb": round(peak - built, 1)}


def spawn_case(case: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, MMVL_NO_PROGRESS="1", OMP_NUM_THREADS=str(case["threads"]))
    result = _bench_encoders().run_script_case(Path(__file__).resolve(), case, env, f"{case['name']} {case['mode']}")
    return {"encoder": case["name"], "mode": case["mode"], **result} if "error" in result else result


# -- the parent: cases, table, JSON ----------------------------------------------------------------------------
def table(runs: Sequence[dict[str, Any]], cuda: bool) -> str:
    lines = [f"  memory: {'torch.cuda.max_memory_allocated' if cuda else 'process peak RSS (VmHWM)'}; built = before "
             "the first step, step = peak - built; vs full: the mode's figure / full fine-tuning's",
             f"  {'encoder':<16}{'mode':<8}{'params':>12}{'trainable':>12}{'train %':>9}{'ms/step':>10}"
             f"{'peak MB':>10}{'step MB':>10}{'step MB vs full':>17}"]
    full = {run["encoder"]: run for run in runs if run["mode"] == "full" and "error" not in run}
    for run in runs:
        if "error" in run:
            lines.append(f"  {run['encoder']:<16}{run['mode']:<8}  error: {run['error']}")
            continue
        ref = full.get(run["encoder"])
        ratio = f"{run['step_mb'] / ref['step_mb']:.2f}" if ref and ref["step_mb"] > 0 else "-"
        lines.append(f"  {run['encoder']:<16}{run['mode']:<8}{run['params']:>12,}{run['trainable']:>12,}"
                     f"{run['trainable_pct']:>9.2f}{run['ms_per_step']:>10.1f}{run['peak_mb']:>10.1f}"
                     f"{run['step_mb']:>10.1f}{ratio:>17}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 8; --tiny 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (default 3; --tiny 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case (default: all cores)")
    parser.add_argument("--encoders", default=",".join(ENCODERS), help=f"comma list of {', '.join(ENCODERS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--tiny", action="store_true", help="tiny encoders and batch: a smoke test")
    parser.add_argument("--out-json", help="also write the JSON report to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, allowed in (("encoders", ENCODERS), ("modes", MODES)):
        for value in getattr(args, name).split(","):
            if value not in allowed:
                parser.error(f"--{name}: unknown {value!r} (choose from {', '.join(allowed)})")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return None
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or (2 if args.tiny else 8)
    steps = args.steps or (1 if args.tiny else 3)
    threads = args.threads or (1 if args.tiny else os.cpu_count() or 1)
    encoders = TINY if args.tiny else ENCODERS
    runs = []
    for name in args.encoders.split(","):
        for mode in args.modes.split(","):
            runs.append(spawn_case({"name": name, "encoder": encoders[name], "mode": mode, "device": device,
                                    "batch_size": batch_size, "steps": steps, "threads": threads}))
    report = {"bench": "finetune", "config": {"device": device, "batch_size": batch_size, "steps": steps,
                                             "threads": threads, "tiny": args.tiny, "lora": LORA,
                                             "encoders": {name: encoders[name] for name in args.encoders.split(",")},
                                             "torch": torch.__version__, "python": platform.python_version(),
                                             "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
              "runs": runs}
    print(table(runs, device == "cuda"))
    print(json.dumps(report))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() is not False else 1)
