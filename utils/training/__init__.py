"""Training with automatic mixed precision: the resolver, the loop, W&B logging and the benchmark.

Importing this package needs only torch (and tqdm for the loop); wandb, ipywidgets and matplotlib
are imported where they are used.
"""

from utils.training.amp_benchmark import benchmark_amp
from utils.training.amp_utils import AmpWandbCallback, compute_effective_precision
from utils.training.benchmark_results import AmpBenchmark
from utils.training.benchmark_scan import scan_fp16_overflow
from utils.training.loop import Trainer, TrainResult, evaluate, train
from utils.training.memory_plan import MemoryPlan, find_batch_size, plan_memory
from utils.training.precision import Capabilities, PrecisionPlan, PrecisionWarning, resolve_precision
from utils.training.wandb_setup import WandbSession, WandbWarning, init_wandb

__all__ = [
    "AmpBenchmark",
    "AmpWandbCallback",
    "Capabilities",
    "MemoryPlan",
    "PrecisionPlan",
    "PrecisionWarning",
    "TrainResult",
    "Trainer",
    "WandbSession",
    "WandbWarning",
    "benchmark_amp",
    "compute_effective_precision",
    "evaluate",
    "find_batch_size",
    "init_wandb",
    "plan_memory",
    "resolve_precision",
    "scan_fp16_overflow",
    "train",
]
