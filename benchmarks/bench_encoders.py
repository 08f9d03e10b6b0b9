"""Training-step cost of the ViT image encoders: forward+backward time and peak memory of ViT-B/16 on 224 px
images and a ViT-B-sized 3D ViT on 96³ and 128³ volumes, per attention backend x gradient checkpointing x
token drop.

``python benchmarks/bench_encoders.py`` prints one table per model and one JSON line ``{"bench": "encoders", ...}``
with every figure; see benchmarks/README.md for what is measured and the options. Each case runs in a fresh
process (this script with ``--case``), so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# The encoders as configs give them; --depth/--width shrink all three for quick checks (ViT-B: 12 x 768).
MODELS = {  # key -> (title, encoder config without the case keys, spatial size of one input)
    "2d": ("2D ViT-B/16, 224 x 224 images", dict(type="timm_vit", model_name="vit_base_patch16_224", img_size=224,
                                                  global_pool="avg"), (224, 224)),
    "3d96": ("3D ViT-B/16, 96³ volumes", dict(type="vit3d", img_size=96, patch_size=16), (96, 96, 96)),
    "3d128": ("3D ViT-B/16, 128³ volumes", dict(type="vit3d", img_size=128, patch_size=16), (128, 128, 128)),
}
BACKENDS = ("sdpa", "math", "xformers")  # MMVL_ATTENTION values; the first one run is the ratios' baseline
CHECKPOINTING = (False, True)
TOKEN_DROPS = (0.0, 0.5)
INPUT_SEED, MODEL_SEED = 1234, 0


def encoder_config(model: str, depth: int, width: int) -> dict[str, Any]:
    """The model's encoder config at ``depth`` blocks of ``width`` channels (64 per head, MLP 4x, as ViT-B)."""
    config = dict(MODELS[model][1])
    heads = max(1, width // 64)
    if config["type"] == "timm_vit":
        config.update(depth=depth, embed_dim=width, num_heads=heads)  # timm create_model kwargs
    else:
        config.update(hidden_size=width, mlp_dim=4 * width, num_layers=depth, num_heads=heads)
    return config


# -- one case, in its own process ------------------------------------------------------------------------------
def _proc_status_mb(field: str) -> float | None:
    """``VmRSS``/``VmHWM`` of this process in MB (Linux), else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _ru_maxrss_mb() -> float:
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def _peak_rss_mb() -> float:
    # VmHWM is this process's own high-water mark. ru_maxrss is also at least the RSS of the process that
    # started it, as it was at exec (Linux keeps the pre-exec maximum), so under a big parent (pytest, a
    # notebook) it reports the parent; it is only the fallback where /proc is missing.
    peak = _proc_status_mb("VmHWM")
    return _ru_maxrss_mb() if peak is None else peak


def _current_rss_mb() -> float:
    rss = _proc_status_mb("VmRSS")
    return _ru_maxrss_mb() if rss is None else rss


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Build the encoder of ``case``, run warm-up then timed training steps, return the figures.

    ``MMVL_ATTENTION`` must already be set to ``case["backend"]`` (the parent sets it in the child's
    environment), since mmvl.ops reads it at each call.
    """
    import torch

    import mmvl.ops
    from mmvl.registry import ENCODERS

    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(MODEL_SEED)
    encoder = ENCODERS.build(dict(case["encoder"], grad_checkpointing=case["grad_checkpointing"],
                                  token_drop=case["token_drop"]))
    # Encoders built with attention="mmvl" patch themselves; count what is patched already, then patch the rest
    # (0 when the encoder did it all), so the backend rows differ only where attention goes through mmvl.ops.
    patched_at_build = sum(type(m).__module__.startswith("mmvl.ops") for m in encoder.modules())
    patched_by_bench = mmvl.ops.patch_attention(encoder)
    encoder.to(device).train()  # token drop applies in training mode
    params = [p for p in encoder.parameters() if p.requires_grad]
    param_mb = sum(p.numel() * p.element_size() for p in params) / 2**20
    optimizer = None
    if case["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=cuda or None)
    generator = torch.Generator().manual_seed(INPUT_SEED)  # the same input for every case of a model
    images = torch.randn(case["batch"], 1, *case["spatial"], generator=generator).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["amp"] == "bf16")

    def memory_now() -> float:
        return torch.cuda.memory_allocated(device) / 2**20 if cuda else _current_rss_mb()

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline_mb = memory_now()  # model (and input) built, before the first step
    torch.manual_seed(MODEL_SEED)  # the same dropped tokens for every case
    step_ms, tokens, dropped = [], None, False
    for step in range(case["warmup"] + case["steps"]):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        # Gradients are zeroed in place, not freed, so they (and AdamW's state) sit in memory through every
        # step after the first, as in training; the activation figure subtracts them.
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=False)
        else:
            encoder.zero_grad(set_to_none=False)
        with amp:
            output = encoder(images)
        loss = output.pooled.float().square().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        if step >= case["warmup"]:
            step_ms.append(1000 * (time.perf_counter() - start))
        tokens, dropped = int(output.tokens.shape[1]), output.keep_index is not None
    if dropped != bool(case["token_drop"]):
        raise RuntimeError(f"token_drop={case['token_drop']} but the encoder {'did' if dropped else 'did not'} "
                           "drop tokens")
    state_mb = param_mb * (3 if optimizer is not None else 1)  # gradients (+ AdamW exp_avg, exp_avg_sq)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mb()
    ms = statistics.median(step_ms)
    return {
        "ms_per_step": round(ms, 2), "samples_per_s": round(case["batch"] * 1000 / ms, 3),
        "step_ms": [round(v, 2) for v in step_ms], "peak_mb": round(peak_mb, 1), "baseline_mb": round(baseline_mb, 1),
        "state_mb": round(state_mb, 1), "activation_mb": round(peak_mb - baseline_mb - state_mb, 1),
        "ru_maxrss_mb": round(_ru_maxrss_mb(), 1), "params_m": round(sum(p.numel() for p in params) / 1e6, 2),
        "tokens": tokens, "patched_at_build": patched_at_build, "patched_by_bench": patched_by_bench,
        "attention_backend": mmvl.ops.current_backend(device), "torch_threads": torch.get_num_threads(),
    }


def run_script_case(script: Path, case: dict[str, Any], env: dict[str, str], label: str) -> dict[str, Any]:
    """``python SCRIPT --case JSON`` in a fresh interpreter: the last JSON line it printed plus ``case_s``, or
    ``{"error", "stderr_tail"}`` when it failed (``label`` names the case in the message). bench_finetune.py runs
    its cases through this too."""
    start = time.perf_counter()
    child = subprocess.run([sys.executable, str(script), "--case", json.dumps(case)],
                           capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        tail = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  {label} failed (exit {child.returncode}): {tail}", file=sys.stderr)
        return {"error": tail, "stderr_tail": child.stderr[-2000:]}
    result = json.loads(lines[-1])
    result["case_s"] = round(time.perf_counter() - start, 1)  # interpreter start-up and model build included
    return result


def spawn_case(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in a fresh interpreter; returns its figures, or ``{"error": ...}`` when it failed."""
    env = dict(os.environ, MMVL_ATTENTION=case["backend"], MMVL_NO_PROGRESS="1")
    result = run_script_case(Path(__file__).resolve(), case, env, "case")
    if "error" not in result:
        result["load_avg"] = round(os.getloadavg()[0], 2)  # this case's own threads count too
    return result


# -- the parent: cases, tables, JSON -----------------------------------------------------------------------------
def xformers_status(device: str) -> str | None:
    """None when xformers can run on ``device``, else why not."""
    from mmvl.ops import available_backends

    if "xformers" in available_backends(device):
        return None
    reasons = []
    if not device.startswith("cuda"):
        reasons.append("needs CUDA")
    if "xformers" not in available_backends(None):
        reasons.append("not installed (the '.[gpu]' extra)")
    return "; ".join(reasons) or "does not run here"


def _ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 3) if baseline > 0 else None


def add_ratios(rows: list[dict[str, Any]], baseline_backend: str) -> None:
    """Time and memory of each row relative to the model's (baseline backend, no checkpointing, no drop) row."""
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["backend"] == baseline_backend
                     and not r["grad_checkpointing"] and not r["token_drop"] and "error" not in r), None)
        if base is None or "error" in row:
            continue
        row["time_ratio"] = _ratio(row["ms_per_step"], base["ms_per_step"])
        row["peak_ratio"] = _ratio(row["peak_mb"], base["peak_mb"])
        row["activation_ratio"] = _ratio(row["activation_mb"], base["activation_mb"])


def checkpointing_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {"sdpa/drop0": {"peak": with/without, "activation": with/without}}}`` for every backend and drop."""
    found: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        if not row["grad_checkpointing"] or "error" in row:
            continue
        without = next((r for r in rows if r["model"] == row["model"] and r["backend"] == row["backend"]
                        and r["token_drop"] == row["token_drop"] and not r["grad_checkpointing"]
                        and "error" not in r), None)
        if without is not None:
            found.setdefault(row["model"], {})[f"{row['backend']}/drop{row['token_drop']:g}"] = {
                "peak": _ratio(row["peak_mb"], without["peak_mb"]),
                "activation": _ratio(row["activation_mb"], without["activation_mb"]),
                "peak_mb": [row["peak_mb"], without["peak_mb"]],
                "activation_mb": [row["activation_mb"], without["activation_mb"]],
            }
    return found


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(model: str, facts: dict[str, Any], rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    memory = "GPU memory allocated" if config["device"].startswith("cuda") else "process RSS"
    step = "forward+backward+AdamW.step" if config["optimizer"] == "adamw" else "forward+backward, no optimizer step"
    state = "gradients + AdamW state" if config["optimizer"] == "adamw" else "gradients"
    lines = [
        f"{facts['title']}, batch {facts['batch']}: {facts['params_m']} M params, {facts['tokens']} tokens",
        f"  {config['device']}, amp {config['amp']}, {step}; median of {config['steps']} step(s) after "
        f"{config['warmup']} warm-up; memory = {memory}",
        f"  model built: {facts['baseline_mb']} MB; {state} {facts['state_mb']} MB; act. = peak - model built - "
        f"{state}; ratios vs {config['baseline']}",
        f"  {'backend':<9}{'ckpt':<5}{'drop':>5}{'tokens':>7}{'ms/step':>10}{'samples/s':>10}{'peak MB':>9}"
        f"{'act. MB':>9}{'time':>8}{'peak':>7}{'act.':>7}",
    ]
    for row in rows:
        head = f"  {row['backend']:<9}{'on' if row['grad_checkpointing'] else 'off':<5}{row['token_drop']:>5g}"
        if "error" in row:
            lines.append(f"{head}  failed: {row['error'][:80]}")
            continue
        lines.append(f"{head}{row['tokens']:>7d}{row['ms_per_step']:>10.1f}{row['samples_per_s']:>10.2f}"
                     f"{row['peak_mb']:>9.0f}{row['activation_mb']:>9.0f}{_x(row.get('time_ratio')):>8}"
                     f"{_x(row.get('peak_ratio')):>7}{_x(row.get('activation_ratio')):>7}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=tuple(MODELS), help="models to run (default: all)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--amp", choices=("bf16", "none"), help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    parser.add_argument("--batch-2d", type=int, default=4, help="images per step")
    parser.add_argument("--batch-3d", type=int, default=1, help="volumes per step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps; the median is reported")
    parser.add_argument("--optimizer", choices=("none", "adamw"), default="none",
                        help="'adamw' adds AdamW.step to every step (and its state to memory)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS,
                        help="attention backends (default: sdpa, math, and xformers where it runs)")
    parser.add_argument("--depth", type=int, default=12, help="transformer blocks (ViT-B: 12)")
    parser.add_argument("--width", type=int, default=768, help="hidden size, 64 per head, MLP 4x (ViT-B: 768)")
    parser.add_argument("--out-json", type=Path, help="also write the JSON line to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args(argv)
    for key in ("batch_2d", "batch_3d", "steps", "depth", "width"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.case is not None:
        print(json.dumps(run_case(json.loads(args.case))))
        return {}
    import torch

    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    amp = args.amp or ("bf16" if device.startswith("cuda") else "none")
    unavailable = {}
    xformers_why = xformers_status(device)
    if xformers_why is not None:
        unavailable["xformers"] = xformers_why
    if args.backends:
        backends = [name for name in BACKENDS if name in args.backends]
        if "xformers" in backends and xformers_why is not None:
            raise SystemExit(f"--backends xformers: not available ({xformers_why})")
    else:
        backends = [name for name in BACKENDS if name not in unavailable]
    models = [name for name in MODELS if args.only is None or name in args.only]
    config = {key: getattr(args, key) for key in ("batch_2d", "batch_3d", "warmup", "steps", "optimizer", "depth",
                                                   "width")}
    config.update(device=device, amp=amp, backends=backends, models=models, baseline=f"{backends[0]}/no ckpt/drop 0",
                  input_seed=INPUT_SEED, model_seed=MODEL_SEED, cpu_count=os.cpu_count(),
                  torch_threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
                  gpu=torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
                  load_avg_start=round(os.getloadavg()[0], 2))  # other work on the machine skews every figure
    report: dict[str, Any] = {"bench": "encoders", "config": config, "unavailable": unavailable, "models": {},
                              "results": []}
    for name, why in unavailable.items():
        print(f"{name}: not available ({why})", file=sys.stderr)

    for model in models:
        title, _, spatial = MODELS[model]
        encoder = encoder_config(model, args.depth, args.width)
        batch = args.batch_2d if len(spatial) == 2 else args.batch_3d
        for backend, checkpointing, drop in itertools.product(backends, CHECKPOINTING, TOKEN_DROPS):
            print(f"{model}: {backend}, checkpointing {'on' if checkpointing else 'off'}, token drop {drop:g} ...",
                  file=sys.stderr)
            case = dict(encoder=encoder, spatial=list(spatial), batch=batch, device=device, amp=amp,
                        backend=backend, grad_checkpointing=checkpointing, token_drop=drop, warmup=args.warmup,
                        steps=args.steps, optimizer=args.optimizer)
            row = {"model": model, "backend": backend, "grad_checkpointing": checkpointing, "token_drop": drop}
            row.update(spawn_case(case))
            report["results"].append(row)
        done = [r for r in report["results"] if r["model"] == model and "error" not in r]
        if done:
            base = done[0]
            report["models"][model] = {
                "title": title if (args.depth, args.width) == (12, 768) else f"{title} (depth {args.depth}, "
                                                                                f"width {args.width})",
                "encoder": encoder, "input_shape": [batch, 1, *spatial], "batch": batch,
                "params_m": base["params_m"], "tokens": base["tokens"], "baseline_mb": base["baseline_mb"],
                "state_mb": base["state_mb"],
                "patched_at_build": base["patched_at_build"], "patched_by_bench": base["patched_by_bench"],
            }
    add_ratios(report["results"], backends[0])
    report["checkpointing_ratio"] = checkpointing_ratios(report["results"])
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["config"]["load_avg_end"] = round(os.getloadavg()[0], 2)

    blocks = []
    for model in models:
        rows = [r for r in report["results"] if r["model"] == model]
        if model not in report["models"]:
            blocks.append(f"{MODELS[model][0]}: every case failed ({rows[0]['error']})")
            continue
        facts = report["models"][model]
        table = format_table(model, facts, rows, config)
        patched = facts["patched_at_build"] + facts["patched_by_bench"]
        table += (f"\n  attention modules through mmvl.ops: {patched} ({facts['patched_at_build']} patched by the "
                  f"encoder, {facts['patched_by_bench']} by patch_attention here)")
        if patched == 0:
            table += "; none, so the backend rows all run the library's own attention"
        blocks.append(table)
    lines = [f"xformers: not available ({unavailable['xformers']})"] if "xformers" in unavailable else []
    # The 1-minute load average after each case: the case's own threads account for about torch_threads of it.
    busiest = max([config["load_avg_start"]] + [r["load_avg"] for r in report["results"] if "load_avg" in r])
    if busiest > (os.cpu_count() or 1) + 1:
        lines.append(f"note: other work was running (load average up to {busiest:g} on {os.cpu_count()} cores); "
                     "its timings are skewed, compare ratios from a quiet run")
    for model in models:
        key = f"{backends[0]}/drop0"
        found = report["checkpointing_ratio"].get(model, {}).get(key)
        if model.startswith("3d") and found:
            lines.append(f"{MODELS[model][0]}: peak memory with/without gradient checkpointing ({backends[0]}, no "
                         f"token drop) {found['peak_mb'][0]:.0f} / {found['peak_mb'][1]:.0f} MB = {found['peak']:.2f}x;"
                         f" activations {found['activation_mb'][0]:.0f} / {found['activation_mb'][1]:.0f} MB = "
                         f"{_x(found['activation'])}")
    print("\n\n".join(blocks + ["\n".join(lines)] if lines else blocks))
    line = json.dumps(report)
    print(line)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(line + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
