"""The tiers: Tier 1 validates a model (shapes, gradients, numerics, init, memory, speed), Tier 2
analyses it (attention, robustness), each returning a :class:`~utils.tiers.report.Report`.

- :mod:`~utils.tiers.report`: the ``Check``/``Report`` every tier returns;
- :mod:`~utils.tiers.tier1`, :mod:`~utils.tiers.tier2`: the checks and ``run_tier1``/``run_tier2``.

The tiers never load the training loop, the benchmark or wandb.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from utils.common.lazy import lazy_exports

_EXPORTS = {
    "run_tier1": "utils.tiers.tier1",
    "run_tier2": "utils.tiers.tier2",
}
__all__ = ["run_tier1", "run_tier2"]  # = the keys of _EXPORTS (a test checks)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from utils.tiers.tier1 import run_tier1
    from utils.tiers.tier2 import run_tier2
