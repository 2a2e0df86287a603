"""What a run reports: the loss and throughput of the steps since the last log step, and the
GradScaler's skipped steps. Everything stays on the device until a log step reads it.

Example::

    >>> meter = StepMeter(torch.device("cpu"))
    >>> meter.add_step(torch.tensor(2.0), grad_norm=torch.tensor(0.5))
    >>> meter.read_window(World())["loss"]                                        # doctest: +SKIP
    2.0
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from utils.training.amp.scale_health import ScaleHealth
from utils.training.parallel.launch import progress_bar


class StepMeter:
    """Sums over the steps since the last log step (the window) and over the epoch, on ``device``.

    ``tokens_done`` counts the samples of the logged windows; ``eval_s`` the seconds spent
    validating, which throughput leaves out.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.tokens_done, self.eval_s = 0, 0.0
        self.grad_norm = torch.zeros((), device=device)
        self.new_window()
        self.new_epoch()

    def new_window(self) -> None:
        self.loss, self.steps, self.count = torch.zeros((), device=self.device), 0, 0
        self.t0 = time.perf_counter()

    def new_epoch(self) -> None:
        self.epoch_loss, self.epoch_steps = torch.zeros((), device=self.device), 0

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """One optimizer step's loss (the sum of its micro-batches' shares) and gradient norm."""
        self.loss += loss
        self.steps += 1
        self.epoch_loss += loss
        self.epoch_steps += 1
        self.grad_norm = grad_norm

    def read_window(self, world) -> dict:
        """The window's mean loss and samples per second over every rank (a collective), then a new window."""
        loss, count = world.mean(self.loss), world.sum(self.count)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        read = {"loss": float(loss) / self.steps, "tokens_per_s": count / elapsed}
        self.tokens_done += count
        self.new_window()
        return read

    def epoch_mean(self, world) -> float | None:
        """This epoch's mean step loss over every rank (a collective), or None before its first step."""
        return float(world.mean(self.epoch_loss)) / self.epoch_steps if self.epoch_steps else None

    @contextlib.contextmanager
    def paused(self):
        """Validation: its time is left out of the throughput, and the window's clock starts again after it."""
        t0 = time.perf_counter()
        yield
        self.eval_s += time.perf_counter() - t0
        self.t0 = time.perf_counter()


class ScaleWatch:
    """Under a GradScaler (``16-mixed``), which steps were skipped for inf/NaN gradients, and the
    scale's health (:class:`ScaleHealth`); without one, nothing (``scale`` is None).

    .. note:: :meth:`after_update` reads the scale from the device: one host sync per fp16 step
        (``scaler.step`` syncs anyway).
    """

    def __init__(self, scaler: torch.amp.GradScaler, lr: float):
        self.scale = scaler.get_scale() if scaler.is_enabled() else None
        self.health = ScaleHealth(lr=lr) if scaler.is_enabled() else None
        self.skipped = False

    def after_update(self, scaler: torch.amp.GradScaler, step: int) -> bool:
        """Whether the step just taken was skipped: the scale backed off across ``update()`` (this
        holds for fused optimizers too)."""
        if self.scale is None:
            return False
        new_scale = scaler.get_scale()
        self.skipped = new_scale < self.scale
        self.scale = new_scale
        self.health.update(step, new_scale, self.skipped)  # host values: no sync
        return self.skipped

    def reload(self, scaler: torch.amp.GradScaler) -> None:
        """After the scaler's state was restored from a checkpoint."""
        if scaler.is_enabled():
            self.scale = scaler.get_scale()

    def metrics(self) -> dict:
        return {} if self.health is None else {"scale_health": self.health.status, "skip_rate": self.health.skip_rate}


def step_record(position, window: dict, lr: float, grad_norm: torch.Tensor, scales: ScaleWatch) -> dict:
    """The record of a log step (a line of metrics.jsonl, and what ``on_step_end`` receives)."""
    return {"type": "step", "step": position.global_step, "epoch": position.current_epoch, "loss": window["loss"],
            "lr": lr, "grad_norm": float(grad_norm), "loss_scale": scales.scale, "skipped": bool(scales.skipped),
            "skipped_steps": position.skipped_steps, "tokens_per_s": window["tokens_per_s"], **scales.metrics()}


def run_bar(settings, batches, initial: int, show: bool, precision: str):
    """The run's progress bar, counting optimizer steps (a length only when the data has one)."""
    return progress_bar(total=total_steps(settings, batches), initial=initial, disable=not (settings.progress and show),
                        desc=f"train [{precision}]", unit="step")


def total_steps(settings, batches) -> int | None:
    """The steps the run will take (None: a data loader without a length)."""
    if settings.max_steps is not None:
        return settings.max_steps
    try:
        return settings.epochs * math.ceil(len(batches) / settings.grad_accum_steps)
    except TypeError:
        return None
