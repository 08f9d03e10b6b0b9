#!/usr/bin/env bash
# The GPU check on a bare CUDA machine: runs benchmarks/gpu_check.py (install, gpu tests, benchmarks, torchrun) with
# the machine's python3 and writes gpu_report/. Options pass through, e.g. --wheelhouse .whl, --out DIR, --dry-run.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
