"""`make demo`: run the four notebooks with papermill on this machine and say what they found.

Run as ``python -m utils.notebook.demo [--quick]``. Writes ``runs/<timestamp>/``: the settings it ran with
(``demo_settings.json``), the executed notebooks, ``metrics.jsonl``, the plots as PNG, the benchmark
as markdown and JSON, and the offline W&B run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from utils.notebook.cells import find_repo_root, new_run_dir
from utils.notebook.project import NOTEBOOKS
from utils.training.amp.precision import resolve_precision
from utils.training.benchmark.results import AmpBenchmark
from utils.training.runs.curves import read_metrics
from utils.training.settings import TrainSettings

# Sized for a 2-core CPU: a few minutes in all. A Colab user gets the notebooks' own defaults.
CPU_PARAMETERS = {
    "precision": TrainSettings.precision, "model_source": "example:gpt-micro", "max_steps": 150,
    "batch_size": TrainSettings.batch_size,
    # auto too: where it picks bf16-mixed, its row says so, and the verdict says when it measured slower
    "wandb_mode": "offline", "bench_precisions": "32-true,bf16-mixed,auto", "bench_steps": 20,
    "bench_warmup": 2, "bench_repeats": 3,
}
QUICK_PARAMETERS = {**CPU_PARAMETERS, "max_steps": 20, "bench_steps": 3, "bench_warmup": 1, "bench_repeats": 1,
                    "bench_max_seconds": 0}
SETTINGS_FILE = "demo_settings.json"  # in the run folder: what the demo ran with


def run_notebooks(run_dir: Path, parameters: dict, root: Path) -> list[Path]:
    """Execute every notebook into ``run_dir`` with ``parameters``; CUDA-only cells skipped off a GPU."""
    import papermill

    extra = {} if torch.cuda.is_available() else {"skip_cells_with_tag": "requires-cuda"}
    extra.update(kernel_config())
    done = []
    for name in NOTEBOOKS:
        out = run_dir / name
        sys.stdout.write(f"running {name} ...\n")
        sys.stdout.flush()
        source = root / "notebooks" / name
        own = set(papermill.inspect_notebook(source))  # pass each notebook only the settings it has
        values = {k: v for k, v in {**parameters, "run_dir": str(run_dir)}.items() if k in own}
        papermill.execute_notebook(source, out, parameters=values, cwd=str(root), progress_bar=False, **extra)
        done.append(out)
    return done


def kernel_config() -> dict:
    """papermill's kernels on IPC (Unix sockets) where there are some: over TCP, ipykernel warns
    "Kernel is running over TCP without encryption" on the demo's stderr once per notebook.
    On Windows (no IPC transport) nothing changes."""
    from traitlets.config import Config

    if os.name != "posix":
        return {}
    config = Config()
    config.KernelManager.transport = "ipc"
    return {"config": config}


def save_settings(run_dir: Path, parameters: dict, quick: bool, plan) -> Path:
    """``<run_dir>/demo_settings.json``: the notebooks' parameters, the size, the plan and the
    cells skipped, so a run folder says how it was made."""
    path = Path(run_dir) / SETTINGS_FILE
    path.write_text(json.dumps({
        "command": "python -m utils.notebook.demo" + (" --quick" if quick else ""), "parameters": parameters,
        "precision_plan": plan.describe(), "torch": torch.__version__,
        "skipped_cells": [] if torch.cuda.is_available() else ["requires-cuda"],
    }, indent=2) + "\n")
    return path


def summary(run_dir: Path) -> list[str]:
    """What the run found, read back from the files the notebooks wrote (``metrics.jsonl``,
    ``benchmark.json``); a file that is not there adds no line.

    Example::

        >>> summary(Path("runs/20250101-120000"))                       # doctest: +SKIP
        ['training: 150 steps, final train loss 2.4061, skipped steps 0', ...]
    """
    return [*_training_lines(Path(run_dir)), *_benchmark_lines(Path(run_dir))]


def _training_lines(run_dir: Path) -> list[str]:
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    steps, epochs = read_metrics(run_dir)
    lines = []
    if steps:
        last = steps[-1]
        lines.append(f"training: {last['step']} steps, final train loss {last['loss']:.4f}, "
                     f"skipped steps {last['skipped_steps']}")
    validated = [e for e in epochs if e.get("val_loss") is not None]
    if validated:
        last = validated[-1]
        perplexity = last.get("val_perplexity") or float("nan")
        lines.append(f"validation: loss {last['val_loss']:.4f}, perplexity {perplexity:.2f}")
    return lines


def _benchmark_lines(run_dir: Path) -> list[str]:
    path = run_dir / "benchmark.json"
    if not path.is_file():
        return []
    bench = AmpBenchmark.from_dict(json.loads(path.read_text()))
    lines = [_row_line(r) for r in bench.rows]
    return lines + [f"benchmark verdict: {bench.recommendation()}"] if bench.rows else lines


def _row_line(r) -> str:
    """One benchmark row: its figures, and ``noisy`` with its spread when its speed is not trusted."""
    if r.error is not None or r.speedup is None:
        return f"benchmark {r.precision}: {r.error}"
    asked = [q for q in r.requested if q != r.precision]
    name = r.precision + (f" ({', '.join(asked)})" if asked else "")
    noisy = f", noisy (runs {r.noise:.1%} apart, IQR / median; speeds not compared)" if r.noisy else ""
    return (f"benchmark {name}: step {r.step_time_s * 1e3:.1f} ms, speedup {r.speedup:.2f}x, "
            f"final loss {r.final_loss:.4f}{noisy}")


def next_steps(run_dir: Path) -> list[str]:
    """What to do after the demo: open the notebooks, bring your own model, upload the offline W&B run.

    Example::

        >>> next_steps(Path("runs/20250101-120000"))[0]                 # doctest: +SKIP
        'next: make lab  (opens JupyterLab on notebooks/; Run All in each)'
    """
    lines = ["next: make lab  (opens JupyterLab on notebooks/; Run All in each)",
             "      your own model: model_source='path/to/model.py' in a notebook's Settings, or "
             "make train ARGS='--model path/to/model.py --run-dir runs/mine'"]
    lines += [f"      upload the W&B run: wandb sync {path}"
              for path in sorted(Path(run_dir).glob("**/offline-run-*")) if path.is_dir()]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the four notebooks headless on this machine.")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--runs", default="runs", help="parent folder of the run folder (default: runs)")
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    root = find_repo_root(Path(__file__).parent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = resolve_precision("auto")
    sys.stdout.write(f"Precision plan for this machine: {plan.describe()}\n")
    run_dir = new_run_dir(root / args.runs)
    parameters = QUICK_PARAMETERS if args.quick else CPU_PARAMETERS
    save_settings(run_dir, parameters, args.quick, plan)
    t0 = time.perf_counter()
    run_notebooks(run_dir, parameters, root)
    for line in summary(run_dir):
        sys.stdout.write(line + "\n")
    sys.stdout.write(f"done in {time.perf_counter() - t0:.0f} s; everything is in {run_dir}/\n")
    for path in sorted(run_dir.iterdir()):
        sys.stdout.write(f"  {path.name}\n")
    for line in next_steps(run_dir):
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
