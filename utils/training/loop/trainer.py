"""The stepping of a run: the :class:`Trainer`, which owns the run's state, and :class:`TrainResult`.

Example::

    >>> trainer = Trainer(model, plan, optimizer, scheduler, scaler, batches, None, TrainSettings())  # doctest: +SKIP
    >>> result = trainer.fit()                                                     # doctest: +SKIP
    >>> other.load_state_dict(trainer.state_dict())   # continues exactly where trainer stopped  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.training.amp.precision import PrecisionPlan
from utils.training.batches import forward_loss, move_to, prepare_batch
from utils.training.loop.evaluate import evaluate
from utils.training.loop.guards import StepChecks
from utils.training.loop.interrupts import StopSignals
from utils.training.loop.meter import ScaleWatch, StepMeter, run_bar, step_record
from utils.training.loop.position import RunPosition, rng_state
from utils.training.objectives import Objective, objective_for
from utils.training.parallel.distributed import World, full_tensor, load_weights_state, weights_state
from utils.training.runs.checkpoint import Checkpointer
from utils.training.runs.metrics_log import MetricsLog
from utils.training.settings import TrainSettings


@dataclass
class TrainResult:
    """What a run did. ``history`` holds the logged steps, ``epochs`` the per-epoch records;
    ``tokens_per_second`` counts training time only (validation excluded), ``wall_time_s`` all of it."""

    history: list[dict]
    epochs: list[dict]
    final_loss: float | None
    skipped_steps: int
    final_loss_scale: float | None
    precision: PrecisionPlan
    wall_time_s: float
    tokens_per_second: float
    interrupted: bool = False
    checkpoint_path: str | None = None
    global_step: int = 0
    best_val_loss: float | None = None
    scale_health: dict | None = None  # ScaleHealth.to_dict() under 16-mixed, else None
    checkpoint_step: int | None = None  # the step checkpoint_path holds; == global_step: nothing lost
    stopped_by: str | None = None  # "SIGINT", "SIGTERM" or "KeyboardInterrupt" when interrupted
    objective: str | None = None  # what the model was trained to predict; None with a loss_fn

    @property
    def last_validation(self) -> dict:
        """The last epoch record with a validation loss (``val_loss``, ``val_perplexity``,
        ``val_accuracy``), or ``{}`` when nothing was validated."""
        return next((e for e in reversed(self.epochs) if e.get("val_loss") is not None), {})

    @classmethod
    def of(cls, trainer: Trainer, wall: float, interrupted: bool) -> TrainResult:
        pos, meter, scales = trainer.position, trainer.meter, trainer.scales
        return cls(
            history=pos.history, epochs=pos.epoch_records, final_loss=pos.history[-1]["loss"] if pos.history else None,
            skipped_steps=pos.skipped_steps, final_loss_scale=scales.scale, precision=trainer.precision,
            wall_time_s=wall, tokens_per_second=meter.tokens_done / max(wall - meter.eval_s, 1e-9),
            interrupted=interrupted, checkpoint_path=trainer.checkpoints.path, global_step=pos.global_step,
            best_val_loss=pos.best_val_loss, checkpoint_step=trainer.checkpoints.step,
            stopped_by=trainer.stop.requested or ("KeyboardInterrupt" if interrupted else None),
            scale_health=None if scales.health is None else scales.health.to_dict(),
            objective=trainer.objective.describe() if trainer.objective is not None else None,
        )


class StopAtBoundary(Exception):
    """A stop signal, taken after a whole optimizer step."""


def _position_field(name: str) -> property:
    return property(lambda self: getattr(self.position, name), doc=f"``position.{name}`` (read-only).")


class Trainer:
    """The stepping of a run. Callbacks receive it as ``trainer`` and may read ``model``, ``optimizer``,
    ``scheduler``, ``scaler``, ``precision`` (the plan), ``settings``, ``global_step``, ``current_epoch``,
    ``skipped_steps``, ``scale_health`` and ``run_dir``; ``net`` is what runs forward (the model, or its DDP wrapper under
    torchrun) and ``world`` the processes of the run. Its counters and records are ``position``
    (:class:`RunPosition`), its sums ``meter`` (:class:`StepMeter`); :meth:`state_dict` is everything a
    resume needs. Records go through ``log`` (:class:`MetricsLog`), checkpoints through ``checkpoints``
    (:class:`Checkpointer`), per-step checks through ``checks`` (:class:`StepChecks`)."""

    global_step, current_epoch, skipped_steps = map(_position_field, ("global_step", "current_epoch", "skipped_steps"))
    scale_health = property(lambda self: self.scales.health, doc="The run's ScaleHealth under 16-mixed, else None.")

    def __init__(self, model, plan, optimizer, scheduler, scaler, batches, val_batches, settings: TrainSettings,
                 loss_fn=None, callbacks=(), run_dir=None, world: World | None = None,
                 objective: Objective | None = None, keep_fp32=()):
        self.model, self.precision, self.settings, self.world = model, plan, settings, world or World()
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.net = model  # World.fit swaps in the DDP wrapper for the run
        self.batches, self.val_batches, self.loss_fn = batches, val_batches, loss_fn
        self.objective = objective if objective is not None or loss_fn is not None else objective_for(model)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log = MetricsLog(self.run_dir, callbacks, self.world.is_rank_zero)  # rank 0 alone logs
        self.checkpoints = Checkpointer(self.run_dir, self.world, settings.checkpoint_every, settings.checkpoint_minutes)
        self.checks = StepChecks(model, plan, profile=self.objective.profile if self.objective else None)
        self.stop = StopSignals(lambda: self.checkpoints.saving)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.position, self.meter = RunPosition(), StepMeter(plan.device)
        self.scales, self.bar = ScaleWatch(scaler, settings.lr), None
        self.keep_fp32 = list(keep_fp32)  # modules train() runs in fp32 under autocast

    def state_dict(self) -> dict:
        """Everything a resume needs: weights, optimizer, scheduler, scaler, RNG, data position, counters
        and records (under FSDP this process's shards of the weights and optimizer)."""
        model, optimizer = weights_state(self.model, self.optimizer, sharded=self.world.strategy == "fsdp")
        return {"model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_state(), **self.position.state_dict(),
                "world_size": self.world.world_size, "precision": self.precision.name,
                "args": {k: v for k, v in vars(self.settings).items() if k != "progress"}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a :meth:`state_dict`, or a checkpoint's): the next step is the one
        the uninterrupted run took. A saved scaler state is loaded only where this run has a GradScaler;
        weights read from a sharded checkpoint (``state["sharded"]``) are in DCP's layout.

        Raises:
            ValueError: the weights do not fit the model, or the optimizer state the optimizer.
        """
        dcp_layout = self.world.strategy == "fsdp" or bool(state.get("sharded"))  # read from shards: DCP's layout
        load_weights_state(self.model, self.optimizer, state["model"], state["optimizer"], sharded=dcp_layout)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.scales.reload(self.scaler)
        self.position.load_state_dict(state)

    def save(self, best: bool = False) -> None:
        """A checkpoint of this step, if every weight and optimizer value is finite (see :meth:`StepChecks.before_save`)."""
        if self.checkpoints.folder is None:
            return
        self.checks.before_save(self.model, self.optimizer, self.world, self.global_step,
                                self.checkpoints.last_good(), self.settings.lr)
        self.checkpoints.save(self.state_dict(), best=best)

    # ---- one optimizer step ----------------------------------------------------------------------
    def _forward(self, batch) -> tuple[torch.Tensor, int]:
        """One micro-batch's loss and how many samples it counts for throughput."""
        if self.loss_fn is None:
            self.checks.observe_ids(prepare_batch(batch).input_ids, self.global_step)  # before the copy
        batch = move_to(batch, self.precision.device)
        with self.precision.autocast():
            if self.loss_fn is not None:
                return self.loss_fn(self.net, batch), batch.shape[0] if isinstance(batch, torch.Tensor) else 1
            prepared = self.objective.prepare(batch)
            loss, _, targets = forward_loss(self.net, prepared)
        self.checks.observe_targets(targets, self.global_step)
        return loss, prepared.count

    def _step(self, batches) -> int:
        """One optimizer step over the next ``grad_accum_steps`` micro-batches of ``batches`` (fewer at
        an epoch's end, as Lightning does); returns how many it took, 0 when none were left."""
        accum, n = self.settings.grad_accum_steps, 0
        step_loss = torch.zeros((), device=self.precision.device)
        for batch in itertools.islice(batches, accum):
            self.position.mid_step = True  # from here until the step is whole, an interrupt saves nothing
            with self.world.no_sync(self.net, n + 1 < accum):  # DDP all-reduces on the last micro-batch
                loss, count = self._forward(batch)
                loss = loss / accum
                self.scaler.scale(loss).backward()
            step_loss, n, self.meter.count = step_loss + loss.detach(), n + 1, self.meter.count + count
        if n == 0:
            return 0
        if n < accum:  # a short last accumulation ran all its micro-batches under no_sync
            self.world.average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        grad_norm = full_tensor(  # the whole model's norm, also over FSDP's shards
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm or math.inf))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.position.global_step += 1
        skipped = self.scales.after_update(self.scaler, self.global_step)
        if self.scales.scale is None:  # no scaler to absorb a non-finite step: remember it, on the device
            self.checks.observe_step(self.global_step, step_loss, grad_norm)
        else:  # every step skipped, the scale collapsing: no progress
            self.checks.observe_skip(skipped, self.scales.scale, self.global_step)
        if not skipped:
            self.scheduler.step()
        self.meter.add_step(step_loss, grad_norm)
        self.position.step_taken(n, skipped)  # from here on the state is one whole step: safe to save
        return n

    def _after_step(self) -> None:
        """Log, checkpoint and stop signals, at the step boundary."""
        self.bar.update(1)
        log_step = self.global_step % self.settings.log_every == 0 or self.position.done(self.settings)
        if log_step:
            self._log_step()
        if self.checkpoints.due(self.global_step, log_step):
            self.save()
        if self.stop.agreed(self.world, self.precision.device, can_agree=log_step):
            raise StopAtBoundary

    # ---- log steps, epoch ends and the loop -------------------------------------------------------
    def _log_step(self) -> None:
        self.checks.verify(self.world, self.checkpoints.last_good(), self.settings.lr)  # so every rank stops
        metrics = step_record(self.position, self.meter.read_window(self.world), self.optimizer.param_groups[0]["lr"],
                              self.meter.grad_norm, self.scales)
        self.position.history.append(metrics)
        self.log.write(metrics)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        self.log.call("on_step_end", self, metrics)

    def _end_epoch(self, complete: bool) -> None:
        if self.meter.steps:  # every epoch ends on a logged step
            self._log_step()
        pos = self.position
        record = {"type": "epoch", "epoch": pos.current_epoch, "step": pos.global_step, "complete": complete,
                  "train_loss": self.meter.epoch_mean(self.world)}
        if self.val_batches is not None:
            with self.meter.paused():  # throughput counts training time only
                val = evaluate(self.model, self.val_batches, self.precision, batch_size=self.settings.batch_size,
                               loss_fn=self.loss_fn, task=self.objective)
            record.update(val)
            self.log.call("on_validation_end", self, val)
        is_best = pos.is_best(record)
        pos.epoch_records.append(record)
        self.log.write(record)
        pos.mid_step = True  # the record is in, the position not yet moved: an interrupt saves nothing
        self.log.call("on_train_epoch_end", self, self.model)  # current_epoch: the one that ended
        pos.end_epoch(complete, record["val_loss"] if is_best else None)
        pos.mid_step = False
        self.save(best=is_best)

    def _run_epoch(self) -> bool:
        """Train until the epoch ends or the run is done; True when the epoch ran to its end."""
        self.meter.new_epoch()
        batches = self.position.epoch_iter(self.batches)
        while n := self._step(batches):
            self._after_step()
            if n == self.settings.grad_accum_steps and self.position.done(self.settings):
                return False
        return True

    def _train(self) -> None:
        self.log.call("on_train_start", self)
        self.model.train()
        self.meter.new_window()
        if self.position.owes_final_validation(self.settings):
            self._end_epoch(complete=False)
        while not self.position.done(self.settings):
            complete = self._run_epoch()
            if complete or self.position.done(self.settings):
                self._end_epoch(complete)
            if self.stop.agreed(self.world, self.precision.device, can_agree=True):  # all ranks end the epoch alike
                raise StopAtBoundary
        if self.meter.steps:
            self._log_step()

    def fit(self) -> TrainResult:
        t0, interrupted = time.perf_counter(), False
        self.checkpoints.prepare(overwrite=self.settings.overwrite)
        self.bar = run_bar(self.settings, self.batches, self.global_step, self.world.is_rank_zero, self.precision.name)
        try:
            with self.stop:
                self.log.open(keep=self.position.records_kept())
                try:
                    self._train()
                except (KeyboardInterrupt, StopAtBoundary):
                    interrupted = True
                    self.optimizer.zero_grad(set_to_none=True)
                    if not self.position.mid_step and self.checkpoints.step != self.global_step:
                        self.save()  # where the run stopped, unless a step was half-applied
        finally:
            self.bar.close()
            self.log.close()
        if not interrupted and self.checkpoints.step != self.global_step:
            self.save()
        result = TrainResult.of(self, time.perf_counter() - t0, interrupted)
        self.log.call("on_train_end", self, result)
        return result

