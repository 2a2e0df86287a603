"""Is fp16's loss scale healthy? A watch on what the loop already knows after each optimizer step.

A GradScaler halves its scale on every step whose gradients overflow and skips that step. A few
skips while it finds its level are normal; a scale that keeps falling, or a run that skips a
large share of its steps, means fp16 does not fit the model, and the loss turns NaN later.

Example::

    >>> health = ScaleHealth()
    >>> for step in range(1, 101):
    ...     health.update(step, scale=2.0 ** (16 - step), skipped=True)   # doctest: +SKIP
    >>> health.status, health.step                                          # doctest: +SKIP
    ('warning', 17)
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field

from utils.common.checks import check_int
from utils.training.amp.precision import PrecisionWarning

ADVICE = ("Use precision='bf16-mixed' where the hardware supports bf16 (fp32's range, no loss scale); "
          "or keep the overflowing modules in fp32 (train(..., keep_fp32='auto'), or their names); "
          "or lower the learning rate{lr}.")


@dataclass
class ScaleHealth:
    """Watches the loss scale and the skipped steps; warns once per run when they go wrong.

    Fed once per optimizer step with values the loop already holds on the host (it reads the scale
    to count skipped steps), so watching costs no device sync.

    Example::

        >>> health = ScaleHealth(floor=1.0, window=50, threshold=0.25)
        >>> health.update(step=1, scale=32768.0, skipped=True)
        >>> health.status, round(health.skip_rate, 2)
        ('ok', 1.0)

    Args:
        floor: warn when the scale falls below this (default 1.0: gradients are then scaled *down*).
        window: the skipped-step rate is taken over this many optimizer steps (default 50); it is
            judged only once that many steps have run, so the scaler's first back-offs pass.
        threshold: warn when the rate over a full window exceeds this share (default 0.25).
        lr: the run's learning rate, quoted in the advice when given.

    .. note:: The warning is a :class:`PrecisionWarning`, raised at most once per instance.
    """

    floor: float = 1.0
    window: int = 50
    threshold: float = 0.25
    lr: float | None = None
    step: int | None = field(default=None, init=False)  # the step the warning fired at
    scale: float | None = field(default=None, init=False)  # the scale then
    message: str | None = field(default=None, init=False)
    _recent: deque = field(init=False, repr=False)

    def __post_init__(self):
        check_int("window", self.window, minimum=1, message="ScaleHealth({name}={value!r}) is not allowed: it must be {rule}.")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"ScaleHealth(threshold={self.threshold!r}) is not allowed: it must be between 0 and 1.")
        self._recent = deque(maxlen=self.window)

    @property
    def skip_rate(self) -> float:
        """The share of skipped steps among the last ``window`` (fewer at the start)."""
        return sum(self._recent) / len(self._recent) if self._recent else 0.0

    @property
    def status(self) -> str:
        """``"ok"``, or ``"warning"`` once the warning fired."""
        return "ok" if self.message is None else "warning"

    def update(self, step: int, scale: float, skipped: bool) -> None:
        """Record one optimizer step; warn (once) when the scale or the skip rate crossed its limit."""
        self._recent.append(bool(skipped))
        if self.message is not None:
            return
        low = scale < self.floor
        full = len(self._recent) == self.window
        if not (low or (full and self.skip_rate > self.threshold)):
            return
        self.step, self.scale = step, scale
        why = (f"the loss scale fell to {scale:g}, below the floor {self.floor:g}" if low else
               f"{self.skip_rate:.0%} of the last {self.window} optimizer steps were skipped "
               f"(threshold {self.threshold:.0%})")
        lr = f" (lr={self.lr:g} now)" if self.lr is not None else ""
        self.message = (f"fp16 loss scaling is failing at step {step}: {why}; scale={scale:g}, skipped "
                        f"{self.skip_rate:.0%} of the last {len(self._recent)} steps. Gradients keep "
                        f"overflowing fp16. " + ADVICE.format(lr=lr))
        warnings.warn(self.message, PrecisionWarning, stacklevel=2)

    def to_dict(self) -> dict:
        """JSON-safe: ``status``, ``step``, ``scale``, ``skip_rate``, ``message`` and the limits."""
        return {"status": self.status, "step": self.step, "scale": self.scale, "skip_rate": self.skip_rate,
                "message": self.message, "floor": self.floor, "window": self.window, "threshold": self.threshold}
