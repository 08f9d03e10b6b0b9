"""Soak test of the training loop: a tiny CLIP model trained for many steps on the synthetic CXR set, with the
process's resident memory (RSS) sampled as it goes; memory that grows with the step count is a leak (logs,
RNG states, checkpoints or autograd graphs kept alive).

``python benchmarks/bench_soak.py --steps 2000`` prints a table of RSS by step and one JSON line
``{"bench": "soak", ...}`` with the start, end and maximum RSS and the least-squares slope in MB per 1,000 steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MMVL_NO_PROGRESS", "1")

# configs/demo/cxr_clip_tiny.py at 32 px with a 1-layer ViT and BERT of width 32: the loop, not the model, is
# what a soak run exercises, so steps should be as short as possible.
TINY_MODEL = [
    "img_size={size}",
    "model.image_encoder.embed_dim=32", "model.image_encoder.depth=1", "model.image_encoder.num_heads=2",
    "model.text_encoder.config.hidden_size=32", "model.text_encoder.config.num_hidden_layers=1",
    "model.text_encoder.config.num_attention_heads=2", "model.text_encoder.config.intermediate_size=64",
    "model.heads.0.embed_dim=32", "optim.warmup_steps=10",
]


def rss_mb() -> float:
    """Current resident set size of this process in MB (``/proc/self/statm``; the peak where there is no /proc)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) against step, per 1,000 steps."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return 1000.0 * cov / var if var else 0.0


def load_script(name: str):
    """Import a script from ``datasets/`` (not a package, so it cannot shadow HF ``datasets``)."""
    spec = importlib.util.spec_from_file_location(f"mmvl_script_{name}", REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    parser.add_argument("--every", type=int, default=100, help="sample RSS every N steps (default 100)")
    parser.add_argument("--warmup", type=int, default=100,
                        help="steps left out of the slope and the start figure: allocator and caches fill (100)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--n", type=int, default=200, help="synthetic studies to generate (default 200)")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--ckpt-interval", type=int, default=200)
    parser.add_argument("--val-interval", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--work-dir", help="where to write the data and the run (default: a temp folder, removed)")
    parser.add_argument("--out-json", help="also write the JSON line to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from mmvl.config import Config
    from mmvl.engine.trainer import Trainer

    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="mmvl_soak_", dir=args.work_dir))
    samples: list[tuple[int, float]] = []
    try:
        manifest = load_script("synthetic").generate(scratch / "data", n=args.n, size=args.size, seed=0)
        cfg = Config.fromfile(REPO / "configs" / "demo" / "cxr_clip_tiny.py")
        cfg.merge_options([f"data.manifest={manifest}", *(o.format(size=args.size) for o in TINY_MODEL),
                           f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                           "train.num_workers=0", f"train.log_interval={args.log_interval}",
                           f"train.ckpt_interval={args.ckpt_interval}", f"train.val_interval={args.val_interval}"])
        trainer = Trainer(cfg, scratch / "run")
        train_step = trainer.train_step

        def sampled_step(batches):
            logs = train_step(batches)
            step = trainer.step + (logs is not None)
            if logs is not None and (step % args.every == 0 or step == 1):
                samples.append((step, rss_mb()))
            return logs

        trainer.train_step = sampled_step
        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    steady = [(s, r) for s, r in samples if s >= args.warmup] or samples
    report = {
        "bench": "soak",
        "config": {key: getattr(args, key) for key in ("steps", "every", "warmup", "batch_size", "size", "n",
                                                         "log_interval", "ckpt_interval", "val_interval",
                                                         "threads")},
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "steps": trainer.step,
        "seconds": round(seconds, 2),
        "ms_per_step": round(1000 * seconds / max(trainer.step, 1), 2),
        "rss_mb": [[s, round(r, 1)] for s, r in samples],
        "rss_first_mb": round(samples[0][1], 1),
        "rss_start_mb": round(steady[0][1], 1),
        "rss_end_mb": round(samples[-1][1], 1),
        "rss_max_mb": round(max(r for _, r in samples), 1),
        "slope_mb_per_1000_steps": round(slope_per_1000(steady), 3),
    }
    print(f"{'step':>7}  {'RSS MB':>9}  {'vs start':>9}")
    for step, rss in samples:
        print(f"{step:>7}  {rss:>9.1f}  {rss - report['rss_start_mb']:>+9.1f}")
    print(f"{trainer.step} steps in {seconds:.1f} s ({report['ms_per_step']} ms/step); RSS after {args.warmup} "
          f"warm-up steps {report['rss_start_mb']} MB, end {report['rss_end_mb']} MB, max {report['rss_max_mb']} MB, "
          f"slope {report['slope_mb_per_1000_steps']:+.3f} MB per 1,000 steps")
    line = json.dumps(report)
    print(line)
    if args.out_json:
        Path(args.out_json).write_text(line + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
