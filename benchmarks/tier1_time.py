"""How long does `run_tier1` (default settings) take on a 124M GPT and on the example models?

Each measurement runs in a fresh process (a cold start, as a user's first call is). With
``--baseline DIR`` (another checkout, e.g. the main branch), each model is timed under both code
trees, alternating (this tree, baseline, this tree, ...), so a machine shared with other work
slows both alike; the ratio is then the figure to read.

    python benchmarks/tier1_time.py                                   # this tree only
    python benchmarks/tier1_time.py --baseline ../main-checkout --repeats 1  # side by side
    python benchmarks/tier1_time.py --models gpt-micro,gpt-tiny --tier 2

Models: ``gpt2-small`` (benchmarks/gpt2_small.py: 12 layers, 768 wide, 12 heads, context 1024,
vocabulary 50304, 124M parameters) and any ``example_model`` name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Run in the child: build the model, time the tier, print one JSON line.
_CHILD = """
import json, sys, time, warnings
import torch
warnings.simplefilter("ignore")
sys.path.insert(0, {bench!r})
name, tier = {name!r}, {tier!r}
torch.manual_seed(0)
if name == "gpt2-small":
    from gpt2_small import GPT
    model = GPT()
else:
    from utils.models.examples import example_model
    model = example_model(name)
if tier == 1:
    from utils.tiers.tier1 import run_tier1 as run
else:
    from utils.tiers.tier2 import run_tier2 as run
t0 = time.perf_counter()
report = run(model)
seconds = time.perf_counter() - t0
print(json.dumps({{"seconds": seconds, "passed": report.passed,
                  "checks": [[c.name, c.passed, c.skipped] for c in report.checks],
                  "sizes": report.info.get("sizes", "")}}))
"""


def time_once(tree: Path, name: str, tier: int, threads: int | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), WANDB_MODE="disabled")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    code = _CHILD.format(bench=str(HERE), name=name, tier=tier)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2-small,gpt-micro,gpt-tiny,encoder-classifier")
    p.add_argument("--baseline", type=Path, help="another checkout to time side by side (e.g. main)")
    p.add_argument("--repeats", type=int, default=1, help="runs per model and tree (median shown)")
    p.add_argument("--tier", type=int, choices=(1, 2), default=1)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: torch's choice)")
    args = p.parse_args(argv)
    trees = {"this tree": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    print(f"run_tier{args.tier}, default settings, one fresh process per run; CPU threads: "
          f"{args.threads or 'default'}; cpu count {os.cpu_count()}")
    for name in args.models.split(","):
        times = {label: [] for label in trees}
        last = {}
        for _ in range(args.repeats):
            for label, tree in trees.items():  # alternating: drift hits both trees alike
                out = time_once(tree, name, args.tier, args.threads)
                last[label] = out
                if "error" in out:
                    print(f"  {name:20s} {label:10s} failed: {out['error']}")
                    continue
                times[label].append(out["seconds"])
        cells = [f"{label} {statistics.median(t):7.1f} s" for label, t in times.items() if t]
        ratio = ""
        if len(trees) == 2 and all(times.values()):
            ratio = f"  (baseline / this tree: {statistics.median(times['baseline']) / statistics.median(times['this tree']):.2f}x)"
        print(f"{name:20s} " + "   ".join(cells) + ratio)
        sizes = last.get("this tree", {}).get("sizes")
        if sizes:
            print(f"{'':20s} sizes: {sizes}")


if __name__ == "__main__":
    main()
