"""One GPU check for a bare CUDA machine: install, the ``gpu`` tests, training and encoder speed, the largest CT
batch, data loading against the step, and a ``torchrun`` run, each part under its own time budget and all of it
under a hard total (< 8 minutes); everything goes to ``gpu_report/`` (``report.json``, ``summary.md``,
``log.txt``), rewritten after every part so that a timeout still leaves a report.

``python benchmarks/gpu_check.py`` (or ``bash benchmarks/gpu_check.sh``) on the GPU machine; ``--dry-run`` runs the
same orchestration on a CPU with tiny sizes, reusing the current interpreter (CI runs it:
tests/benchmarks/test_gpu_check.py). See benchmarks/README.md.

Each part runs in its own process group (this file with ``--part NAME``), killed at its budget; a part writes its
result file as it goes, so a part that is killed keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
SCHEMA = 1

# name -> (seconds on the GPU machine, seconds in --dry-run, what it checks). The GPU budgets add up to 450 s of
# the 470 s total (TOTAL_BUDGET_S); the rest is process start-up and report writing. The dry run takes about a
# minute of CPU; its budgets are caps for a CI machine that other jobs share, not targets. Order is run order: the
# training figures come before the data part, which compares the loader with the step.
PARTS: dict[str, tuple[float, float, str]] = {
    "setup": (45, 60, "venv with the README's install plus the gpu extra; versions; does xformers load"),
    "gpu_tests": (110, 60, "pytest -m gpu tests/gpu tests/ops/test_attention.py"),
    "train": (90, 150, "bench_train.py: mmvl's step vs open_clip's loop, ViT-B/16 224 + BERT-base, bf16"),
    "encoders": (75, 90, "bench_encoders.py cases: 2D ViT-B/16, 3D ViT at 96^3 and 128^3"),
    "ct_batch": (45, 120, "largest CT CLIP batch at 96^3, with and without checkpointing"),
    "data": (35, 60, "2D DICOM loading, pinned memory and workers, against the training step"),
    "torchrun": (45, 180, "torchrun on every GPU: NCCL group, gathered negatives, checkpoint and resume"),
}
TOTAL_BUDGET_S = {"gpu": 470.0, "dry": 720.0}
REPORT_RESERVE_S = 3.0  # kept back from the total for the last report write
KILL_GRACE_S = 2.0  # SIGTERM, then SIGKILL after this long
STATUSES = ("pending", "running", "ok", "failed", "skipped", "timed_out")
REPORT_FIELDS = ("schema", "mode", "started", "finished", "elapsed_s", "total_budget_s", "command", "host", "device",
                 "versions", "xformers", "install", "parts")
PART_FIELDS = ("status", "budget_s", "elapsed_s", "cpu_s", "description", "error", "reason", "result", "log_tail")
DEVICE_FIELDS = ("cuda", "count", "names", "capability", "memory_gb", "driver")
VERSION_FIELDS = ("python", "torch", "torch_cuda", "cudnn", "nccl", "xformers", "mmvl", "timm", "monai",
                  "open_clip_torch", "transformers", "pydicom")
XFORMERS_FIELDS = ("installed", "version", "imports", "runs_on_cuda", "error", "mmvl_backend", "mmvl_auto_call")

# Model sizes: the GPU figures at the sizes the issue asks for, the dry run at sizes that take seconds on a core.
SIZES = {
    "gpu": dict(train_batch=256, train_args=["--image-size", "224", "--patch-size", "16", "--width", "768",
                                             "--depth", "12", "--text-width", "768",
                                             "--text-depth", "12", "--embed-dim", "512", "--max-length", "128",
                                             "--repeats", "1", "--warmup", "3", "--steps", "10"],
                enc_depth=12, enc_width=768, enc_batch_2d=64, enc_batch_3d=4, enc_steps=3, enc_warmup=1,
                enc_models=("2d", "3d96", "3d128"), ct_start=16, ct_cap=4096, ct_text_length=256,
                data_n=96, data_repeats=4, data_size=512, data_batch=64, tests_args=[]),
    "dry": dict(train_batch=4, train_args=["--quick", "--flops"],
                enc_depth=1, enc_width=64, enc_batch_2d=2, enc_batch_3d=1, enc_steps=1, enc_warmup=0,
                enc_models=("2d",), ct_start=2, ct_cap=16, ct_text_length=8,
                data_n=12, data_repeats=2, data_size=64, data_batch=4, tests_args=[]),
}
DRY_CT_CAPACITY = 6  # --dry-run: a CPU never runs out of memory, so batches above this are refused as if it did


# -- small helpers -------------------------------------------------------------------------------------------------
def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON through a temporary file, so a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_bench(name: str) -> Any:
    """A sibling benchmark script as a module."""
    spec = importlib.util.spec_from_file_location(f"mmvl_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_out_of_memory(text: str) -> bool:
    return "out of memory" in text.lower() or "OutOfMemoryError" in text


class PartResult:
    """What a part reports, written to its result file after every update (the parent reads it, also after a
    kill). ``status`` is the part's own verdict: ``ok``, ``failed`` (with ``error``) or ``skipped`` (``reason``)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"status": "ok", "result": {}}

    def update(self, **result: Any) -> None:
        self.data["result"].update(result)
        write_json(self.path, self.data)

    def fail(self, error: str) -> None:
        self.data.update(status="failed", error=error)
        write_json(self.path, self.data)

    def skip(self, reason: str) -> None:
        self.data.update(status="skipped", reason=reason)
        write_json(self.path, self.data)


def run_logged(command: Sequence[str], log: Path, timeout_s: float, env: dict[str, str] | None = None,
               cwd: Path = REPO) -> tuple[int | None, str]:
    """Run ``command`` with its output appended to ``log``; ``(exit status or None on timeout, output tail)``."""
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(str(c) for c in command)}\n")
        out.flush()
        try:
            child = subprocess.run(list(map(str, command)), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   timeout=max(1.0, timeout_s), start_new_session=True)
            code: int | None = child.returncode
        except subprocess.TimeoutExpired:
            code = None
    with open(log, encoding="utf-8", errors="replace") as text:
        text.seek(start)
        return code, text.read()[-3000:]


# -- part: setup ---------------------------------------------------------------------------------------------------
def requirement_names() -> list[str]:
    """The distribution names of setup.cfg's install_requires and the gpu extra, in order."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    lines = parser["options"]["install_requires"].splitlines()
    lines += parser["options.extras_require"]["gpu"].splitlines()
    names = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0])
    return names


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip()] = version.strip()
    return pins


def readme_install_command(python: str, wheelhouse: Path | None) -> list[str]:
    """The README's install (``pip --isolated install -c constraints.txt -e '.[...]'``) with the gpu extra; with
    a wheelhouse, from its wheels alone (the GPU machine reaches no package registry)."""
    command = [python, "-m", "pip", "--isolated", "--disable-pip-version-check", "install", "--retries", "0",
               "--timeout", "15", "-c", "constraints.txt"]
    if wheelhouse is not None:
        command += ["--no-index", "--find-links", str(wheelhouse)]
    return command + ["-e", ".[gpu]"]


def part_setup(ctx: dict[str, Any], out: PartResult) -> None:
    log = Path(ctx["log"])
    deadline = ctx["deadline"]
    wheelhouse = Path(ctx["wheelhouse"]) if ctx.get("wheelhouse") else None
    attempts: list[dict[str, Any]] = []
    python = ctx.get("python")
    if ctx["dry_run"] or python:
        python = python or sys.executable
        out.update(install={"mode": "reused", "python": python, "attempts": attempts,
                            "note": "--dry-run/--python: the given interpreter, nothing installed"}, python=python)
    else:
        base = sys.executable  # the interpreter gpu_check.sh was started with: the machine's python3
        venv = Path(ctx["venv"])
        # 1. The README's way: a fresh venv, pip install -c constraints.txt -e '.[gpu]' (torch==2.13.0 pinned).
        shutil.rmtree(venv, ignore_errors=True)
        start = time.perf_counter()
        code, tail = run_logged([base, "-m", "venv", str(venv)], log, deadline - time.time() - 20)
        venv_python = str(venv / "bin" / "python")
        if code == 0:
            code, tail = run_logged(readme_install_command(venv_python, wheelhouse), log,
                                    deadline - time.time() - 20)
        attempts.append({"how": "README: venv + pip --isolated install -c constraints.txt -e '.[gpu]'"
                                + (f" from {wheelhouse}" if wheelhouse else ""),
                         "exit": code, "seconds": round(time.perf_counter() - start, 1),
                         "timed_out": code is None, "tail": tail[-1500:],
                         "registry_unreachable": bool(re.search(r"NewConnectionError|Temporary failure in name "
                                                                r"resolution|Network is unreachable|No matching "
                                                                r"distribution", tail))})
        out.update(install={"mode": "readme", "python": venv_python, "attempts": attempts})
        python = venv_python
        if code != 0:
            # 2. The machine's own python and torch (a CUDA image's python3 is often itself a venv, whose packages
            # a new --system-site-packages venv would not see): the wheelhouse's wheels into a folder of their own
            # (pip --target, no registry), that folder and this checkout on PYTHONPATH for every later part.
            site = venv.with_name(venv.name + "-site")
            shutil.rmtree(site, ignore_errors=True)
            start = time.perf_counter()
            python = base
            wheels = sorted(str(w) for w in wheelhouse.glob("*.whl")) if wheelhouse else []
            code, tail = 0, "no wheelhouse given (--wheelhouse): nothing to install"
            if wheels:
                code, tail = run_logged([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                         "--no-compile", "--disable-pip-version-check", "--target", str(site),
                                         *wheels], log, deadline - time.time() - 15)
            pythonpath = os.pathsep.join([str(site), str(REPO)] if wheels else [str(REPO)])
            attempts.append({"how": f"fallback: {python} as it is (its own torch), mmvl from the checkout on "
                                    "PYTHONPATH" + (f", {len(wheels)} wheels from {wheelhouse} into {site}"
                                                    if wheels else ""),
                             "exit": code, "seconds": round(time.perf_counter() - start, 1), "tail": tail[-1500:]})
            out.update(install={"mode": "fallback", "python": python, "attempts": attempts},
                       pythonpath=pythonpath)
            os.environ["PYTHONPATH"] = pythonpath  # for the probe below
            if code != 0:
                out.fail(f"the wheelhouse did not install (exit {code}); the parts run without it")
        out.update(python=python)
    # What the chosen interpreter holds: requirements, the pin, the device and xformers (a probe process).
    code = ("import json, sys; from importlib.metadata import version, PackageNotFoundError\n"
            "def v(n):\n try: return version(n)\n except PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    names = requirement_names()
    found = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, timeout=60)
    installed = json.loads(found.stdout) if found.returncode == 0 else {}
    pins = pinned_versions()
    install = dict(out.data["result"]["install"])
    install.update(requirements=installed, missing=[n for n in names if installed.get(n) is None],
                   pins={n: {"pinned": v, "installed": installed.get(n)} for n, v in pins.items()},
                   pins_met=all(installed.get(n) == v or str(installed.get(n, "")).startswith(v + "+")
                                for n, v in pins.items()))
    out.update(install=install)
    probe = subprocess.run([python, __file__, "--probe"], capture_output=True, text=True, cwd=REPO,
                           timeout=max(5.0, deadline - time.time() - 2))
    lines = [line for line in probe.stdout.splitlines() if line.startswith("{")]
    if probe.returncode != 0 or not lines:
        out.fail(f"the environment probe failed: {(probe.stderr.strip().splitlines() or ['no output'])[-1]}")
        return
    out.update(environment=json.loads(lines[-1]))
    if install["missing"]:
        out.update(note="missing requirements: " + ", ".join(install["missing"]) + " (carry them as wheels: "
                        "--wheelhouse, see benchmarks/README.md); parts that need them fail")


def probe_environment() -> dict[str, Any]:
    """Device, driver, versions and xformers, as the interpreter running this sees them."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def dist_version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    device = {"cuda": cuda, "count": count, "names": [torch.cuda.get_device_name(i) for i in range(count)],
              "capability": [list(torch.cuda.get_device_capability(i)) for i in range(count)],
              "memory_gb": [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1) for i in range(count)],
              "driver": None}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        device["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    nccl = None
    if cuda:
        with contextlib.suppress(Exception):
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
    versions = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                "nccl": nccl, "xformers": dist_version("xformers"), "mmvl": dist_version("mmvl"),
                **{name: dist_version(name) for name in ("timm", "monai", "open_clip_torch", "transformers",
                                                         "pydicom")}}
    if versions["mmvl"] is None:
        with contextlib.suppress(Exception):
            import mmvl

            versions["mmvl"] = f"{mmvl.__version__} (checkout)"
    xformers: dict[str, Any] = {"installed": versions["xformers"] is not None, "version": versions["xformers"],
                                "imports": False, "runs_on_cuda": None, "error": None, "mmvl_backend": None,
                                "mmvl_auto_call": None}
    if xformers["installed"]:
        try:
            import xformers.ops as xops

            xformers["imports"] = True
            if cuda:
                q = torch.randn(2, 77, 4, 64, device="cuda", dtype=torch.bfloat16)
                xops.memory_efficient_attention(q, q, q)
                torch.cuda.synchronize()
                xformers["runs_on_cuda"] = True
        except Exception as error:  # what a wheel built for another torch does: recorded, not raised
            xformers["error"] = f"{type(error).__name__}: {error}"[:1000]
            if xformers["imports"]:
                xformers["runs_on_cuda"] = False
    try:
        import logging

        from mmvl.ops import attention, current_backend

        xformers["mmvl_backend"] = current_backend("cuda" if cuda else "cpu", torch.bfloat16 if cuda else None)
        if cuda:  # what an automatic call then does: xformers' kernels, or SDPA after a warning (once per reason)
            warnings: list[str] = []
            handler = logging.Handler(logging.WARNING)
            handler.emit = lambda record: warnings.append(record.getMessage())
            logging.getLogger("mmvl").addHandler(handler)
            q = torch.randn(2, 4, 77, 64, device="cuda", dtype=torch.bfloat16)
            attention(q, q, q)
            torch.cuda.synchronize()
            logging.getLogger("mmvl").removeHandler(handler)
            xformers["mmvl_auto_call"] = "; ".join(warnings) or f"ran on {xformers['mmvl_backend']}"
    except Exception as error:
        xformers["mmvl_backend"] = f"mmvl.ops failed: {type(error).__name__}: {error}"[:500]
    return {"device": device, "versions": versions, "xformers": xformers}


# -- part: gpu_tests -------------------------------------------------------------------------------------------------
TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def part_gpu_tests(ctx: dict[str, Any], out: PartResult) -> None:
    junit = Path(tempfile.mkdtemp(prefix="mmvl_gpu_tests_")) / "junit.xml"
    command = [ctx["python"], "-m", "pytest", "-m", "gpu", "tests/gpu", "tests/ops/test_attention.py", "-v",
               "-p", "no:randomly", f"--junitxml={junit}", *ctx["sizes"]["tests_args"]]
    outcomes: dict[str, str] = {}
    out.update(command=" ".join(command), outcomes=outcomes)
    with open(ctx["log"], "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                 env=dict(os.environ, MMVL_NO_PROGRESS="1"))
        for line in child.stdout:
            log.write(line)
            found = TEST_LINE.match(line)
            if found:  # one line per finished test: a kill keeps the outcomes so far
                outcomes[found.group(1)] = found.group(2).lower()
                out.update(outcomes=outcomes)
        code = child.wait()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures, skip_reasons = [], {}
    if junit.exists():
        root = ElementTree.parse(junit).getroot()
        for case in root.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            failed = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            if failed is not None:
                counts["failed" if failed.tag == "failure" else "errors"] += 1
                failures.append({"test": name, "message": (failed.get("message") or "")[:600]})
            elif skipped is not None:
                counts["skipped"] += 1
                reason = (skipped.get("message") or "")[:200]
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
            else:
                counts["passed"] += 1
    shutil.rmtree(junit.parent, ignore_errors=True)
    out.update(exit=code, counts=counts, failures=failures, skip_reasons=skip_reasons)
    if code not in (0, 5) or counts["failed"] or counts["errors"]:  # 5: nothing collected/selected
        out.fail(f"{counts['failed']} failed, {counts['errors']} errors (pytest exit {code}): "
                 + "; ".join(f["test"] for f in failures[:5]))
    elif not ctx["cuda"]:
        out.update(note="no CUDA: every gpu test skips, as in CI")


# -- part: train -------------------------------------------------------------------------------------------------------
def part_train(ctx: dict[str, Any], out: PartResult) -> None:
    """bench_train.py at the largest batch <= 256 that fits (halved after an out-of-memory)."""
    sizes = ctx["sizes"]
    batch = sizes["train_batch"]
    attempts = []
    device = "cuda" if ctx["cuda"] else "cpu"
    while batch >= 2:
        report_path = Path(tempfile.mkdtemp(prefix="mmvl_gpu_train_")) / "train.json"
        command = [ctx["python"], BENCHMARKS / "bench_train.py", "--device", device, *sizes["train_args"],
                   "--out-json", report_path]
        if not ctx["dry_run"]:
            command += ["--batch-size", str(batch)]
        code, tail = run_logged(command, Path(ctx["log"]), ctx["deadline"] - time.time(),
                                env=dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"))
        report = read_json(report_path) or {}
        shutil.rmtree(report_path.parent, ignore_errors=True)
        errors = [run.get("stderr_tail", run.get("error", "")) for run in report.get("runs", []) if "error" in run]
        attempts.append({"batch": batch, "exit": code, "errors": [e[-600:] for e in errors]})
        out.update(attempts=attempts)
        if code == 0 and report and not (errors and all(is_out_of_memory(e) for e in errors)):
            summary = report.get("summary", {})
            sides = summary.get("sides", {})
            figures = {side: {key: facts.get(key) for key in ("samples_per_s", "ms_per_step", "tflops_per_s", "mfu",
                                                               "peak_mb", "params", "optimizer", "attention",
                                                               "loss_first", "loss_last")}
                       for side, facts in sides.items()}
            out.update(batch=report["config"]["batch_size"], amp=report["config"]["amp"],
                       model=report["config"]["model"], gpu=report["config"].get("gpu"),
                       peak_flops=report["config"].get("peak_flops"), sides=figures,
                       speed_ratio=summary.get("speed_ratio"), memory_ratio=summary.get("memory_ratio"),
                       params_equal=summary.get("params_equal"), total_s=report.get("total_s"))
            if set(sides) != {"mmvl", "open_clip"}:
                out.fail("a side failed: " + "; ".join(e.strip().splitlines()[-1] for e in errors if e.strip()))
            return
        if code is None:
            out.fail("bench_train.py ran out of the part's time")
            return
        if not (is_out_of_memory(tail) or (errors and all(is_out_of_memory(e) for e in errors))):
            out.fail(f"bench_train.py failed (exit {code}): {(tail.strip().splitlines() or ['no output'])[-1]}")
            return
        batch //= 2  # out of memory: half the batch
    out.fail("out of memory down to batch 2")


# -- part: encoders ----------------------------------------------------------------------------------------------------
def free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_encoders(ctx: dict[str, Any], out: PartResult) -> None:
    """bench_encoders.py's own cases (``run_case``), in this one process per part rather than one process per
    case: 36 interpreter starts would take the part's whole budget. CUDA peaks are reset per case, so each row's
    peak memory is its own; on a CPU (dry run) the peak is the process's."""
    import itertools

    bench = load_bench("bench_encoders")
    sizes = ctx["sizes"]
    device = "cuda" if ctx["cuda"] else "cpu"
    amp = "bf16" if ctx["cuda"] else "none"
    why_not = bench.xformers_status(device)
    if why_not is None and ctx.get("xformers_runs") is False:  # imports (so mmvl lists it) but its kernels fail
        why_not = f"imports, but its kernels do not run with this torch: {ctx.get('xformers_error')}"
    backends = [b for b in bench.BACKENDS if b != "xformers" or why_not is None]
    rows: list[dict[str, Any]] = []
    out.update(device=device, amp=amp, backends=backends, unavailable={"xformers": why_not} if why_not else {},
               config={k: sizes[k] for k in ("enc_depth", "enc_width", "enc_batch_2d", "enc_batch_3d", "enc_steps",
                                             "enc_warmup")}, results=rows)
    for model in sizes["enc_models"]:
        _, _, spatial = bench.MODELS[model]
        encoder = bench.encoder_config(model, sizes["enc_depth"], sizes["enc_width"])
        batch = sizes["enc_batch_2d"] if len(spatial) == 2 else sizes["enc_batch_3d"]
        for backend, checkpointing, drop in itertools.product(backends, bench.CHECKPOINTING, bench.TOKEN_DROPS):
            case = dict(encoder=encoder, spatial=list(spatial), batch=batch, device=device, amp=amp, backend=backend,
                        grad_checkpointing=checkpointing, token_drop=drop, warmup=sizes["enc_warmup"],
                        steps=sizes["enc_steps"], optimizer="none")
            row = {"model": model, "backend": backend, "grad_checkpointing": checkpointing, "token_drop": drop,
                   "batch": batch}
            os.environ["MMVL_ATTENTION"] = backend  # mmvl.ops reads it at every call
            try:
                row.update(bench.run_case(case))
            except Exception as error:  # an out-of-memory or a kernel that refuses: the row says so
                row["error"] = f"{type(error).__name__}: {error}"[:600]
            free_device_memory()
            rows.append(row)
            out.update(results=rows)
    bench.add_ratios(rows, backends[0])
    out.update(results=rows, checkpointing_ratio=bench.checkpointing_ratios(rows))
    failed = [r for r in rows if "error" in r]
    if failed:
        out.fail(f"{len(failed)} of {len(rows)} cases failed, first: {failed[0]['model']}/{failed[0]['backend']}: "
                 f"{failed[0]['error'][:300]}")


# -- part: ct_batch ----------------------------------------------------------------------------------------------------
def largest_fitting(fits: Callable[[int], bool], start: int, cap: int, time_left: Callable[[], float],
                    resolution: float = 1 / 32) -> dict[str, Any]:
    """The largest batch for which ``fits(batch)`` holds: doubling from ``start`` to the first failure (or
    ``cap``), then bisection until the bracket is within ``resolution`` of the answer. Stops early when
    ``time_left()`` reaches 0; ``complete`` says whether the answer is the bracket's end or the time's."""
    largest, smallest_failing, tried = 0, None, []
    batch = start
    while batch <= cap and time_left() > 0:  # grow
        ok = fits(batch)
        tried.append(batch)
        if not ok:
            smallest_failing = batch
            break
        largest = batch
        if batch == cap:
            break
        batch = min(cap, batch * 2)
    if largest == 0 and smallest_failing is not None and smallest_failing > 1:
        low, high = 0, smallest_failing  # even the start failed: search below it
    else:
        low, high = largest, smallest_failing
    while high is not None and high - low > max(1, int(low * resolution)) and time_left() > 0:
        middle = (low + high) // 2
        tried.append(middle)
        if fits(middle):
            low = middle
        else:
            high = middle
    largest = max(largest, low)
    complete = (high is None and largest == cap) or (high is not None and high - largest <= max(1, int(
        largest * resolution)))
    return {"largest": largest, "smallest_failing": high, "tried": tried, "complete": complete, "cap": cap}


def ct_clip_model(checkpointing: bool, dry_run: bool, tokenizer_dir: Path) -> Any:
    """configs/ct_clip.py's model (3D ViT-B + BERT-base; the demo's tiny one in a dry run) at 96^3."""
    from mmvl.config import Config
    from mmvl.models.vlm import build_model

    cfg = Config.fromfile(REPO / "configs" / ("demo/ct_clip_tiny.py" if dry_run else "ct_clip.py"))
    model_cfg = cfg["model"].to_dict() if hasattr(cfg["model"], "to_dict") else dict(cfg["model"])
    size = 16 if dry_run else 96
    model_cfg["image_encoder"] = dict(model_cfg["image_encoder"], img_size=(size, size, size),
                                      grad_checkpointing=checkpointing)
    model_cfg["text_encoder"] = dict(model_cfg["text_encoder"], tokenizer=str(tokenizer_dir),
                                     grad_checkpointing=checkpointing)
    patch = model_cfg["image_encoder"]["patch_size"]
    return build_model(model_cfg), size, [patch] * 3 if isinstance(patch, int) else list(patch)


def part_ct_batch(ctx: dict[str, Any], out: PartResult) -> None:
    import torch

    from mmvl.data.tokenizer import train_wordpiece_tokenizer

    sizes, dry = ctx["sizes"], ctx["dry_run"]
    device = torch.device("cuda" if ctx["cuda"] else "cpu")
    scratch = Path(tempfile.mkdtemp(prefix="mmvl_gpu_ct_"))
    words = ("no focal consolidation pleural effusion pneumothorax nodule right left upper lower lobe mediastinal "
             "lymph node enlarged heart size normal emphysema atelectasis ground glass opacity").split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(200)]
    tokenizer = train_wordpiece_tokenizer(texts, scratch / "tokenizer", vocab_size=30000, min_frequency=1)
    length = sizes["ct_text_length"]
    results: dict[str, Any] = {}
    # The vocabulary is the few words above (BERT-base's 30k-word embedding would add ~0.4 GB with AdamW, a
    # constant beside the per-sample activations the search is about).
    out.update(text_tokens=length, vocab=len(tokenizer), simulated_capacity=DRY_CT_CAPACITY if dry else None,
               searches=results)
    for index, checkpointing in enumerate((False, True)):
        key = "checkpointing" if checkpointing else "no_checkpointing"
        torch.manual_seed(0)
        model, side, patch = ct_clip_model(checkpointing, dry, scratch / "tokenizer")
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        probes: list[dict[str, Any]] = []
        share_end = ctx["deadline"] - (ctx["deadline"] - time.time()) / 2 if index == 0 else ctx["deadline"]

        def fits(batch: int, model=model, optimizer=optimizer, probes=probes, side=side, key=key) -> bool:
            start = time.perf_counter()
            if dry and batch > DRY_CT_CAPACITY:
                probes.append({"batch": batch, "fits": False, "simulated": True})
                return False
            images = ids = loss = None
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                images = torch.randn(batch, 1, side, side, side, device=device)
                ids = torch.randint(5, len(tokenizer), (batch, length), device=device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = model({"image": images, "input_ids": ids, "attention_mask": torch.ones_like(ids)})["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                ok = bool(torch.isfinite(loss))
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                probes.append({"batch": batch, "fits": ok, "ms": round(1000 * (time.perf_counter() - start), 1),
                               "peak_gb": None if peak is None else round(peak, 2)})
                return ok
            except RuntimeError as error:  # torch.OutOfMemoryError, or cuBLAS failing to get its workspace
                if not (is_out_of_memory(str(error)) or "ALLOC_FAILED" in str(error)):
                    raise
                probes.append({"batch": batch, "fits": False, "ms": round(1000 * (time.perf_counter() - start), 1)})
                return False
            finally:  # nothing of this probe may stay allocated into the next one
                images = ids = loss = None
                optimizer.zero_grad(set_to_none=True)
                free_device_memory()
                results[key] = {"probes": probes}
                out.update(searches=results)

        found = largest_fitting(fits, sizes["ct_start"], sizes["ct_cap"], lambda end=share_end: end - time.time())
        tokens = math.prod(side // p for p in patch)
        results[key] = {**found, "probes": probes, "volume": [side] * 3, "patch": patch, "tokens": tokens,
                        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
        out.update(searches=results)
        del model, optimizer
        free_device_memory()
    shutil.rmtree(scratch, ignore_errors=True)
    off, on = results["no_checkpointing"]["largest"], results["checkpointing"]["largest"]
    out.update(largest_batch={"no_checkpointing": off, "checkpointing": on},
               checkpointing_gain=round(on / off, 2) if off else None)


# -- part: data --------------------------------------------------------------------------------------------------------
def part_data(ctx: dict[str, Any], out: PartResult) -> None:
    """bench_data's 2D DICOM collection and pipeline through a DataLoader with workers and pinned memory, copied
    to the device batch by batch, against the samples/s of the training step (the train part's mmvl side)."""
    import torch
    from torch.utils.data import ConcatDataset, DataLoader

    from mmvl.data.datasets import ManifestDataset
    from mmvl.data.loader import Collate

    bench = load_bench("bench_data")
    sizes = ctx["sizes"]
    cuda = ctx["cuda"]
    device = torch.device("cuda" if cuda else "cpu")
    workers = max(1, min(8, (os.cpu_count() or 2) - 2)) if cuda else 1
    scratch = Path(tempfile.mkdtemp(prefix="mmvl_gpu_data_"))
    start = time.perf_counter()
    manifest = bench.make_cxr(scratch, sizes["data_n"], sizes["data_size"])
    out.update(items=sizes["data_n"], passes=sizes["data_repeats"], source_px=sizes["data_size"],
               image_px=bench.IMG_SIZE, make_s=round(time.perf_counter() - start, 1), workers=workers, pin_memory=cuda,
               batch=sizes["data_batch"], pin_memory_note=None if cuda else "no CUDA: nothing to pin for")
    # The scans are read again on every pass (no cache): data_repeats passes without writing as many files.
    dataset = ConcatDataset([ManifestDataset(manifest, bench.CXR_PIPELINE)] * sizes["data_repeats"])
    loader = DataLoader(dataset, batch_size=sizes["data_batch"], num_workers=workers, pin_memory=cuda,
                        collate_fn=Collate(), prefetch_factor=4, persistent_workers=False)
    seen, first_at = 0, None
    start = time.perf_counter()
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True)
        if cuda:
            torch.cuda.synchronize(device)
        seen += image.shape[0]
        if first_at is None:
            first_at, first_seen = time.perf_counter(), seen  # worker start-up and the first batch
    end = time.perf_counter()
    total_s = end - start
    shutil.rmtree(scratch, ignore_errors=True)
    steady = (seen - first_seen) / (end - first_at) if seen > first_seen else None
    step_rate = ctx.get("train_samples_per_s")
    out.update(samples=seen, loader_samples_per_s=round(seen / total_s, 1),
               loader_steady_samples_per_s=None if steady is None else round(steady, 1),
               first_batch_s=round(first_at - start, 2), train_step_samples_per_s=step_rate,
               loader_over_step=round(steady / step_rate, 2) if steady and step_rate else None,
               feeds_the_step=None if not (steady and step_rate) else steady >= step_rate)
    if seen != len(dataset):
        out.fail(f"the loader yielded {seen} of {len(dataset)} items")


# -- part: torchrun ----------------------------------------------------------------------------------------------------
def gather_worker(result_dir: str) -> int:
    """Under torchrun: the process group on NCCL (gloo without CUDA), even for one process, and mmvl's gather of
    contrastive embeddings with gradients. Writes ``rank<N>.json``."""
    import torch
    import torch.distributed as dist

    from mmvl.ops.gather import all_gather_rows

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    rows = 4
    embeddings = torch.full((rows, 8), float(rank + 1), device=device, requires_grad=True)
    gathered, offset = all_gather_rows(embeddings)
    (gathered.square().sum() / 2).backward()  # with gather_with_grad each rank gets its own rows' gradient back
    expected = torch.cat([torch.full((rows, 8), float(r + 1)) for r in range(world)])
    result = {"rank": rank, "world_size": world, "backend": dist.get_backend(), "rows": int(gathered.shape[0]),
              "offset": offset, "gathered_ok": bool(torch.equal(gathered.detach().cpu(), expected)),
              "grad_ok": bool(torch.allclose(embeddings.grad.cpu(), world * embeddings.detach().cpu()))}
    dist.barrier()
    dist.destroy_process_group()
    write_json(Path(result_dir) / f"rank{rank}.json", result)
    return 0


TORCHRUN_OPTIONS = ["train.num_workers=0", "train.log_interval=1", "train.val_interval=1000", "optim.warmup_steps=0",
                    "train.batch_size=8", "train.ckpt_interval=2", "train.plots=False"]


def part_torchrun(ctx: dict[str, Any], out: PartResult) -> None:
    import torch

    nproc = max(1, torch.cuda.device_count()) if ctx["cuda"] else 1
    scratch = Path(tempfile.mkdtemp(prefix="mmvl_gpu_torchrun_"))
    env = dict(os.environ, MMVL_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launcher = [ctx["python"], "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    log = Path(ctx["log"])
    out.update(nproc=nproc)
    code, tail = run_logged([*launcher, __file__, "--gather-worker", scratch], log, ctx["deadline"] - time.time(),
                            env=env)
    ranks = [read_json(scratch / f"rank{r}.json") for r in range(nproc)]
    gather = {"exit": code, "ranks": ranks,
              "ok": code == 0 and all(r and r["gathered_ok"] and r["grad_ok"] for r in ranks)}
    out.update(gather=gather, backend=ranks[0]["backend"] if ranks[0] else None)
    # A short training run under torchrun, then --resume to twice the steps: checkpoint written and taken up.
    manifest = load_bench("bench_data").make_cxr(scratch / "data", 8 * nproc * 2, 32 if ctx["dry_run"] else 64)
    work = scratch / "work"
    options = [f"data.manifest={manifest}", *TORCHRUN_OPTIONS]
    if ctx["dry_run"]:
        options += ["model.image_encoder.depth=1", "model.text_encoder.config.num_hidden_layers=1"]
    train = [*launcher, REPO / "tools" / "train.py", REPO / "configs" / "demo" / "cxr_clip_tiny.py", "--work-dir",
             work]
    code, tail = run_logged([*train, "--cfg-options", *options, "train.max_steps=2"], log,
                            ctx["deadline"] - time.time(), env=env)
    written = sorted(p.name for p in (work / "checkpoints").glob("*.pt")) if (work / "checkpoints").is_dir() else []
    first = {"exit": code, "checkpoints": written, "done": "done: 2 steps" in tail}
    out.update(first_run=first)
    code, tail = run_logged([*train, "--resume", "--resume-override", "train.max_steps=4", "--cfg-options", *options,
                             "train.max_steps=2"], log, ctx["deadline"] - time.time(), env=env)
    resumed = {"exit": code, "resumed": "resumed from" in tail, "done": "done: 4 steps" in tail,
               "checkpoints": sorted(p.name for p in (work / "checkpoints").glob("*.pt"))}
    out.update(resumed_run=resumed)
    shutil.rmtree(scratch, ignore_errors=True)
    problems = [what for what, ok in (("gather", gather["ok"]), ("first run", first["exit"] == 0 and written),
                                      ("resume", resumed["exit"] == 0 and resumed["resumed"] and resumed["done"]))
                if not ok]
    if problems:
        out.fail("failed: " + ", ".join(problems) + f" (see log.txt); last line: "
                 f"{(tail.strip().splitlines() or ['no output'])[-1][:300]}")


PART_FUNCTIONS: dict[str, Callable[[dict[str, Any], PartResult], None]] = {
    "setup": part_setup, "gpu_tests": part_gpu_tests, "train": part_train, "encoders": part_encoders,
    "ct_batch": part_ct_batch, "data": part_data, "torchrun": part_torchrun,
}


# -- the parent: budgets, processes, report ---------------------------------------------------------------------------
def new_report(args: argparse.Namespace, mode: str, total: float) -> dict[str, Any]:
    return {
        "schema": SCHEMA, "mode": mode, "started": now_iso(), "finished": None, "elapsed_s": 0.0,
        "total_budget_s": total, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "host": {"hostname": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                 "launcher_python": sys.executable},
        "device": {key: None for key in DEVICE_FIELDS},
        "versions": {key: None for key in VERSION_FIELDS},
        "xformers": {key: None for key in XFORMERS_FIELDS},
        "install": None,
        "parts": {name: {"status": "pending", "budget_s": None, "elapsed_s": None, "cpu_s": None,
                         "description": PARTS[name][2],
                         "error": None, "reason": None, "result": {}, "log_tail": None} for name in PARTS},
    }


def kill_group(child: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)
        try:
            child.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(name: str, budget: float, ctx: dict[str, Any], python: str, out_dir: Path) -> dict[str, Any]:
    """Run one part in its own process group, killed at ``budget`` seconds; returns its report entry."""
    result_path = out_dir / f".part_{name}.json"
    result_path.unlink(missing_ok=True)
    ctx = dict(ctx, deadline=time.time() + budget)
    log = Path(ctx["log"])
    with open(log, "a", encoding="utf-8") as stream:
        stream.write(f"\n===== {name} (budget {budget:.0f} s) {now_iso()}\n")
    import resource

    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a", encoding="utf-8") as stream:
        # A dry run's CPU is shared with other jobs: one torch thread per process, or idle OpenMP threads spin.
        env = dict(os.environ, OMP_NUM_THREADS="1") if ctx["dry_run"] else None
        child = subprocess.Popen([python, __file__, "--part", name, "--result", str(result_path), "--context",
                                  json.dumps(ctx)], stdout=stream, stderr=subprocess.STDOUT, cwd=REPO,
                                 start_new_session=True, env=env)
        try:
            code: int | None = child.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            kill_group(child)
            code = None
    elapsed = round(time.perf_counter() - start, 1)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = round(cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime, 1)  # the part's processes
    found = read_json(result_path) or {}
    result_path.unlink(missing_ok=True)
    entry = {"status": found.get("status", "failed"), "budget_s": round(budget, 1), "elapsed_s": elapsed,
             "cpu_s": cpu_s, "error": found.get("error"), "reason": found.get("reason"),
             "result": found.get("result", {})}
    with open(log, encoding="utf-8", errors="replace") as text:
        marker = f"===== {name} "
        whole = text.read()
        entry["log_tail"] = whole[whole.rfind(marker):][-2000:]
    if code is None:
        entry.update(status="timed_out", error=f"ran past its budget of {budget:.0f} s and was killed; the result "
                                               "holds what it wrote before")
    elif code != 0 and entry["status"] == "ok":
        lines = [line for line in entry["log_tail"].strip().splitlines() if line.strip()]
        entry.update(status="failed", error=f"exit {code}: {lines[-1] if lines else 'no output'}"[:1000])
    return entry


def format_summary(report: dict[str, Any]) -> str:
    """The Markdown summary: one line per part and the headline figures."""
    device, versions, xformers = report["device"], report["versions"], report["xformers"]
    lines = [f"# mmvl GPU check ({report['mode']})", "",
             f"Started {report['started']}, finished {report['finished'] or '(running)'}, "
             f"{report['elapsed_s']} s of a {report['total_budget_s']:.0f} s budget.", "",
             f"- device: {', '.join(device['names'] or []) or 'no CUDA device'} (driver {device['driver']}, "
             f"memory {device['memory_gb']} GiB, capability {device['capability']})",
             f"- torch {versions['torch']} (CUDA {versions['torch_cuda']}, cuDNN {versions['cudnn']}, NCCL "
             f"{versions['nccl']}), python {versions['python']}, timm {versions['timm']}, monai {versions['monai']}, "
             f"open_clip {versions['open_clip_torch']}, transformers {versions['transformers']}",
             f"- xformers: {xformers['version'] or 'not installed'}; imports: {xformers['imports']}; runs on CUDA: "
             f"{xformers['runs_on_cuda']}; mmvl's automatic attention: {xformers['mmvl_backend']}"
             + (f" ({xformers['mmvl_auto_call']})" if xformers.get("mmvl_auto_call") else "")
             + (f"; error: {xformers['error']}" if xformers["error"] else "")]
    install = report["install"] or {}
    if install:
        lines.append(f"- install: {install.get('mode')}; pins met: {install.get('pins_met')}; missing: "
                     f"{', '.join(install.get('missing') or []) or 'none'}")
    lines += ["", "| part | status | s / budget | headline |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        headline = part_headline(name, part) or (part["error"] or part["reason"] or "")
        budget = "-" if part["budget_s"] is None else f"{part['elapsed_s']} / {part['budget_s']:.0f}"
        lines.append(f"| {name} | {part['status']} | {budget} | {str(headline).replace('|', '/')[:400]} |")
    enc = report["parts"]["encoders"]["result"].get("results") or []
    if enc:
        lines += ["", "## Encoders (ms/step, peak MB)", "", "| model | backend | ckpt | drop | ms/step | peak MB |",
                  "|---|---|---|---|---|---|"]
        for row in enc:
            lines.append(f"| {row['model']} | {row['backend']} | {'on' if row['grad_checkpointing'] else 'off'} | "
                         f"{row['token_drop']:g} | {row.get('ms_per_step', row.get('error', '-'))} | "
                         f"{row.get('peak_mb', '-')} |")
    return "\n".join(lines) + "\n"


def part_headline(name: str, part: dict[str, Any]) -> str | None:
    result = part["result"] or {}
    if part["status"] in ("pending", "skipped"):
        return part["reason"]
    if name == "gpu_tests" and "counts" in result:
        counts = result["counts"]
        return f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped" + (
            f"; {part['error']}" if part["error"] else "")
    if name == "train" and result.get("sides"):
        sides = result["sides"]
        text = []
        for side, facts in sides.items():
            text.append(f"{side} {facts['samples_per_s']} samples/s, {facts.get('tflops_per_s')} TFLOP/s, "
                        f"MFU {facts.get('mfu')}")
        return f"batch {result['batch']}: " + "; ".join(text) + f"; speed mmvl/open_clip {result.get('speed_ratio')}"
    if name == "ct_batch" and result.get("largest_batch"):
        found = result["largest_batch"]
        return (f"largest batch at {result['searches']['no_checkpointing'].get('volume')}: "
                f"{found['no_checkpointing']} without, {found['checkpointing']} with checkpointing"
                + (" (dry run: capacity simulated)" if result.get("simulated_capacity") else ""))
    if name == "data" and "loader_samples_per_s" in result:
        return (f"loader {result['loader_steady_samples_per_s']} samples/s ({result['workers']} workers, pinned: "
                f"{result['pin_memory']}) vs step {result['train_step_samples_per_s']}: feeds it: "
                f"{result['feeds_the_step']}")
    if name == "torchrun" and "gather" in result:
        return (f"{result['nproc']} process(es), {result.get('backend')}: gather ok {result['gather']['ok']}, "
                f"checkpoints {result.get('first_run', {}).get('checkpoints')}, resumed "
                f"{result.get('resumed_run', {}).get('done')}")
    if name == "setup" and result.get("install"):
        return f"{result['install']['mode']} install, python {result.get('python')}"
    if name == "encoders" and result.get("results") is not None:
        return f"{len(result['results'])} cases, backends {result.get('backends')}"
    return part["error"]


def write_report(report: dict[str, Any], out_dir: Path, started: float) -> None:
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(out_dir / "report.json", report)
    tmp = out_dir / "summary.md.tmp"
    tmp.write_text(format_summary(report), encoding="utf-8")
    os.replace(tmp, out_dir / "summary.md")


def parse_budgets(items: Sequence[str]) -> dict[str, float]:
    budgets = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds:
            raise SystemExit(f"--budget {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        budgets[name] = float(seconds)
    return budgets


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes, this interpreter (no venv): the orchestration and the report, for CI")
    parser.add_argument("--out", type=Path, default=REPO / "gpu_report", help="report folder")
    parser.add_argument("--parts", nargs="+", choices=tuple(PARTS), help="run these parts only (default: all)")
    parser.add_argument("--budget", nargs="+", default=[], metavar="PART=SECONDS", help="override part budgets")
    parser.add_argument("--total-budget", type=float, help="hard total in seconds (default: 470 on the GPU machine, "
                                                           "720 in a dry run)")
    parser.add_argument("--python", help="use this interpreter as is (no venv made)")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "mmvl-gpu-check-venv",
                        help="where the venv is made")
    parser.add_argument("--wheelhouse", type=Path,
                        help="install from these wheels only (pip --no-index --find-links): the GPU machine reaches "
                             "no package registry")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gather-worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe_environment()))
        return {}
    if args.gather_worker:
        raise SystemExit(gather_worker(args.gather_worker))
    if args.part:
        out = PartResult(args.result)
        write_json(args.result, out.data)
        try:
            PART_FUNCTIONS[args.part](json.loads(args.context), out)
        except Exception as error:
            import traceback

            traceback.print_exc()
            out.fail(f"{type(error).__name__}: {error}"[:1000])
        return out.data

    mode = "dry-run" if args.dry_run else "gpu"
    key = "dry" if args.dry_run else "gpu"
    total = args.total_budget or TOTAL_BUDGET_S[key]
    budgets = {name: PARTS[name][0 if key == "gpu" else 1] for name in PARTS}
    budgets.update(parse_budgets(args.budget))
    started = time.perf_counter()
    deadline = time.time() + total - REPORT_RESERVE_S
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "log.txt"
    log.write_text(f"mmvl GPU check, {mode}, {now_iso()}\n", encoding="utf-8")
    report = new_report(args, mode, total)
    selected = list(args.parts or PARTS)
    write_report(report, out_dir, started)
    ctx: dict[str, Any] = {"dry_run": args.dry_run, "log": str(log), "sizes": SIZES[key], "venv": str(args.venv),
                           "wheelhouse": str(args.wheelhouse.resolve()) if args.wheelhouse else None,
                           "python": args.python, "cuda": False}
    python = args.python or sys.executable
    for name in PARTS:
        part = report["parts"][name]
        left = deadline - time.time()
        if name not in selected:
            part.update(status="skipped", reason="not selected (--parts)")
        elif left < 5:
            part.update(status="skipped", reason=f"the total budget of {total:.0f} s is spent")
        elif name != "setup" and not args.dry_run and not ctx["cuda"]:
            part.update(status="skipped", reason="torch sees no CUDA device (use --dry-run on a CPU)")
        else:
            part.update(status="running", budget_s=round(min(budgets[name], left), 1))
            write_report(report, out_dir, started)
            print(f"gpu_check: {name} (budget {part['budget_s']:.0f} s) ...", file=sys.stderr, flush=True)
            part.update(run_part(name, part["budget_s"], ctx, python, out_dir))
            print(f"gpu_check: {name}: {part['status']} in {part['elapsed_s']} s"
                  + (f": {part['error']}" if part["error"] else ""), file=sys.stderr, flush=True)
        if name == "setup":
            result = part["result"]
            python = result.get("python") or python
            ctx["python"] = python
            if result.get("pythonpath"):  # the fallback install: every later part sees the checkout and wheels
                os.environ["PYTHONPATH"] = result["pythonpath"]
            report["install"] = result.get("install")
            environment = result.get("environment")
            if environment is None and name in selected:  # setup failed before its probe: probe here
                with contextlib.suppress(Exception):
                    probe = subprocess.run([python, __file__, "--probe"], capture_output=True, text=True,
                                           timeout=60, cwd=REPO)
                    environment = json.loads(probe.stdout.splitlines()[-1])
            if environment is None and name not in selected:
                environment = probe_environment()
            if environment:
                for field in ("device", "versions", "xformers"):
                    report[field].update(environment[field])
            ctx["cuda"] = bool(report["device"]["cuda"]) and not args.dry_run
            ctx.update(xformers_runs=report["xformers"]["runs_on_cuda"], xformers_error=report["xformers"]["error"])
        if name == "train":
            mmvl_side = (part["result"].get("sides") or {}).get("mmvl") or {}
            ctx["train_samples_per_s"] = mmvl_side.get("samples_per_s")
        write_report(report, out_dir, started)
    report["finished"] = now_iso()
    write_report(report, out_dir, started)
    print(format_summary(report))
    print(f"gpu_check: report in {out_dir}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
