"""Training with automatic mixed precision: the resolver, the loop, W&B logging and the benchmark.

Importing this package needs only torch (and tqdm for the loop); wandb, ipywidgets and matplotlib
are imported where they are used.
"""

from utils.training.amp_utils import compute_effective_precision
from utils.training.loop import Trainer, TrainResult, evaluate, train
from utils.training.precision import Capabilities, PrecisionPlan, PrecisionWarning, resolve_precision

__all__ = [
    "Capabilities",
    "PrecisionPlan",
    "PrecisionWarning",
    "TrainResult",
    "Trainer",
    "compute_effective_precision",
    "evaluate",
    "resolve_precision",
    "train",
]
