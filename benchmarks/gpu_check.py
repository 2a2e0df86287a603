"""Everything a CPU cannot check, in one run on a CUDA machine (under 8 minutes on one modern GPU).

1. the notebooks through papermill, their ``requires-cuda`` cells included (``utils.notebook.demo``'s quick sizes);
2. the tests that only mean something on CUDA (``-k "cuda or tf32"``; they skip on a CPU);
3. ``benchmark_amp`` on gpt-tiny and a larger example model in 32-true, 16-mixed and bf16-mixed,
   each with and without ``torch.compile``;
4. ``plan_memory``'s predicted peak against ``torch.cuda.max_memory_allocated`` per precision;
5. ``train(strategy="fsdp")`` in one process on one GPU (FSDP2 over a group of one).

Then one table. It runs with whatever Python the machine has (``gpu_check.sh`` takes ``.venv`` or
``python3``): it checks the torch version first, runs every check whose packages are present, and
says in one line which it skipped for which missing package. Without CUDA it says so and checks it would run (imports, arguments, the plan of
checks): ``--dry-run`` does that anywhere.

    bash benchmarks/gpu_check.sh            # or: python -m benchmarks.gpu_check [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

MIN_TORCH = (2, 6)  # torch.distributed.fsdp.fully_shard (FSDP2) is public from 2.6


def torch_problem() -> str | None:
    """Why this torch cannot run the checks, or None."""
    found = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        return (f"torch {torch.__version__} found at {Path(torch.__file__).parent}; the project needs torch >= "
                f"{'.'.join(map(str, MIN_TORCH))} (FSDP2's fully_shard). Use a newer Python environment.")
    return None


if torch_problem() is None:  # the project's imports need a recent torch: say so rather than fail on them
    from utils.models.examples import example_model
    from utils.training import PrecisionWarning, plan_memory, train
    from utils.training.benchmark.memory_plan import measured_peak_bytes

ROOT = Path(__file__).resolve().parents[1]

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
MODELS = {"gpt-tiny": {}, "gpt-tiny-8x512": {"n_layer": 8, "n_embd": 512, "n_head": 8}}
PLAN_BATCH = 16  # the batch size at which the plan's peak is checked
NEEDS = {"notebooks (papermill)": ("papermill", "nbclient", "ipykernel", "nbformat"), "CUDA tests": ("pytest",),
         **{f"benchmark {m}": ("setuptools",) for m in MODELS},  # torch.utils.benchmark imports it
         "FSDP gpt-tiny (1 GPU)": ("tqdm",)}  # train() draws its progress bar with it


def missing(check: str) -> list[str]:
    """The packages ``check`` needs that this Python lacks."""
    return [m for m in NEEDS.get(check, ()) if importlib.util.find_spec(m) is None]


def skipped_line(planned: list[str]) -> str:
    """One line: each check left out, and the packages it lacks; empty when none is."""
    parts = [f"{c} (missing {', '.join(missing(c))})" for c in planned if missing(c)]
    return f"gpu_check: skipped {'; '.join(parts)}." if parts else ""


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="check it would run; run nothing heavy")
    p.add_argument("--skip-notebooks", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed steps per benchmark run (default 10)")
    return p.parse_args(argv)


def _model(name: str):
    return example_model("gpt-tiny", **MODELS[name])


def _ids(model, rows: int, seed: int = 0) -> torch.Tensor:
    c = model.config
    return torch.randint(0, c.vocab_size, (rows, c.block_size + 1), generator=torch.Generator().manual_seed(seed))


def check_notebooks() -> tuple[str, str]:
    from utils.notebook.demo import QUICK_PARAMETERS, run_notebooks

    with tempfile.TemporaryDirectory() as run_dir:
        done = run_notebooks(Path(run_dir), QUICK_PARAMETERS, ROOT)
    return "ok", f"{len(done)} notebooks, requires-cuda cells included"


def check_tests() -> tuple[str, str]:
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-k", "cuda or tf32", "-p", "no:cacheprovider"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    last = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
    return ("ok" if out.returncode == 0 else f"FAILED (rc {out.returncode})"), last


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def check_benchmark(name: str, steps: int) -> list[tuple[str, str, str]]:
    from utils.training import benchmark_amp  # torch.utils.benchmark imports setuptools (see NEEDS)

    model = _model(name)
    data = _ids(model, 64)
    bench = benchmark_amp(lambda: _model(name), data, precisions=PRECISIONS, compile=(False, True), steps=steps,
                          warmup=3, repeats=3, batch_size=8, max_seconds=20, tf32=False)
    rows = []
    for r in bench.rows:
        if r.error:
            rows.append((f"benchmark {name} {r.precision}", "error", r.error[:120]))
            continue
        mfu = f"{r.mfu:.0%}" if r.mfu is not None else r.mfu_note
        compiled = f", compile {r.compile_time_s:.1f} s" if r.compile_time_s is not None else ""
        rows.append((f"benchmark {name} {r.precision}", "noisy" if r.noisy else "ok",
                     f"{r.step_time_s * 1e3:.1f} ms (IQR {_pct(r.noise)}), {r.speedup:.2f}x, peak "
                     f"{r.peak_memory_bytes / 2**20:.0f} MiB, MFU {mfu}{compiled}"))
    rows.append((f"verdict {name}", "", bench.recommendation()[:160]))
    return rows


def check_memory_plan(name: str) -> list[tuple[str, str, str]]:
    model = _model(name)
    plan = plan_memory(model, _ids(model, 4), precisions=PRECISIONS, device="cuda")
    rows = []
    for precision in PRECISIONS:
        predicted = plan.peak_bytes(precision, PLAN_BATCH)
        measured = measured_peak_bytes(_model(name), _ids(model, 2 * PLAN_BATCH, seed=1), precision, PLAN_BATCH)
        ratio = predicted / measured
        rows.append((f"memory plan {name} {precision} @ {PLAN_BATCH}", "ok" if 0.8 <= ratio <= 1.25 else "off",
                     f"predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, "
                     f"ratio {ratio:.2f}"))
    return rows


def check_fsdp(name: str, steps: int) -> tuple[str, str, str]:
    """``train(strategy="fsdp")`` in this one process on the GPU: a valid FSDP2 run over a group of one."""
    model = _model(name)
    torch.cuda.reset_peak_memory_stats()
    result = train(model, _ids(model, 64), device="cuda", precision="auto", strategy="fsdp", max_steps=steps,
                   batch_size=8, lr=1e-3, log_every=1, progress=False)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    ok = all(h["loss"] == h["loss"] for h in result.history) and last < first
    return (f"FSDP {name} 1 GPU {result.precision.name}", "ok" if ok else "FAILED (loss)",
            f"loss {first:.3f} -> {last:.3f} in {steps} steps, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB, "
            f"{result.tokens_per_second:,.0f} tokens/s")


def table(rows) -> str:
    lines = ["| check | status | figures |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c.replace('|', '/')} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    planned = ["notebooks (papermill)"] * (not args.skip_notebooks) + ["CUDA tests"] * (not args.skip_tests)
    planned += [f"benchmark {m}" for m in MODELS] + [f"memory plan {m}" for m in MODELS] + ["FSDP gpt-tiny (1 GPU)"]
    problem = torch_problem()
    print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) from {sys.executable}")
    if problem:
        print(f"gpu_check: {problem}")
        return 1
    if skipped_line(planned):
        print(skipped_line(planned))
        planned = [c for c in planned if not missing(c)]
    if args.dry_run or not torch.cuda.is_available():
        print(f"gpu_check: {'dry run' if args.dry_run else 'no CUDA device here'}; would run: {', '.join(planned)}; "
              f"models build: {', '.join(f'{m} ({sum(p.numel() for p in _model(m).parameters()):,} params)' for m in MODELS)}.")
        return 0
    warnings.simplefilter("ignore", PrecisionWarning)
    start, rows = time.perf_counter(), []
    if "notebooks (papermill)" in planned:
        rows.append(("notebooks (papermill)", *check_notebooks()))
    if "CUDA tests" in planned:
        rows.append(("CUDA tests", *check_tests()))
    for name in MODELS:
        if f"benchmark {name}" in planned:
            rows += check_benchmark(name, args.steps)
        rows += check_memory_plan(name)
    if "FSDP gpt-tiny (1 GPU)" in planned:
        rows.append(check_fsdp("gpt-tiny", args.steps))
    rows.append(("total", "", f"{time.perf_counter() - start:.0f} s on {torch.cuda.get_device_name()}"))
    print(table(rows))
    return 0 if all(not s.startswith(("FAILED", "error")) for _, s, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
