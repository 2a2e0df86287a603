"""The AMP training loop: one code path for fp32, fp16 with GradScaler, and bf16.

Example::

    >>> from utils.training import train
    >>> result = train(model, train_ids, val_data=val_ids, precision="auto", max_steps=200,
    ...                batch_size=16, run_dir="runs/demo")          # doctest: +SKIP
    >>> result.final_loss, result.skipped_steps, result.precision.name   # doctest: +SKIP
    (2.31, 0, 'bf16-mixed')
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from utils.models.calls import find_logits_network, returns_loss
from utils.models.profile import look_at
from utils.training.amp.acceleration import compile_model, tf32_matmuls
from utils.training.amp.keep_fp32 import KeptModules, plan_keep_fp32
from utils.training.amp.precision import PrecisionPlan, resolve_precision
from utils.training.amp.scale_health import ScaleHealth
from utils.training.batches import (
    IGNORE_INDEX,
    TensorBatches,
    as_batches,
    check_token_ids,
    forward_loss,
    move_to,
    prepare_batch,
)
from utils.training.loop.guards import StepChecks
from utils.training.loop.interrupts import StopSignals
from utils.training.objectives import Objective, objective_for
from utils.training.parallel import distributed
from utils.training.parallel.launch import progress_bar, train_on
from utils.training.runs import checkpoint as ckpt_io
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
        return cls(
            history=trainer.history, epochs=trainer.epoch_records,
            final_loss=trainer.history[-1]["loss"] if trainer.history else None,
            skipped_steps=trainer.skipped_steps, final_loss_scale=trainer.scale, precision=trainer.precision,
            wall_time_s=wall, tokens_per_second=trainer.tokens_done / max(wall - trainer.eval_s, 1e-9),
            interrupted=interrupted, checkpoint_path=trainer.checkpoints.path, global_step=trainer.global_step,
            best_val_loss=trainer.best_val_loss, checkpoint_step=trainer.checkpoints.step,
            stopped_by=trainer.stop.requested or ("KeyboardInterrupt" if interrupted else None),
            scale_health=None if trainer.scale_health is None else trainer.scale_health.to_dict(),
            objective=trainer.objective.describe() if trainer.objective is not None else None,
        )


TrainArgs = TrainSettings  # the loop's old name for its settings, kept for code that imports it


def default_optimizer(model: nn.Module, lr: float, weight_decay: float, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's grouping); fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, fused=device_type == "cuda" or None)


@torch.no_grad()
def evaluate(model: nn.Module, data, plan: PrecisionPlan, *, batch_size: int = 8, loss_fn=None,
             task: str | Objective | None = None) -> dict:
    """Mean loss (and accuracy, and perplexity for language models) over ``data``, under the plan's autocast.

    Example::

        >>> evaluate(bert, val_ids, resolve_precision("32-true"))["val_accuracy"]   # doctest: +SKIP
        0.31

    Args:
        loss_fn: ``loss_fn(model, batch) -> scalar`` replaces the forward pass (no accuracy then).
        task: the model's task or its :class:`~utils.training.objectives.Objective` (default None:
            detected). Accuracy counts what the objective predicts: the next token (causal LM),
            the hidden tokens (masked LM, the same positions every call), each label of a seq2seq
            target, or one label per sequence (classifier).

    Returns:
        ``{"val_loss": float, "val_accuracy": float | None, "val_perplexity": float | None}``.
    """
    if loss_fn is None:
        model, task = _scored(model, task)
    masks = torch.Generator().manual_seed(0)  # a masked LM is scored on the same positions every time
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=plan.device, dtype=torch.float64)
    correct = torch.zeros((), device=plan.device, dtype=torch.int64)
    n_loss, n_tok, is_lm = 0, 0, False
    batches = as_batches(data, batch_size, 0, "val_data", shuffle=False)
    for batch in (batches.epoch(0) if isinstance(batches, TensorBatches) else batches):
        batch = move_to(batch, plan.device)
        with plan.autocast():
            if loss_fn is not None:
                loss, n = loss_fn(model, batch), 1
            else:
                prepared = task.prepare(batch, generator=masks, argument="val_data")
                check_token_ids(model, prepared, "val_data")  # eval is off the hot path: syncs are fine
                loss, logits, targets = forward_loss(model, prepared)
                if logits is None:  # the model's own loss, and no network to score: loss only
                    loss_sum += loss.double()
                    n_loss += 1
                    continue
                mask = targets != IGNORE_INDEX
                n = int(mask.sum())
                correct += ((logits.argmax(-1) == targets) & mask).sum()
                n_tok += n
                is_lm = logits.dim() == 3
        if n:  # a batch with no target has a NaN mean loss and nothing to add
            loss_sum += loss.double() * n
            n_loss += n
    model.train(was_training)
    if not n_loss:
        raise ValueError(f"val_data has no target to evaluate: every target is IGNORE_INDEX ({IGNORE_INDEX}).")
    val_loss = float(loss_sum) / max(n_loss, 1)
    return {
        "val_loss": val_loss,
        "val_accuracy": float(correct) / n_tok if n_tok else None,
        "val_perplexity": math.exp(min(val_loss, 700.0)) if is_lm else None,
    }


def _scored(model: nn.Module, task) -> tuple[nn.Module, Objective]:
    """What ``evaluate`` scores: a model that returns its own loss is scored through the network it
    wraps when it holds one (loss, accuracy and perplexity from its logits), else on its loss alone."""
    call = f"evaluate({type(model).__name__})"
    if task.own_loss if isinstance(task, Objective) else returns_loss(model):  # the objective's look knows
        found = find_logits_network(model)
        if found is not None:
            return found[1], objective_for(found[1], call=call)
    return model, task if isinstance(task, Objective) else objective_for(model, task, call=call)


class _StopAtBoundary(Exception):
    """A stop signal, taken after a whole optimizer step."""


class Trainer:
    """The stepping of a run. Callbacks receive it as ``trainer`` and may read ``model``, ``optimizer``,
    ``scheduler``, ``scaler``, ``precision`` (the plan), ``global_step``, ``current_epoch``,
    ``skipped_steps`` and ``run_dir``; ``net`` is what runs forward (the model, or its DDP wrapper
    under torchrun) and ``world`` the processes of the run. Records go through ``log``
    (:class:`MetricsLog`), checkpoints through ``checkpoints`` (:class:`Checkpointer`), per-step
    checks through ``checks`` (:class:`StepChecks`)."""

    def __init__(self, model, plan, optimizer, scheduler, scaler, batches, val_batches, args: TrainArgs,
                 loss_fn, callbacks, run_dir, world: distributed.World | None = None,
                 objective: Objective | None = None):
        self.model, self.precision, self.optimizer = model, plan, optimizer
        self.world = world or distributed.World()
        self.net = model  # World.fit swaps in the DDP wrapper for the run
        self.scheduler, self.scaler, self.args = scheduler, scaler, args
        self.batches, self.val_batches, self.loss_fn = batches, val_batches, loss_fn
        self.objective = objective if objective is not None or loss_fn is not None else objective_for(model)
        self.tensor_data = isinstance(batches, TensorBatches)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log = MetricsLog(self.run_dir, callbacks, self.world.is_rank_zero)
        self.callbacks = self.log.callbacks  # rank 0 alone logs
        self.checkpoints = Checkpointer(self.run_dir, self.world, args.checkpoint_every, args.checkpoint_minutes)
        self.checks = StepChecks(model, plan, profile=self.objective.profile if self.objective else None)
        self.stop = StopSignals(lambda: self.checkpoints.saving)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.global_step = self.current_epoch = self.batch_in_epoch = self.skipped_steps = 0
        self.history: list[dict] = []
        self.epoch_records: list[dict] = []
        self.best_val_loss: float | None = None
        self.epoch_rng = None  # RNG state at the start of this epoch, to replay a DataLoader's shuffle
        self.resume_rng = None
        self.resumed = False
        self.scale = scaler.get_scale() if scaler.is_enabled() else None
        self._grad_norm = torch.zeros((), device=plan.device)
        self._skipped = False
        self._mid_step = False  # True while a step's state is half-applied: an interrupt then saves nothing
        self._epoch_loss, self._epoch_steps = torch.zeros((), device=plan.device), 0
        self._bar = None
        self.tokens_done, self.eval_s = 0, 0.0
        self._win_loss = torch.zeros((), device=plan.device)  # the steps since the last log step
        self._win_steps, self._win_count, self._win_t0 = 0, 0, time.perf_counter()
        self.scale_health = ScaleHealth(lr=args.lr) if scaler.is_enabled() else None
        self.keep_fp32: list[str] = []  # modules train() runs in fp32 under autocast

    @property
    def checkpoint_path(self) -> str | None:
        """The last checkpoint saved or restored: the last good one."""
        return self.checkpoints.path

    # ---- one optimizer step ------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._win_loss = torch.zeros((), device=self.precision.device)
        self._win_steps, self._win_count, self._win_t0 = 0, 0, time.perf_counter()

    def _backward(self, batch) -> torch.Tensor:
        if self.loss_fn is None:
            self.checks.observe_ids(prepare_batch(batch).input_ids, self.global_step)  # before the copy
        batch = move_to(batch, self.precision.device)
        with self.precision.autocast():
            if self.loss_fn is not None:
                loss = self.loss_fn(self.net, batch)
                count = batch.shape[0] if isinstance(batch, torch.Tensor) else 1
            else:
                prepared = self.objective.prepare(batch)
                loss, _, targets = forward_loss(self.net, prepared)
                self.checks.observe_targets(targets, self.global_step)
                count = prepared.count
        self._win_count += count
        loss = loss / self.args.grad_accum_steps
        self.scaler.scale(loss).backward()
        return loss.detach()

    def _optimizer_step(self, step_loss: torch.Tensor) -> None:
        self.scaler.unscale_(self.optimizer)
        self._grad_norm = distributed.full_tensor(  # the whole model's norm, also over FSDP's shards
            torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm or math.inf))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self._skipped = False
        if self.scale is not None:
            # A skipped step (inf/NaN grads) shows as the scale backing off across update(); this
            # holds for fused optimizers too. One host sync per fp16 step (scaler.step syncs anyway).
            new_scale = self.scaler.get_scale()
            self._skipped = new_scale < self.scale
            self.scale = new_scale
            self.skipped_steps += self._skipped
            self.scale_health.update(self.global_step, new_scale, self._skipped)  # host values: no sync
        else:  # no scaler to absorb a non-finite step: remember the first bad one, on the device
            self.checks.observe_step(self.global_step, step_loss, self._grad_norm)
        if not self._skipped:
            self.scheduler.step()
        self._win_loss += step_loss
        self._win_steps += 1
        self._epoch_loss += step_loss
        self._epoch_steps += 1

    def _finish_step(self, step_loss: torch.Tensor, micro_batches: int) -> None:
        self._optimizer_step(step_loss)
        self.batch_in_epoch += micro_batches
        self._mid_step = False  # from here on the state is one whole step: safe to save
        if self.scale is not None:
            self.checks.observe_skip(self._skipped, self.scale, self.global_step)
        if self._bar is not None:
            self._bar.update(1)
        log_step = self.global_step % self.args.log_every == 0 or self._done()
        if log_step:
            self._log_step()
        if self.checkpoints.due(self.global_step, log_step):
            self.checkpoints.save(self)
        if self._stop_now(log_step):
            raise _StopAtBoundary

    def _stop_now(self, can_agree: bool) -> bool:
        """A stop signal arrived. Under torchrun the ranks agree on it at log steps (a collective there
        already), so that all stop after the same step: one rank alone would leave the others waiting."""
        if not self.world.is_distributed:
            return self.stop.requested is not None
        if not can_agree:
            return False
        flag = torch.tensor(int(self.stop.requested is not None), device=self.precision.device)
        return bool(self.world.max(flag))

    # ---- logging -----------------------------------------------------------------------------
    def _log_step(self) -> None:
        self.checks.verify(self.world, self.checkpoints.last_good(), self.args.lr)  # so every rank stops
        self._win_loss, self._win_count = self.world.mean(self._win_loss), self.world.sum(self._win_count)
        elapsed = max(time.perf_counter() - self._win_t0, 1e-9)
        metrics = {
            "type": "step", "step": self.global_step, "epoch": self.current_epoch,
            "loss": float(self._win_loss) / self._win_steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(self._grad_norm),
            "loss_scale": self.scale,
            "skipped": bool(self._skipped),
            "skipped_steps": self.skipped_steps,
            "tokens_per_s": self._win_count / elapsed,
        }
        if self.scale_health is not None:
            metrics.update({"scale_health": self.scale_health.status, "skip_rate": self.scale_health.skip_rate})
        self.history.append(metrics)
        self.log.write(metrics)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        self.tokens_done += self._win_count
        self._reset_window()
        self.log.call("on_step_end", self, metrics)

    def _end_epoch(self, complete: bool) -> None:
        if self._win_steps:  # every epoch ends on a logged step
            self._log_step()
        train_loss = float(self.world.mean(self._epoch_loss)) / self._epoch_steps if self._epoch_steps else None
        record = {"type": "epoch", "epoch": self.current_epoch, "step": self.global_step, "complete": complete,
                  "train_loss": train_loss}
        if self.val_batches is not None:
            t_eval = time.perf_counter()
            val = evaluate(self.model, self.val_batches, self.precision, batch_size=self.args.batch_size,
                           loss_fn=self.loss_fn, task=self.objective)
            self.eval_s += time.perf_counter() - t_eval
            self._win_t0 = time.perf_counter()  # throughput counts training time only
            record.update(val)
            self.log.call("on_validation_end", self, val)
        is_best = record.get("val_loss") is not None and (
            self.best_val_loss is None or record["val_loss"] < self.best_val_loss)
        self.epoch_records.append(record)
        self.log.write(record)
        self._mid_step = True  # the record is in, the position not yet moved: an interrupt saves nothing
        self.log.call("on_train_epoch_end", self, self.model)  # current_epoch: the one that ended
        if complete:
            self.current_epoch += 1
            self.batch_in_epoch = 0
        if is_best:
            self.best_val_loss = record["val_loss"]
        self._mid_step = False
        self.checkpoints.save(self, best=is_best)

    # ---- resume ------------------------------------------------------------------------------
    def restore(self, resume_from) -> None:
        self.checkpoints.restore(self, resume_from)

    # ---- the loop ----------------------------------------------------------------------------
    def _epoch_iter(self):
        it, self.epoch_rng = ckpt_io.epoch_batches(self.batches, self.current_epoch, self.batch_in_epoch,
                                                   self.resume_rng, self.epoch_rng)
        self.resume_rng = None
        return it

    def _done(self) -> bool:
        if self.args.max_steps is not None:
            return self.global_step >= self.args.max_steps
        return self.current_epoch >= self.args.epochs

    def _run_epoch(self) -> bool:
        """Train until the epoch ends or the run is done; True when the epoch ran to its end."""
        accum, pending = self.args.grad_accum_steps, 0
        self._epoch_loss, self._epoch_steps = torch.zeros((), device=self.precision.device), 0
        step_loss = torch.zeros((), device=self.precision.device)
        for batch in self._epoch_iter():
            self._mid_step = True
            with self.world.no_sync(self.net, pending + 1 < accum):  # DDP all-reduces on the last micro-batch
                step_loss = step_loss + self._backward(batch)
            pending += 1
            if pending == accum:
                self._finish_step(step_loss, pending)
                step_loss, pending = torch.zeros((), device=self.precision.device), 0
                if self._done():
                    return False
        if pending:  # a short last accumulation still steps, as Lightning does
            self.world.average_gradients(self.params)  # its micro-batches all ran under no_sync
            self._finish_step(step_loss, pending)
        return True

    def _total_steps(self) -> int | None:
        if self.args.max_steps is not None:
            return self.args.max_steps
        try:
            return self.args.epochs * math.ceil(len(self.batches) / self.args.grad_accum_steps)
        except TypeError:
            return None

    def _train(self) -> None:
        self.log.call("on_train_start", self)
        self.model.train()
        self._reset_window()
        last = self.epoch_records[-1]["step"] if self.epoch_records else -1
        if self._done() and self.resumed and last < self.global_step:
            self._end_epoch(complete=False)  # stopped during its final validation: run it now
        while not self._done():
            complete = self._run_epoch()
            if complete or self._done():
                self._end_epoch(complete)
            if self._stop_now(can_agree=True):  # every rank ends its epoch at the same step
                raise _StopAtBoundary
        if self._win_steps:
            self._log_step()

    def _stopped(self) -> None:
        """After an interrupt: save where the run stopped, unless a step was half-applied."""
        self.optimizer.zero_grad(set_to_none=True)
        if not self._mid_step and self.checkpoints.step != self.global_step:
            self.checkpoints.save(self)

    def fit(self) -> TrainResult:
        t0, interrupted = time.perf_counter(), False
        self.checkpoints.prepare(overwrite=self.args.overwrite)
        self._bar = progress_bar(total=self._total_steps(), initial=self.global_step,
                         disable=not (self.args.progress and self.world.is_rank_zero),
                         desc=f"train [{self.precision.name}]", unit="step")
        try:
            with self.stop:
                self.log.open(keep=len(self.history) + len(self.epoch_records) if self.resumed else None)
                try:
                    self._train()
                except (KeyboardInterrupt, _StopAtBoundary):
                    interrupted = True
                    self._stopped()
        finally:
            self._bar.close()
            self.log.close()
        if not interrupted and self.checkpoints.step != self.global_step:
            self.checkpoints.save(self)
        result = TrainResult.of(self, time.perf_counter() - t0, interrupted)
        self.log.call("on_train_end", self, result)
        return result


def _place(model: nn.Module, plan: PrecisionPlan) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} is not a torch.nn.Module.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (none with requires_grad=True): nothing to train.")
    model.to(plan.device)
    if plan.param_dtype != torch.float32:  # "-true" precisions hold the weights in half precision
        model.to(plan.param_dtype)
    return model


def train(model: nn.Module, train_data, *, val_data=None, precision=TrainSettings.precision, device=None,
          epochs=TrainSettings.epochs, max_steps=TrainSettings.max_steps, batch_size=TrainSettings.batch_size,
          lr=TrainSettings.lr, weight_decay=TrainSettings.weight_decay, optimizer=None,
          grad_accum_steps=TrainSettings.grad_accum_steps, max_grad_norm=TrainSettings.max_grad_norm,
          warmup_steps=TrainSettings.warmup_steps, loss_fn=None, callbacks=(), run_dir=None,
          checkpoint_every=TrainSettings.checkpoint_every, resume_from=None, seed=TrainSettings.seed,
          log_every=TrainSettings.log_every, progress=TrainSettings.progress, keep_fp32=None,
          scaler_kwargs=None, compile=False, tf32=False,
          checkpoint_minutes=TrainSettings.checkpoint_minutes, overwrite=TrainSettings.overwrite,
          task=TrainSettings.task, mask_token_id=None, devices=None,
          strategy=TrainSettings.strategy) -> TrainResult:
    """Train ``model`` with the precision ``resolve_precision(precision, device)`` decides.

    Example::

        >>> result = train(model, ids, precision="16-mixed", device="cpu", max_steps=20)  # doctest: +SKIP
        >>> result.skipped_steps, result.final_loss_scale                                  # doctest: +SKIP
        (0, 65536.0)

    Args:
        model: any ``nn.Module`` returning logits, a tuple (logits first), or a dict/``ModelOutput``
            with ``logits`` (and ``loss``, used as is).
        train_data: a LongTensor (N, T) of token ids (batched and shuffled from ``seed``), a
            DataLoader, or any re-iterable of batches.
        val_data: evaluated at each epoch end (and at the end of a ``max_steps`` run).
        precision: anything :func:`resolve_precision` accepts, or a ``PrecisionPlan``. Default ``"auto"``.
        epochs: full passes over ``train_data`` (default 1); ignored when ``max_steps`` is set.
        max_steps: optimizer steps for the whole run, skipped ones and those before a resume
            included; epochs repeat as needed.
        grad_accum_steps: micro-batches per optimizer step; the loss is divided by it.
        max_grad_norm: clip the (unscaled) gradient norm; None turns clipping off.
        warmup_steps: linear learning-rate warm-up; the rate is constant afterwards.
        loss_fn: ``loss_fn(model, batch) -> scalar`` replaces the forward pass and loss.
        callbacks: objects with any of ``on_train_start(trainer)``, ``on_step_end(trainer, metrics)``
            (each logged step), ``on_validation_end(trainer, metrics)``,
            ``on_train_epoch_end(trainer, model)``, ``on_train_end(trainer, result)``.
        run_dir: folder for ``metrics.jsonl`` and ``checkpoints/{latest,best}.pt``. A folder that
            already holds a run is refused unless ``resume_from`` continues it or ``overwrite=True``.
        checkpoint_every: also checkpoint every N steps (epoch ends and the run end always do).
        resume_from: a checkpoint file or a run folder; continues that run exactly.
        keep_fp32: modules to run in fp32 under autocast: names, glob patterns (``"*.ln_f"``) or
            ``nn.Module`` types, or ``"auto"`` (under ``16-mixed``, those :func:`scan_fp16_overflow`
            flags on the first batch). The plan's ``reason`` names them; the model is left as it
            was when the call returns. See :mod:`utils.training.amp.keep_fp32`.
        scaler_kwargs: GradScaler settings (``init_scale``, ``growth_factor``, ``backoff_factor``,
            ``growth_interval``), see :meth:`PrecisionPlan.make_scaler`.
        compile: ``torch.compile`` the model in place (default False); True, or a dict of
            ``torch.compile`` options such as ``{"backend": "eager"}``. The first step compiles.
            See :func:`~utils.training.amp.acceleration.compile_model`.
        tf32: let fp32 matmuls use TF32 on CUDA GPUs of compute capability >= 8.0 (default False);
            elsewhere it warns and is ignored. The flags are restored when the run ends.
        checkpoint_minutes: also checkpoint when this many minutes of wall time passed since the
            last save, checked at log steps (default 10: a disconnect loses at most that; None: off).
        overwrite: a fresh run into a folder that holds a run moves the old run aside into
            ``run_dir/replaced-<time>/`` (default False: an error).
        task: what the model predicts, which sets the objective on token ids (default None:
            detected, see :func:`utils.models.tasks.detect_task`): ``"causal-lm"`` the next token;
            ``"masked-lm"`` 15% of positions hidden, loss on those only; ``"seq2seq"`` the window
            rebuilt from a corrupted copy through ``labels``; ``"classifier"`` needs
            ``(inputs, labels)`` batches. Ignored with ``loss_fn``. ``result.objective`` says which ran.
        mask_token_id: the id that hides a token (default: ``config.mask_token_id``, else 255,
            which the byte tokenizer never emits).
        devices: processes to train in (default None: this one, or torchrun's). ``devices=2`` from
            a notebook forks two processes that run this call under DDP (one per GPU; gloo
            processes on a CPU), returns rank 0's result and leaves the trained weights in ``model``.
            See :func:`utils.training.parallel.launch.launch` (CUDA must not be initialised in the kernel yet).
        strategy: ``"ddp"`` (default) or ``"fsdp"``: weights, gradients and AdamW state sharded over
            the processes with FSDP2 (``fully_shard`` per block, parameters gathered in the plan's
            autocast dtype, gradients reduced in fp32). Also valid in one process.

    Raises:
        ValueError: bad arguments, empty data, token ids outside the vocabulary or of a non-integer
            dtype, a batch whose targets are all ignored, targets that do not fit the logits, a model
            with nothing to train, a ``run_dir`` that holds another run, or a checkpoint that is
            damaged or does not fit; ``task="causal-lm"`` for a model that sees later tokens;
            unlabelled token ids for a classifier or a model that takes none.
        FloatingPointError: a non-finite loss or gradient with no GradScaler to absorb it (fp32,
            bf16), weights that are not finite at a save, or a 16-mixed run whose steps are all
            skipped until the loss scale is under 2**-24. No checkpoint is written with them.
        CheckpointWriteError: (an ``OSError``) a full disk or read-only folder; the message names
            the file and the cause; the previous checkpoint is intact.

    .. note::
        Metrics are read from the device every ``log_every`` steps only; ``16-mixed`` reads the
        loss scale once per step (one host sync) to count skipped steps. Ctrl-C and SIGTERM (in
        the main thread) stop the run after the optimizer step in flight, with a checkpoint and
        ``interrupted=True``; a second one stops at once, but never during a save.
        ``result.checkpoint_step == result.global_step`` says that nothing was lost. Under
        ``16-mixed`` a :class:`ScaleHealth` watches the scale (one :class:`PrecisionWarning` when it
        collapses; ``scale_health`` in the step metrics and ``TrainResult``).

    .. note::
        Under ``torchrun`` each process runs this call: the model is wrapped in
        ``DistributedDataParallel``, ``batch_size`` is per process (a tensor ``train_data`` is
        sharded so a step's ``batch_size × world_size`` samples are those one process would draw),
        metrics are averaged over ranks, and rank 0 alone logs, runs ``callbacks`` and writes
        ``run_dir``. A checkpoint resumes on any number of processes with the same global batch.
        See :mod:`utils.training.parallel.distributed`.
    """
    call = dict(locals())  # every argument, for the processes train_on forks
    args = TrainSettings(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, grad_accum_steps=grad_accum_steps, max_grad_norm=max_grad_norm,
                         warmup_steps=warmup_steps, checkpoint_every=checkpoint_every, seed=seed,
                         log_every=log_every, progress=progress,
                         checkpoint_minutes=checkpoint_minutes, overwrite=overwrite, task=task,
                         strategy=strategy)
    args.check()
    _check_fsdp(strategy, model, optimizer, resume_from)
    if devices is not None and not (type(devices) is int and devices == 1):
        return train_on(devices, train, **{k: v for k, v in call.items() if k != "devices"})
    world = replace(distributed.World.detect(), strategy=strategy)  # torchrun's ranks, or rank 0 of 1
    device = world.default_device(device)
    plan = precision if isinstance(precision, PrecisionPlan) else resolve_precision(precision, device)
    scaler = plan.make_scaler(**(scaler_kwargs or {}))  # bad settings fail before any work
    model = _place(model, plan)
    profile = look_at(model, task, call=f"train({type(model).__name__})")  # the one look at the model
    objective = None if loss_fn is not None else objective_for(  # probed before compiling: eager calls
        model, task, mask_token_id=mask_token_id, call=profile.caller, profile=profile)
    model = compile_model(model, compile)
    batches = world.shard(as_batches(train_data, batch_size, seed, "train_data"))
    kept = []
    if keep_fp32 is not None:
        def first_batch():
            return next(iter(batches.epoch(0) if isinstance(batches, TensorBatches) else batches))
        kept, plan = plan_keep_fp32(model, keep_fp32, plan, first_batch, loss_fn)
    val_batches = None if val_data is None else as_batches(val_data, batch_size, seed, "val_data", shuffle=False)
    owned = distributed.init_process_group(world, plan.device) if strategy == "fsdp" else False
    try:
        if strategy == "fsdp":  # before the optimizer: sharding replaces the parameters
            distributed.shard_model(model, plan, kept)
        optimizer = optimizer or default_optimizer(model, lr, weight_decay, plan.device_type)
        warm = max(warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
        trainer = Trainer(model, plan, optimizer, scheduler, scaler, batches, val_batches, args,
                          loss_fn, callbacks, run_dir, world, objective)
        trainer.keep_fp32 = kept
        if resume_from is not None:
            trainer.restore(resume_from)
        else:
            torch.manual_seed(seed)
            random.seed(seed)
    except BaseException:
        distributed.teardown(owned, plan.device, barrier=False)
        raise
    with tf32_matmuls(plan.device, tf32), KeptModules(model, kept, plan.device_type):  # both undone on the way out
        return world.fit(trainer, owned)


def _check_fsdp(strategy: str, model, optimizer, resume_from) -> None:
    """FSDP's own bad input, before any process starts or any file is written."""
    if strategy != "fsdp":
        return
    if resume_from is not None:
        ckpt_io.check_sharding(*ckpt_io.load_checkpoint(resume_from), strategy)
    if optimizer is not None:
        raise ValueError("train(strategy='fsdp', optimizer=...) is not allowed: sharding replaces the model's "
                         "parameters, so train() builds the optimizer after it. Pass optimizer=None.")
    if isinstance(model, nn.Module):
        distributed.check_strategy(strategy, model)
