"""benchmarks/amp_speedup.py: the benchmark and the plain loop, judged by one statistic, and their ratios."""
import re

import pytest

from benchmarks import amp_speedup


def figure(out: str, label: str) -> float:
    return float(re.search(re.escape(label) + r"\s+(-?[\d.]+)", out).group(1))


def test_it_prints_both_loops_per_precision_and_the_ratio_of_their_speedups(capsys):
    amp_speedup.main(["--model", "gpt-micro", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                      "--repeats", "3", "--allocator", "default"])  # default: the test process keeps glibc's
    out = capsys.readouterr().out
    ms = {name: [float(x) for x in re.search(rf"  {re.escape(name)}\s+plain\s+([\d.]+) ms \([\d.]+%\)\s+ours\s+([\d.]+) ms",
                                             out).groups()] for name in ("32-true", "bf16-mixed")}
    (plain32, ours32), (plain16, ours16) = ms["32-true"], ms["bf16-mixed"]  # printed to 0.1 ms: rel=0.05
    assert figure(out, "32-true: ours / plain step time") == pytest.approx(ours32 / plain32, rel=0.05)
    assert figure(out, "bf16-mixed speedup over fp32, ours (fp32 / bf16 median)") == pytest.approx(ours32 / ours16, rel=0.05)
    assert figure(out, "bf16-mixed speedup over fp32, plain loop") == pytest.approx(plain32 / plain16, rel=0.05)
    agree = figure(out, "ours speedup / plain speedup")
    assert agree == pytest.approx((ours32 / ours16) / (plain32 / plain16), rel=0.1)
    assert "runs 3" in out and out.rstrip().splitlines()[-1].startswith("verdict: ")
