"""The seed's import path, kept for code (and tests) that load this file directly.

``AmpWandbCallback`` lives in :mod:`utils.training.wandb_log.callback`; ``compute_effective_precision``,
a precision fact, in :mod:`utils.training.amp.precision`. Import them from there (or from
``utils.training``) in new code.
"""

from utils.training.amp.precision import compute_effective_precision
from utils.training.wandb_log.callback import AmpWandbCallback

__all__ = ["AmpWandbCallback", "compute_effective_precision"]
