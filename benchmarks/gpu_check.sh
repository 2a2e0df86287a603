#!/usr/bin/env bash
# The CUDA-only checks in one run (notebooks' requires-cuda cells, CUDA tests, benchmark_amp with and
# without torch.compile, the memory plan against measured peaks); one table at the end.
# Without CUDA it says so, checks it would run, and exits 0. See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export WANDB_MODE=offline WANDB_SILENT=true WANDB_DIR="$(mktemp -d)" MPLBACKEND=Agg
exec timeout 480 "$PY" -m benchmarks.gpu_check "$@"
