"""The seed's import path, kept for code (and tests) that load this file directly.

``AmpWandbCallback`` lives in :mod:`utils.training.wandb_callback`; ``compute_effective_precision``,
a precision fact, in :mod:`utils.training.precision`. Import them from there (or from
``utils.training``) in new code.
"""

from utils.training.precision import compute_effective_precision
from utils.training.wandb_callback import AmpWandbCallback

__all__ = ["AmpWandbCallback", "compute_effective_precision"]
