"""Ctrl-C and SIGTERM (a scheduler's or Colab's stop) taken at a step boundary.

The first signal asks the loop to stop after the optimizer step in flight; the loop then saves a
checkpoint and returns ``interrupted=True``. A second signal stops at once (``KeyboardInterrupt``),
unless a checkpoint is being written: the save finishes first, so the previous checkpoint is never
lost and the new one is whole.

Example::

    >>> with StopSignals(lambda: checkpointer.saving) as stop:    # doctest: +SKIP
    ...     while not stop.requested: step()
"""

from __future__ import annotations

import signal
import threading

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Handlers for SIGINT and SIGTERM while a run trains, installed only in the main thread (where
    Python delivers signals) and restored on exit.

    Args:
        saving: a callable, True while a checkpoint is written (a second signal then waits for it).
    """

    def __init__(self, saving=lambda: False):
        self.saving = saving
        self.requested: str | None = None  # the signal's name, once one arrived
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def agreed(self, world, device, can_agree: bool) -> bool:
        """A stop signal arrived. Under torchrun the ranks agree on it where ``can_agree`` (the log
        steps, a collective there already), so that all stop after the same step: one rank alone
        would leave the others waiting."""
        if not world.is_distributed:
            return self.requested is not None
        return can_agree and bool(world.max(torch.tensor(int(self.requested is not None), device=device)))

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            return
        if self.saving():  # the save in progress finishes; the loop stops right after it
            return
        raise KeyboardInterrupt(f"a second {name}: stopping now")
