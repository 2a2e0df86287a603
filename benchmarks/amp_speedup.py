"""Does AMP pay on this machine? ``benchmark_amp`` on the reference model, checked by a plain loop.

Runs the benchmark session behind ``utils.training.benchmark_amp`` on gpt-tiny (the loop
benchmark's reference model: vocab 4096, width 256, 4 layers, 4 heads, context 128) in 32-true and
bf16-mixed (``--fp16`` adds 16-mixed), and after each of its runs the hand-written loop of
``benchmarks/loop_overhead.py`` on the same initial weights and batches: ours A, plain A, ours B,
plain B, ... repeated, so drift hits both alike. Prints the benchmark's table, then the ratios:
ours/plain step time per precision, bf16's speed over fp32 as each loop measures it, the
activation-bytes ratio and the loss difference.

    python -m benchmarks.amp_speedup                        # ~1 min on a 2-core CPU with AVX512-BF16
    python -m benchmarks.amp_speedup --steps 20 --repeats 8 # tighter; a GPU: add --batch-size 32

Both loops are judged by one statistic (``utils.training.benchmark.results.run_timing``): each run
is one measurement, its mean step time; a loop's figure is the median of its runs, its noise their
IQR / median. On a CPU without AVX512-BF16/AMX, bf16 matmuls are emulated and a bf16 step takes
many times an fp32 one: the defaults then take 5-10 minutes; ``--steps 4`` shortens them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

import torch

from benchmarks.loop_overhead import run_plain  # the independent hand-written loop
from utils.models.examples import example_model
from utils.training import PrecisionWarning, steady_cpu_allocator
from utils.training.amp.precision import cpu_has_native_bf16
from utils.training.benchmark.results import MIN_RUNS, NOISE_BOUND, run_timing
from utils.training.benchmark.runner import BenchmarkSession


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt-tiny", help="example model (default: gpt-tiny, the reference)")
    p.add_argument("--batch-size", type=int, default=8, help="default 8")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run: one measurement (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run (default 2)")
    p.add_argument("--repeats", type=int, default=5, help=f"interleaved runs per loop and precision (default 5; "
                                                          f"noise is judged from {MIN_RUNS})")
    p.add_argument("--fp16", action="store_true", help="also run 16-mixed (very slow on a CPU)")
    p.add_argument("--device", default=None, help="default: the best available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--allocator", choices=("steady", "default"), default="steady",
                   help="CPU memory allocator: 'steady' calls utils.training.steady_cpu_allocator() first, so "
                        "glibc stops mapping and unmapping every large tensor (default); 'default' leaves it")
    return p.parse_args(argv)


def _ratio_line(label: str, value: float | None, target: str = "") -> str:
    shown = "n/a" if value is None else f"{value:.3f}"
    return f"  {label:<58} {shown:>8}  {target}"


def main(argv=None):
    args = parse(argv)
    allocator = steady_cpu_allocator()[1] if args.allocator == "steady" else "allocator: the C library's default."
    if args.threads:
        torch.set_num_threads(args.threads)
    factory = lambda: example_model(args.model)  # noqa: E731
    config = factory().config
    gen = torch.Generator().manual_seed(0)
    rows = (args.warmup + args.steps) * args.batch_size  # one epoch: the plain loop reads epoch 0 only
    data = torch.randint(0, config.vocab_size, (rows, config.block_size + 1), generator=gen)
    eval_data = torch.randint(0, config.vocab_size, (4 * args.batch_size, config.block_size + 1), generator=gen)
    precisions = ["32-true", "bf16-mixed"] + (["16-mixed"] if args.fp16 else [])

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)  # said once, below
        session = BenchmarkSession(factory, data, precisions=precisions, steps=args.steps, warmup=args.warmup,
                                   batch_size=args.batch_size, device=args.device, eval_data=eval_data)
    native = cpu_has_native_bf16()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"model={args.model} batch={args.batch_size}x{config.block_size} steps={args.steps} "
          f"warmup={args.warmup} repeats={args.repeats} device={session.device} "
          f"threads={torch.get_num_threads()} native_cpu_bf16={native} load_avg={load}")
    if session.device.type == "cpu":
        print(allocator)
    if session.device.type == "cpu" and not native:
        print("note: this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 and fp16 matmuls are emulated and "
              "run far slower than fp32, so bf16-mixed cannot be faster here; its memory saving still shows.")

    plain = {name: [] for name in session.precisions}

    def run_plain_loop(name):
        if session.rows[name].error is None:  # one run = one measurement, as in the benchmark
            plain[name].append(run_plain(factory, session.initial, data, session.plans[name], args,
                                         args.warmup + args.steps))

    for r in range(args.repeats):
        for name in session.precisions:  # ours A, plain A, ours B, plain B: drift hits both alike
            # Odd repeats run the plain loop first, so neither loop always follows the other precision.
            first, second = (session.run, run_plain_loop) if r % 2 == 0 else (run_plain_loop, session.run)
            first(name)
            second(name)
            print(f"  repeat {r + 1}/{args.repeats} {name} done", flush=True)
    bench = session.result()
    print()
    print(bench.to_markdown())
    report(bench, plain)


def report(bench, plain: dict) -> None:
    """Both loops judged by one statistic: the median and IQR of their runs' mean step times."""
    timing = {name: run_timing([statistics.fmean(r) for r in runs]) if runs else None for name, runs in plain.items()}
    med = {name: t.median if t else None for name, t in timing.items()}
    print("\nplain hand-written loop (benchmarks/loop_overhead.py), same process, interleaved; "
          "median of the runs' mean step times (IQR / median):")
    for row in bench.rows:
        t = timing[row.precision]
        noise = f"{t.iqr / t.median:.1%}" if t else "n/a"
        ours = f"{row.noise:.1%}" if row.noise is not None else "n/a"
        print(f"  {row.precision:<11} plain {med[row.precision] * 1e3 if t else float('nan'):9.1f} ms ({noise})"
              f"   ours {row.step_time_s * 1e3 if row.step_time_s else float('nan'):9.1f} ms ({ours})"
              f"   runs {row.runs}")
    fp32, bf16 = bench.row("32-true"), bench.row("bf16-mixed")
    ours_speedup = bf16.speedup
    plain_speedup = med["32-true"] / med["bf16-mixed"] if med["32-true"] and med["bf16-mixed"] else None
    agree = ours_speedup / plain_speedup if ours_speedup and plain_speedup else None
    saved = (bf16.activation_bytes + bf16.weight_copy_bytes) / fp32.activation_bytes \
        if bf16.activation_bytes and fp32.activation_bytes else None
    print("\nratios:")
    for row in bench.rows:
        mine, theirs = row.step_time_s, med[row.precision]
        print(_ratio_line(f"{row.precision}: ours / plain step time", mine / theirs if mine and theirs else None,
                          "(1.0 = the same; target within 0.90-1.10)"))
    print(_ratio_line("bf16-mixed speedup over fp32, ours (fp32 / bf16 median)", ours_speedup, "(target >= 1.40)"))
    print(_ratio_line("bf16-mixed speedup over fp32, plain loop", plain_speedup))
    print(_ratio_line("ours speedup / plain speedup", agree, "(target within 0.90-1.10)"))
    print(_ratio_line("bf16-mixed / fp32 activation bytes", bf16.activation_ratio, "(target <= 0.70)"))
    print(_ratio_line("bf16-mixed / fp32 incl. autocast weight copies", saved))
    print(_ratio_line("bf16-mixed - fp32 final train loss", bf16.loss_delta, "(target |x| <= 0.05)"))
    print(_ratio_line("bf16-mixed - fp32 eval loss", bf16.eval_loss_delta, "(target |x| <= 0.05)"))
    for row in bench.rows:
        if row.error:
            print(f"  {row.precision} failed: {row.error}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    plain_noisy = any(t is not None and not t.meets_confidence(NOISE_BOUND) for t in timing.values())
    quiet = all(r.noise is not None for r in bench.rows) and not plain_noisy and not any(r.noisy for r in bench.rows)
    print(f"\nload average at the end: {load} on {os.cpu_count()} CPUs; noise bound {NOISE_BOUND:.0%} over "
          f">= {MIN_RUNS} runs: " + ("no row of either loop is noisy." if quiet else
                                    "a row is noisy or has too few runs, so the agreement above is not a "
                                    "quiet-machine figure."))
    print(f"verdict: {bench.recommendation()}")


if __name__ == "__main__":
    main()
