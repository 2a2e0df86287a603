"""Training with automatic mixed precision: the resolver, the loop, W&B logging and the benchmark.

Names are imported on first use (PEP 562): ``utils.training.resolve_precision`` loads only
:mod:`utils.training.amp.precision`, never the loop, wandb, ipywidgets or matplotlib.

Where each part lives:

- :mod:`~utils.training.amp.precision`: the resolver and every precision fact;
- :mod:`~utils.training.settings`: the training settings and their defaults;
- :mod:`~utils.training.loop.train`, :mod:`~utils.training.loop.trainer`, :mod:`~utils.training.batches`,
  :mod:`~utils.training.runs.checkpoint`,
  :mod:`~utils.training.parallel.distributed`: the loop, its batches, its checkpoints, torchrun;
- :mod:`~utils.training.wandb_log.session`, :mod:`~utils.training.wandb_log.callback`: W&B;
- :mod:`utils.training.benchmark`: the AMP benchmark;
- :mod:`~utils.training.cli` (``python -m utils.training``), :mod:`~utils.training.runs.curves`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from utils.common.lazy import lazy_exports

_EXPORTS = {
    "AmpBenchmark": "utils.training.benchmark.results",
    "AmpWandbCallback": "utils.training.wandb_log.callback",
    "Capabilities": "utils.training.amp.precision",
    "MemoryPlan": "utils.training.benchmark.memory_plan",
    "PrecisionPlan": "utils.training.amp.precision",
    "PrecisionReport": "utils.training.amp.precision_report",
    "PrecisionWarning": "utils.training.amp.precision",
    "ScaleHealth": "utils.training.amp.scale_health",
    "TrainResult": "utils.training.loop.trainer",
    "TrainSettings": "utils.training.settings",
    "Trainer": "utils.training.loop.trainer",
    "WandbSession": "utils.training.wandb_log.session",
    "WandbWarning": "utils.training.wandb_log.session",
    "benchmark_amp": "utils.training.benchmark.runner",
    "compute_effective_precision": "utils.training.amp.precision",
    "compare_precisions": "utils.training.amp.precision_report",
    "evaluate": "utils.training.loop.evaluate",
    "find_batch_size": "utils.training.benchmark.memory_plan",
    "init_wandb": "utils.training.wandb_log.session",
    "plan_memory": "utils.training.benchmark.memory_plan",
    "resolve_precision": "utils.training.amp.precision",
    "scan_fp16_overflow": "utils.training.amp.overflow_scan",
    "steady_cpu_allocator": "utils.training.amp.acceleration",
    "suite_loss_fn": "utils.training.objectives",
    "train": "utils.training.loop.train",
}
__all__ = [  # = the keys of _EXPORTS (a test checks); written out for readers and linters
    "AmpBenchmark",
    "AmpWandbCallback",
    "Capabilities",
    "MemoryPlan",
    "PrecisionPlan",
    "PrecisionReport",
    "PrecisionWarning",
    "ScaleHealth",
    "TrainResult",
    "TrainSettings",
    "Trainer",
    "WandbSession",
    "WandbWarning",
    "benchmark_amp",
    "compare_precisions",
    "compute_effective_precision",
    "evaluate",
    "find_batch_size",
    "init_wandb",
    "plan_memory",
    "resolve_precision",
    "scan_fp16_overflow",
    "steady_cpu_allocator",
    "suite_loss_fn",
    "train",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name loads on first use
    from utils.training.amp.acceleration import steady_cpu_allocator
    from utils.training.amp.overflow_scan import scan_fp16_overflow
    from utils.training.amp.precision import (
        Capabilities,
        PrecisionPlan,
        PrecisionWarning,
        compute_effective_precision,
        resolve_precision,
    )
    from utils.training.amp.precision_report import PrecisionReport, compare_precisions
    from utils.training.amp.scale_health import ScaleHealth
    from utils.training.benchmark.memory_plan import MemoryPlan, find_batch_size, plan_memory
    from utils.training.benchmark.results import AmpBenchmark
    from utils.training.benchmark.runner import benchmark_amp
    from utils.training.loop.evaluate import evaluate
    from utils.training.loop.train import train
    from utils.training.loop.trainer import Trainer, TrainResult
    from utils.training.settings import TrainSettings
    from utils.training.wandb_log.callback import AmpWandbCallback
    from utils.training.wandb_log.session import WandbSession, WandbWarning, init_wandb
