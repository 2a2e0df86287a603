"""Where a run is: its counters, its place in the data and the records a resume carries on.

Example::

    >>> position = RunPosition()
    >>> position.global_step, position.current_epoch, position.batch_in_epoch
    (0, 0, 0)
    >>> RunPosition().load_state_dict(position.state_dict() | {"rng": rng_state()})   # what a resume does
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from utils.training.batches import TensorBatches
from utils.training.parallel.distributed import set_sampler_epoch


def rng_state() -> dict:
    """The RNG states a resume replays: torch's, Python's and (where present) CUDA's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_batches(batches, epoch: int, start: int, resume_rng, epoch_rng):
    """This epoch's batches from batch ``start`` on, the RNG replayed so that a resumed DataLoader
    reshuffles as the uninterrupted run did. Returns ``(iterator, RNG state at the epoch's start)``."""
    if isinstance(batches, TensorBatches):  # its order depends on (seed, epoch) alone
        if resume_rng is not None:
            set_rng_state(resume_rng)
        return batches.epoch(epoch, start), epoch_rng
    set_sampler_epoch(batches, epoch)
    if resume_rng is not None and start > 0 and epoch_rng is not None:
        set_rng_state(epoch_rng)
        it = iter(batches)
        for _ in range(start):  # a sampler draws its seed at the first next(): replay, don't jump
            next(it)
        set_rng_state(resume_rng)
        return it, epoch_rng
    if resume_rng is not None:
        set_rng_state(resume_rng)
    at_start = rng_state()  # before iter(): a DataLoader draws its seed there
    return iter(batches), at_start


@dataclass
class RunPosition:
    """A run's counters and records; :meth:`state_dict` is their part of a checkpoint.

    ``batch_in_epoch`` counts the (global) micro-batches of this epoch already trained on;
    ``mid_step`` is True while a step is half-applied (an interrupt then saves nothing).
    """

    global_step: int = 0
    current_epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    best_val_loss: float | None = None
    history: list[dict] = field(default_factory=list)
    epoch_records: list[dict] = field(default_factory=list)
    epoch_rng: dict | None = None  # RNG state at the start of this epoch, to replay a DataLoader's shuffle
    resume_rng: dict | None = None  # the RNG state to continue from, once, after a resume
    resumed: bool = False
    mid_step: bool = False

    def state_dict(self) -> dict:
        """The counters, the data position (in global batches) and the records, in the checkpoint's keys."""
        return {"epoch_rng": self.epoch_rng, "position": {"epoch": self.current_epoch, "batch": self.batch_in_epoch},
                "global_step": self.global_step, "skipped_steps": self.skipped_steps,
                "best_val_loss": self.best_val_loss, "history": self.history, "epochs": self.epoch_records}

    def load_state_dict(self, state: dict) -> None:
        """Back from a checkpoint (``state["rng"]`` is replayed when the next epoch's batches are drawn)."""
        self.global_step, self.skipped_steps = state["global_step"], state.get("skipped_steps", 0)
        self.current_epoch, self.batch_in_epoch = state["position"]["epoch"], state["position"]["batch"]
        self.best_val_loss = state.get("best_val_loss")
        self.history, self.epoch_records = list(state.get("history", [])), list(state.get("epochs", []))
        self.epoch_rng, self.resume_rng = state.get("epoch_rng"), state["rng"]
        self.resumed = True

    def step_taken(self, micro_batches: int, skipped: bool) -> None:
        """An optimizer step is whole: its micro-batches are consumed, a skipped one counted."""
        self.skipped_steps += skipped
        self.batch_in_epoch += micro_batches
        self.mid_step = False

    def records_kept(self) -> int | None:
        """The lines of metrics.jsonl a resumed run keeps (its records); None for a fresh run."""
        return len(self.history) + len(self.epoch_records) if self.resumed else None

    def done(self, settings) -> bool:
        """The run has taken its ``max_steps``, or, without them, its ``epochs``."""
        if settings.max_steps is not None:
            return self.global_step >= settings.max_steps
        return self.current_epoch >= settings.epochs

    def owes_final_validation(self, settings) -> bool:
        """Resumed from a checkpoint saved before the run's final validation was recorded: run it now."""
        last = self.epoch_records[-1]["step"] if self.epoch_records else -1
        return self.done(settings) and self.resumed and last < self.global_step

    def is_best(self, record: dict) -> bool:
        """An epoch record whose validation loss beats every earlier one."""
        val = record.get("val_loss")
        return val is not None and (self.best_val_loss is None or val < self.best_val_loss)

    def end_epoch(self, complete: bool, best_val_loss: float | None) -> None:
        """After the epoch's record: a complete epoch moves the data position to the next one's start."""
        if complete:
            self.current_epoch, self.batch_in_epoch = self.current_epoch + 1, 0
        if best_val_loss is not None:
            self.best_val_loss = best_val_loss

    def epoch_iter(self, batches):
        """The batches left in this epoch (see :func:`epoch_batches`)."""
        it, self.epoch_rng = epoch_batches(batches, self.current_epoch, self.batch_in_epoch,
                                           self.resume_rng, self.epoch_rng)
        self.resume_rng = None
        return it
