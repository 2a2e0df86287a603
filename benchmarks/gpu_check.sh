#!/usr/bin/env bash
# The CUDA-only checks in one run (notebooks' requires-cuda cells, CUDA tests, benchmark_amp with and
# without torch.compile, the memory plan against measured peaks); one table at the end.
# Without CUDA it says so, checks it would run, and exits 0. See benchmarks/gpu_check.py.
# Python: $PYTHON, else .venv/bin/python, else the machine's python3 (a GPU machine's own torch build;
# no venv can be built there offline). WHEELS=DIR installs the wheels in DIR into it first (no index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="$(command -v python3 || true)"; fi
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no Python found: no .venv/bin/python and no python3 on PATH (or set PYTHON=...)." >&2
    exit 127
fi
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline WANDB_SILENT=true WANDB_DIR="$(mktemp -d)" MPLBACKEND=Agg
exec timeout 480 "$PY" -m benchmarks.gpu_check "$@"
