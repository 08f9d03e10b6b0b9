"""Scaling of mmvl's training throughput with the number of processes: the same CLIP model, the same per-rank
batch, trained through ``tools/train.py`` under ``torchrun`` with 1, 2, ... processes (gloo on CPU, NCCL on GPUs;
``train.strategy`` ddp or fsdp), so that the figures are those of a real run, communication and all.

``python benchmarks/bench_ddp.py`` prints a table and one JSON line ``{"bench": "ddp", ...}``. Per world size N:
global samples/s, samples/s per process, scaling efficiency = samples/s(N) / (N x samples/s(1)), ms per step,
the trainer's own ``samples_per_s`` (from ``metrics.jsonl``) as a cross-check, the data time per step, and the
peak RSS (``VmHWM``) of every rank; with ``--device cuda`` also MFU against the GPU's dense bf16 peak.

A first process (this script with ``--prepare``) writes the synthetic set (datasets/synthetic.py) once, trains
the WordPiece tokenizer once (a Trainer built with one process) and dumps the merged config every run reads:
the data cached in memory (``data.cache="memory"``, MONAI ``CacheDataset`` filled at start-up, so only the random
augmentation runs per step), ``train.num_workers=0``, no validation split, a checkpoint only after the last step.
It also counts the model's FLOPs for one forward+backward of one per-rank batch (``FlopCounterMode``; always on
CUDA, ``--flops`` on CPU). Each run is then ``python -m torch.distributed.run --standalone --nproc-per-node N``
of this script with ``--worker``: every rank calls ``tools/train.py``'s ``main`` with a timestamp taken as each
``Trainer.train_step`` starts and ends, and writes those and its own ``VmHWM`` to a file when ``main`` returns.
World size 1 goes through torchrun too, so start-up is alike; the trainer then runs without a process group
(no DDP/FSDP wrapper, no gradient all-reduce, no embedding gather): the baseline is one plain process.
Time: the window from the start of the first step after ``--warmup`` to the end of the last one, on the slowest
rank; ranks wait for one another in every step's all-reduce, so the windows differ by little. On CUDA each step's
end waits for the GPU (the trainer reads the loss and gradient norm back every step anyway, so this only adds the
optimizer's kernels). CPU time over the same window, per process, tells waiting from working. Runs alternate
between world sizes (1, 2, 1, 2 ... with ``--repeats``) and medians are reported, so that a change in the
machine's load hits every world size alike.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
os.environ.setdefault("MMVL_NO_PROGRESS", "1")
DEMO_CONFIG = REPO / "configs" / "demo" / "cxr_clip_tiny.py"  # its data pipeline and optimizer; the model is set
# Per device type: image size, patch size, ViT width x depth, BERT width x depth, embed dim, per-rank batch.
# Attention heads of 64 channels and MLPs of 4x the width throughout.
DEVICE_DEFAULTS = {
    "cpu": dict(image_size=64, patch_size=8, width=128, depth=4, text_width=128, text_depth=2, embed_dim=128,
                batch_size=16),  # the widths and depths of configs/demo/cxr_clip_tiny.py's model
    "cuda": dict(image_size=224, patch_size=16, width=768, depth=12, text_width=512, text_depth=4, embed_dim=512,
                 batch_size=128),  # ViT-B/16 + a 4-layer BERT
}
QUICK = dict(image_size=32, patch_size=8, width=32, depth=1, text_width=32, text_depth=1, embed_dim=32,
             max_length=32, batch_size=4, repeats=1, warmup=1, steps=2)
MODEL_KEYS = ("width", "depth", "patch_size", "image_size", "text_width", "text_depth", "max_length", "embed_dim")


def _sibling(name: str) -> Any:
    """Another script of benchmarks/ (not a package): FLOP counting, the peak table and the RSS readers live
    once, in bench_train.py and bench_encoders.py."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


# -- the config every run reads -----------------------------------------------------------------------------------
def train_config(spec: dict[str, Any], manifest: Path, case: dict[str, Any], tokenizer: Any, cache: str | None):
    """configs/demo/cxr_clip_tiny.py's data and optimizer with the benchmark's model, steps and batch; ``tokenizer``
    a WordPiece spec to train or the folder of one."""
    from mmvl.config import Config

    size = spec["image_size"]
    cfg = Config.fromfile(DEMO_CONFIG)
    cfg.merge_options({
        "data.manifest": str(manifest), "img_size": size,  # the size knob: model and both pipelines
        "data.val_split": None,  # no validation: only training steps are timed
        "data.cache": cache, "data.cache_workers": 0,
        "model": dict(
            image_encoder=dict(type="vit2d", model_name="vit_tiny_patch16_224", in_chans=1, img_size=size,
                               patch_size=spec["patch_size"], embed_dim=spec["width"], depth=spec["depth"],
                               num_heads=max(1, spec["width"] // 64), global_pool="avg"),
            text_encoder=dict(
                type="bert", pooling="mean", max_length=spec["max_length"],
                config=dict(hidden_size=spec["text_width"], num_hidden_layers=spec["text_depth"],
                            num_attention_heads=max(1, spec["text_width"] // 64),
                            intermediate_size=4 * spec["text_width"],
                            max_position_embeddings=max(128, spec["max_length"])),
                tokenizer=tokenizer),
            heads=[dict(type="clip", embed_dim=spec["embed_dim"])]),
        "optim.warmup_steps": max(1, case["total_steps"] // 5),
        "train.max_steps": case["total_steps"], "train.batch_size": case["batch"], "train.num_workers": 0,
        "train.log_interval": 1, "train.ckpt_interval": case["total_steps"], "train.vis_interval": 0,
        "train.seed": 0, "train.amp": None if case["amp"] == "none" else case["amp"], "train.device": case["device"],
        "train.strategy": case["strategy"],
        "train.keep_freed_memory": case["device"] == "cpu",  # glibc keeps step buffers (opt-in, process-wide)
    })
    return cfg


def prepare(case: dict[str, Any]) -> dict[str, Any]:
    """The synthetic set, the tokenizer (trained by a one-process Trainer) and ``config.py`` under ``work``;
    the parameter count and, if asked, the FLOPs of one forward+backward per sample. A process of its own: the
    Trainer attaches a log file and, on CUDA, takes GPU memory."""
    import torch

    from mmvl.engine.trainer import Trainer, to_device

    work, spec = Path(case["work"]), case["spec"]
    started = time.perf_counter()
    synthetic = importlib.util.spec_from_file_location("mmvl_datasets_synthetic", REPO / "datasets" / "synthetic.py")
    module = importlib.util.module_from_spec(synthetic)
    sys.modules[synthetic.name] = module  # its dataclasses look the module up
    synthetic.loader.exec_module(module)
    manifest = module.generate(work / "data", n=case["n_images"], size=spec["image_size"], seed=0)
    generate_s = time.perf_counter() - started
    wordpiece = dict(type="wordpiece", vocab_size=1000, min_frequency=2)
    # this Trainer takes no steps: no need to fill the data cache
    trainer = Trainer(train_config(spec, manifest, case, wordpiece, cache=None), work / "prepare")
    train_config(spec, manifest, case, str(work / "prepare" / "tokenizer"), cache="memory").dump(work / "config.py")
    result: dict[str, Any] = {
        "config": str(work / "config.py"), "manifest": str(manifest), "generate_s": round(generate_s, 1),
        "train_rows": len(trainer.train_set), "params": sum(p.numel() for p in trainer.model.parameters())}
    if case["flops"]:
        batch = to_device(next(iter(trainer.loader)), trainer.device)
        autocast = torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=case["amp"] == "bf16")
        trainer.model.train()

        def forward_backward() -> None:
            with autocast:
                loss = trainer.model(batch)["loss"]
            loss.backward()

        result["flops_per_sample"] = _sibling("bench_train").count_flops(forward_backward) / case["batch"]
    return result


# -- one rank of a run, under torchrun --------------------------------------------------------------------------
def worker(result_dir: str, train_argv: list[str], independent: bool = False) -> int:
    """``tools/train.py``'s ``main(train_argv)`` with the start and end of every ``Trainer.train_step`` stamped;
    then this rank's figures go to ``result_dir/rank<RANK>.json``. ``independent``: this process leaves the
    process group torchrun describes and trains alone, in a work dir of its own (``WORK_DIR/rank<RANK>``)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if independent:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        at = train_argv.index("--work-dir") + 1
        train_argv = [*train_argv[:at], str(Path(train_argv[at]) / f"rank{rank}"), *train_argv[at + 1:]]
    import torch

    from mmvl.engine.trainer import Trainer

    rss = _sibling("bench_encoders")
    starts: list[float] = []
    ends: list[float] = []
    cpu_starts: list[float] = []  # CPU seconds of the process (all its threads) at the same moments
    cpu_ends: list[float] = []
    built_mb: list[float] = []
    train_step = Trainer.train_step

    def timed_train_step(self: Trainer, batches: Any) -> Any:
        if not starts:
            built_mb.append(rss._current_rss_mb())  # model, optimizer and data cache built; no step yet
        starts.append(time.perf_counter())
        cpu_starts.append(time.process_time())
        logs = train_step(self, batches)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())
        return logs

    Trainer.train_step = timed_train_step  # instrumentation of this process only; the trainer is unchanged
    spec = importlib.util.spec_from_file_location("mmvl_tools_train", REPO / "tools" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    status = train.main(train_argv)
    figures = {"rank": rank, "world_size": world, "status": status,
               "pid": os.getpid(), "peak_rss_mb": round(rss._peak_rss_mb(), 1),
               "built_rss_mb": round(built_mb[0], 1) if built_mb else None, "torch_threads": torch.get_num_threads(),
               "starts": starts, "ends": ends, "cpu_starts": cpu_starts, "cpu_ends": cpu_ends}
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(figures), encoding="utf-8")
    return status


# -- one run: torchrun with N processes -------------------------------------------------------------------------
def _window(rank: dict[str, Any], warmup: int) -> tuple[float, list[float], float]:
    """Seconds from the start of step ``warmup`` (0-based) to the end of the last step, each timed step's
    milliseconds (start to next start: the trainer's bookkeeping between steps is part of a step), and the CPU
    seconds the process used meanwhile."""
    bounds = rank["starts"][warmup:] + [rank["ends"][-1]]
    cpu = rank["cpu_ends"][-1] - rank["cpu_starts"][warmup]
    return bounds[-1] - bounds[0], [1000 * (b - a) for a, b in zip(bounds, bounds[1:])], cpu


def _descendants(pid: int) -> list[int]:
    """Process ids of ``pid``'s children, theirs, and so on (Linux ``/proc``; empty elsewhere)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


def run_world(case: dict[str, Any], world: int, run_dir: Path, timeout_s: float,
              independent: bool = False) -> dict[str, Any]:
    """Train with ``world`` processes; returns the run's figures or ``{"error": ...}``. ``independent``: the
    ``world`` processes each train alone at the same time (no process group: nothing communicated, cores and
    memory shared), the ceiling that contention alone leaves for the ranks of a real run."""
    results = run_dir / "ranks"
    results.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(Path(__file__).resolve()), "--worker-independent" if independent else "--worker", str(results),
               case["config"], "--work-dir", str(run_dir / "work")]
    python_path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    env = dict(os.environ, OMP_NUM_THREADS=str(case["threads"]), MMVL_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=python_path)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    # torchrun in a session of its own, so that a run past its time is signalled with its own processes only.
    child = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        ranks = _descendants(child.pid)  # torchrun starts each rank in a session of its own
        os.killpg(child.pid, signal.SIGTERM)  # torchrun passes it on; the trainers checkpoint and exit
        try:
            stdout, stderr = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in [child.pid, *ranks]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
        return {"error": f"world size {world}: no result after {timeout_s:g} s (hang?)", "stderr_tail": stderr[-3000:]}
    run_s = time.perf_counter() - started
    ranks = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(results.glob("rank*.json"))]
    if child.returncode != 0 or len(ranks) != world or any(r["status"] != 0 for r in ranks):
        tail = (stderr.strip().splitlines() or stdout.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"world size {world}: exit {child.returncode}, {len(ranks)} of {world} ranks reported: "
                         f"{tail}", "stderr_tail": stderr[-3000:]}
    warmup, steps, batch = case["warmup"], case["steps"], case["batch"]
    windows = []
    for rank in ranks:
        if len(rank["starts"]) != warmup + steps:
            return {"error": f"world size {world}: rank {rank['rank']} took {len(rank['starts'])} steps, expected "
                             f"{warmup + steps} (skipped steps? see bad_steps.jsonl)"}
        windows.append(_window(rank, warmup))
    slowest = max(range(world), key=lambda r: windows[r][0])
    window, step_ms, _ = windows[slowest]
    samples_per_s = world * batch * steps / window
    log = run_dir / "work" / ("rank0" if independent else "") / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text("utf-8").splitlines()]
    timed = [r for r in records if "samples_per_s" in r and r["step"] > warmup]  # rank 0's log: global samples
    return {
        "world_size": world, "independent": independent, "global_batch": world * batch,
        "samples_per_s": round(samples_per_s, 3),
        "samples_per_s_per_process": round(samples_per_s / world, 3),
        "ms_per_step": round(1000 * window / steps, 2), "step_ms": [round(ms, 2) for ms in step_ms],
        "window_s_per_rank": [round(w, 4) for w, _, _ in windows],
        # CPU time / wall time of each rank in the window: about the thread count when the process always had
        # its cores, lower when it waited (for cores taken by other work, or for the other ranks)
        "cpu_util": [round(cpu / w, 3) for w, _, cpu in windows],
        "cpu_ms_per_step": [round(1000 * cpu / steps, 2) for _, _, cpu in windows],  # work per step, waits left out
        "trainer_samples_per_s": round(statistics.median(r["samples_per_s"] for r in timed), 3),
        "trainer_batch_ms": round(1000 * statistics.median(r["batch_time"] for r in timed), 2),
        "data_ms": round(1000 * statistics.median(r["data_time"] for r in timed), 2),
        "loss_first": records[0]["loss"], "loss_last": timed[-1]["loss"],
        "peak_rss_mb": [r["peak_rss_mb"] for r in ranks], "built_rss_mb": [r["built_rss_mb"] for r in ranks],
        "torch_threads": [r["torch_threads"] for r in ranks], "finished": "done: " in stdout,
        "run_s": round(run_s, 1), "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
    }


# -- the parent: runs, medians, table, JSON ----------------------------------------------------------------------
def row_key(world: int, independent: bool) -> str:
    return f"{world} ind." if independent else str(world)


def summarize(runs: list[dict[str, Any]], worlds: Sequence[int], flops_per_sample: float | None,
              peak: float | None) -> dict[str, Any]:
    """Per world size (and per ``N ind.``: N processes training alone at once): medians over its runs;
    efficiency against world size 1; TFLOP/s and MFU per process."""
    summary: dict[str, Any] = {}
    rows = [(world, False) for world in worlds]
    rows += [(world, True) for world in worlds if any(r.get("independent") and r.get("world") == world for r in runs)]
    for world, independent in rows:
        done = [r for r in runs if r.get("world_size") == world and "error" not in r
                and bool(r.get("independent")) == independent]
        if not done:
            continue
        facts: dict[str, Any] = {"runs": len(done)}
        for key in ("samples_per_s", "ms_per_step", "trainer_samples_per_s", "trainer_batch_ms", "data_ms"):
            facts[key] = round(statistics.median(r[key] for r in done), 3)
        facts["samples_per_s_per_process"] = round(facts["samples_per_s"] / world, 3)
        facts["images_per_s"] = facts["samples_per_s"]  # one image (and one report) per sample
        facts["peak_rss_mb_per_process"] = [round(statistics.median(r["peak_rss_mb"][k] for r in done), 1)
                                            for k in range(world)]
        facts["peak_rss_mb_max"] = max(facts["peak_rss_mb_per_process"])
        for key in ("cpu_util", "cpu_ms_per_step"):
            facts[f"{key}_per_process"] = [round(statistics.median(r[key][k] for r in done), 3) for k in range(world)]
        facts["runs_samples_per_s"] = [r["samples_per_s"] for r in done]
        if flops_per_sample:
            per_process = flops_per_sample * facts["samples_per_s"] / world
            facts["tflops_per_s_per_process"] = round(per_process / 1e12, 5)
            facts["mfu"] = round(per_process / peak, 4) if peak else None
        summary[row_key(world, independent)] = facts
    baseline = summary.get("1")
    for key, facts in summary.items():
        world = int(key.split()[0])
        facts["efficiency"] = (round(facts["samples_per_s"] / (world * baseline["samples_per_s"]), 3)
                               if baseline else None)
    return summary


def format_table(report: dict[str, Any]) -> str:
    config, summary = report["config"], report["summary"]
    spec, cuda = config["model"], config["device"].startswith("cuda")
    flops = any("tflops_per_s_per_process" in facts for facts in summary.values())
    lines = [
        f"Training throughput vs processes, {config['device']}"
        f"{' (' + config['gpu'] + ')' if config['gpu'] else ''}, torchrun + {config['backend']}, strategy "
        f"{config['strategy']}: CLIP, ViT {spec['width']} x {spec['depth']} blocks (patch {spec['patch_size']}, "
        f"{spec['image_size']} px) + BERT {spec['text_width']} x {spec['text_depth']} layers, embed "
        f"{spec['embed_dim']}; {config['params'] / 1e6:.2f} M parameters",
        f"  per-rank batch {config['batch_size']}, amp {config['amp']}, {config['threads']} torch thread(s) per "
        f"process; data cached in memory, num_workers 0; {config['steps']} timed steps after {config['warmup']} "
        f"warm-up; median of {config['repeats']} run(s) per world size, alternating",
        "  samples/s: global batch x timed steps / window (slowest rank); efficiency = samples/s(N) / (N x "
        "samples/s(1)); trainer = median samples_per_s of metrics.jsonl; data = median data_time per step",
        "  CPU % = CPU time / wall time of each process in the window (100 per busy thread), CPU ms/step = its CPU "
        "time per step (work, waits left out); 1 process: torchrun too, but no process group (no "
        f"{config['strategy'].upper()} wrapper, no all-reduce)",
    ]
    head = (f"  {'procs':>7}{'batch':>7}{'samples/s':>11}{'per proc':>10}{'effic.':>8}{'ms/step':>9}"
            f"{'trainer s/s':>13}{'data ms':>9}")
    head += f"{'TFLOP/s/proc':>14}{'MFU':>7}" if flops else ""
    lines.append(head + "  CPU %/proc  CPU ms/step/proc  peak RSS MB/proc")
    rows = [(world, independent) for world in config["world_sizes"]
            for independent in ((False, True) if config.get("independent") and world > 1 else (False,))]
    for world, independent in rows:
        key = row_key(world, independent)
        facts = summary.get(key)
        if facts is None:
            error = next((r["error"] for r in report["runs"] if r.get("world") == world
                          and bool(r.get("independent")) == independent and "error" in r), "?")
            lines.append(f"  {key:>7}  failed: {error[:150]}")
            continue
        efficiency = "-" if facts["efficiency"] is None else f"{facts['efficiency']:.2f}"
        row = (f"  {key:>7}{world * config['batch_size']:>7}{facts['samples_per_s']:>11.2f}"
               f"{facts['samples_per_s_per_process']:>10.2f}{efficiency:>8}{facts['ms_per_step']:>9.1f}"
               f"{facts['trainer_samples_per_s']:>13.2f}{facts['data_ms']:>9.2f}")
        if flops:
            mfu = facts.get("mfu")
            row += f"{facts['tflops_per_s_per_process']:>14.4g}{'-' if mfu is None else f'{100 * mfu:.1f}%':>7}"
        cpu = " ".join(f"{100 * u:.0f}" for u in facts["cpu_util_per_process"])
        cpu_ms = " ".join(f"{ms:.1f}" for ms in facts["cpu_ms_per_step_per_process"])
        lines.append(row + f"  {cpu:<10}  {cpu_ms:<16}  "
                     + " ".join(f"{mb:.0f}" for mb in facts["peak_rss_mb_per_process"]))
    loads = [config["load_avg_start"], config["load_avg_end"]]
    loads += [r[key] for r in report["runs"] for key in ("load_avg_start", "load_avg_end") if key in r]
    lines.append(f"  load average: {config['load_avg_start']:g} at the start, {config['load_avg_end']:g} at the end, "
                 f"up to {max(loads):g} during the runs, on {config['cpu_count']} cores")
    if config.get("independent"):
        lines.append("  N ind.: N processes training alone at the same time (no process group, nothing communicated; "
                     "cores, caches and memory bandwidth shared): the efficiency contention alone allows. The gap "
                     "between it and the N row is the cost of communication and rank agreement")
    busiest_threads = max(config["world_sizes"]) * config["threads"]
    if not cuda and busiest_threads >= (config["cpu_count"] or 1):
        lines.append(f"  note: {max(config['world_sizes'])} processes x {config['threads']} thread(s) fill the "
                     f"{config['cpu_count']} cores; they compete with whatever else runs, so an efficiency below 1 "
                     "may be contention for cores, not communication")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--world-sizes", type=int, nargs="+",
                        help="process counts (default: 1 2 on CPU; 1, 2, 4 ... and every GPU on CUDA)")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="train.strategy")
    parser.add_argument("--amp", choices=("none", "bf16"), help="default: bf16 on CUDA, none on CPU")
    parser.add_argument("--batch-size", type=int, help="per-rank batch (default: 16 on CPU, 128 on CUDA)")
    for key in ("image_size", "patch_size", "width", "depth", "text_width", "text_depth", "embed_dim"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"model: {key.replace('_', ' ')} "
                            f"(default: {DEVICE_DEFAULTS['cpu'][key]} on CPU, {DEVICE_DEFAULTS['cuda'][key]} on CUDA)")
    parser.add_argument("--max-length", type=int, default=64, help="report tokens at most")
    parser.add_argument("--threads", type=int, help="torch threads per process (OMP_NUM_THREADS; default: 1 on "
                                                     "CPU, the CPU cores over the largest world size on CUDA)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per world size, alternating; medians reported")
    parser.add_argument("--independent", action="store_true",
                        help="also run each world size N > 1 as N processes training alone at the same time, to "
                             "tell contention for the machine from the cost of communication")
    parser.add_argument("--flops", action="store_true", help="count FLOPs for TFLOP/s on CPU too (always on CUDA)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU, when its name is not "
                                                          "in bench_train.py's table")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take before it is ended")
    parser.add_argument("--quick", action="store_true", help="tiny model and batch, 1 run, 2 timed steps (tests)")
    parser.add_argument("--work-dir", help="where to write the data and runs (default: a temp folder, removed)")
    parser.add_argument("--out-json", type=Path, help="also write the JSON line to this file")
    parser.add_argument("--prepare", help=argparse.SUPPRESS)  # internal: write data, tokenizer and config
    args = parser.parse_args(argv)
    if args.prepare is not None:
        return args
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if cuda and args.device != "cuda":
        parser.error("--device cuda: rank r uses GPU r (LOCAL_RANK); do not name one")
    args.amp = args.amp or ("bf16" if cuda else "none")
    if args.amp == "bf16" and not cuda:
        parser.error("--amp bf16 needs --device cuda")
    if args.world_sizes is None:
        gpus = torch.cuda.device_count() if cuda else 2
        args.world_sizes = sorted({n for n in (1, 2, 4, 8, 16, 32, 64) if n <= gpus} | {gpus})
    if cuda and max(args.world_sizes) > torch.cuda.device_count():
        parser.error(f"--world-sizes: {max(args.world_sizes)} processes but {torch.cuda.device_count()} GPU(s)")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key, value in DEVICE_DEFAULTS["cuda" if cuda else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = 1 if not cuda else max(1, (os.cpu_count() or 1) // max(args.world_sizes))
    args.flops = args.flops or cuda
    for key in (*MODEL_KEYS, "batch_size", "threads", "steps", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if min(args.world_sizes) < 1:
        parser.error("--world-sizes must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.image_size % args.patch_size:
        parser.error(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (a contrastive loss needs negatives)")
    return args


def spawn_prepare(case: dict[str, Any]) -> dict[str, Any]:
    """``prepare`` in a fresh interpreter, outside any process group."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(MMVL_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(case["threads"]))
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--prepare", json.dumps(case)],
                           capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        raise SystemExit(f"preparation failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--worker"], ["--worker-independent"]):  # a rank under torchrun: the rest is tools/train.py's
        sys.exit(worker(argv[1], argv[2:], independent=argv[0] == "--worker-independent"))  # command line
    args = parse_args(argv)
    if args.prepare is not None:
        print(json.dumps(prepare(json.loads(args.prepare))))
        return {}
    import torch

    started = time.perf_counter()
    cuda = args.device.startswith("cuda")
    gpu = torch.cuda.get_device_name(0) if cuda else None
    peak = _sibling("bench_train").peak_flops(gpu, args.peak_tflops) if cuda else None
    spec = {key: getattr(args, key) for key in MODEL_KEYS}
    global_batch = max(args.world_sizes) * args.batch_size
    case = dict(spec=spec, batch=args.batch_size, device=args.device, amp=args.amp, strategy=args.strategy,
                threads=args.threads, flops=args.flops, warmup=args.warmup, steps=args.steps,
                total_steps=args.warmup + args.steps,
                # 80 % of the synthetic rows are training rows: 4 global batches of the largest world per epoch
                n_images=max(40, -(-4 * global_batch * 10 // 8)))
    config = {key: getattr(args, key) for key in ("device", "world_sizes", "strategy", "amp", "batch_size", "threads",
                                                   "warmup", "steps", "repeats", "quick", "independent")}
    config.update(model=spec, backend="nccl" if cuda else "gloo", gpu=gpu, peak_flops=peak,
                  cpu_count=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                  load_avg_start=round(os.getloadavg()[0], 2))
    scratch = Path(tempfile.mkdtemp(prefix="mmvl_bench_ddp_", dir=args.work_dir))
    runs: list[dict[str, Any]] = []
    try:
        print("preparing data, tokenizer and config ...", file=sys.stderr)
        prepared = spawn_prepare({**case, "work": str(scratch)})
        config.update(params=prepared["params"], train_rows=prepared["train_rows"], images=case["n_images"],
                      flops_per_sample=prepared.get("flops_per_sample"), generate_s=prepared["generate_s"])
        for repeat in range(args.repeats):
            for world, independent in [(w, i) for w in args.world_sizes
                                       for i in ((False, True) if args.independent and w > 1 else (False,))]:
                what = "independent processes" if independent else "process(es)"
                print(f"run {repeat + 1}/{args.repeats}: {world} {what} ...", file=sys.stderr)
                result = run_world({**case, "config": prepared["config"]}, world,
                                   scratch / f"run{repeat}_n{world}{'i' if independent else ''}", args.timeout,
                                   independent)
                if "error" in result:
                    print(f"  failed: {result['error']}", file=sys.stderr)
                runs.append({"world": world, "repeat": repeat, "independent": independent, **result})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    config["load_avg_end"] = round(os.getloadavg()[0], 2)
    report = {"bench": "ddp", "config": config,
              "summary": summarize(runs, args.world_sizes, config["flops_per_sample"], peak), "runs": runs,
              "total_s": round(time.perf_counter() - started, 1)}
    print(format_table(report))
    line = json.dumps(report)
    print(line)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(line + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
