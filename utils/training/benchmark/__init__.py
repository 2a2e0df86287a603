"""The AMP benchmark: should AMP be on for this model, on this machine?

- :mod:`~utils.training.benchmark.runner`: :func:`benchmark_amp` and its session, through ``train()``;
- :mod:`~utils.training.amp.measure`: step clocks, saved-activation bytes, matmul ceilings, FLOPs;
- :mod:`~utils.training.benchmark.results`: :class:`AmpBenchmark` and its rows, as tables, JSON, plots;
- :mod:`~utils.training.amp.overflow_scan`: :func:`scan_fp16_overflow`, fp16's range before training.

Names load on first use, so Tier 1 can use :mod:`~utils.training.amp.measure` without the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from utils.common.lazy import lazy_exports

_EXPORTS = {
    "AmpBenchmark": "utils.training.benchmark.results",
    "AmpRow": "utils.training.benchmark.results",
    "BenchmarkSession": "utils.training.benchmark.runner",
    "Fp16Scan": "utils.training.amp.overflow_scan",
    "benchmark_amp": "utils.training.benchmark.runner",
    "scan_fp16_overflow": "utils.training.amp.overflow_scan",
}
__all__ = [  # = the keys of _EXPORTS (a test checks); written out for readers and linters
    "AmpBenchmark",
    "AmpRow",
    "BenchmarkSession",
    "Fp16Scan",
    "benchmark_amp",
    "scan_fp16_overflow",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from utils.training.amp.overflow_scan import Fp16Scan, scan_fp16_overflow
    from utils.training.benchmark.results import AmpBenchmark, AmpRow
    from utils.training.benchmark.runner import BenchmarkSession, benchmark_amp
