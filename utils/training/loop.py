"""The AMP training loop: one code path for fp32, fp16 with GradScaler, and bf16.

Example::

    >>> from utils.training import train
    >>> result = train(model, train_ids, val_data=val_ids, precision="auto", max_steps=200,
    ...                batch_size=16, run_dir="runs/demo")          # doctest: +SKIP
    >>> result.final_loss, result.skipped_steps, result.precision.name   # doctest: +SKIP
    (2.31, 0, 'bf16-mixed')
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from utils.strict_json import json_safe
from utils.training import checkpoint as ckpt_io
from utils.training import distributed
from utils.training.batches import (
    IGNORE_INDEX,
    TensorBatches,
    as_batches,
    check_token_ids,
    forward_loss,
    move_to,
)
from utils.training.objectives import Objective, objective_for
from utils.training.precision import PrecisionPlan, resolve_precision
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
    objective: str | None = None  # what the model was trained to predict; None with a loss_fn


TrainArgs = TrainSettings  # the loop's old name for its settings, kept for code that imports it


def _call(callbacks, hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if callable(fn):
            fn(*args)


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
    if loss_fn is None and not isinstance(task, Objective):
        task = objective_for(model, task, call=f"evaluate({type(model).__name__})")
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
                loss, logits, targets = forward_loss(model, prepared)
                mask = targets != IGNORE_INDEX
                n = int(mask.sum())  # eval is off the hot path: a sync per batch is fine
                correct += ((logits.argmax(-1) == targets) & mask).sum()
                n_tok += n
                is_lm = logits.dim() == 3
        loss_sum += loss.double() * n
        n_loss += n
    model.train(was_training)
    val_loss = float(loss_sum) / max(n_loss, 1)
    return {
        "val_loss": val_loss,
        "val_accuracy": float(correct) / n_tok if n_tok else None,
        "val_perplexity": math.exp(min(val_loss, 700.0)) if is_lm else None,
    }


class Trainer:
    """The loop's state. Callbacks receive it as ``trainer`` and may read ``model``, ``optimizer``,
    ``scheduler``, ``scaler``, ``precision`` (the plan), ``global_step``, ``current_epoch``,
    ``skipped_steps`` and ``run_dir``; ``net`` is what runs forward (the model, or its DDP wrapper
    under torchrun) and ``world`` the processes of the run."""

    def __init__(self, model, plan, optimizer, scheduler, scaler, batches, val_batches, args: TrainArgs,
                 loss_fn, callbacks, run_dir, world: distributed.World | None = None,
                 objective: Objective | None = None):
        self.model, self.precision, self.optimizer = model, plan, optimizer
        self.world = world or distributed.World()
        self.net = model  # World.fit swaps in the DDP wrapper for the run
        self.scheduler, self.scaler, self.args = scheduler, scaler, args
        self.batches, self.val_batches, self.loss_fn = batches, val_batches, loss_fn
        self.objective = objective if objective is not None or loss_fn is not None else objective_for(model)
        self.callbacks = list(callbacks) if self.world.is_rank_zero else []  # rank 0 alone logs
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.global_step = self.current_epoch = self.batch_in_epoch = self.skipped_steps = 0
        self.history: list[dict] = []
        self.epoch_records: list[dict] = []
        self.best_val_loss: float | None = None
        self.checkpoint_path: str | None = None
        self._epoch_rng = None  # RNG state at the start of this epoch, to replay a DataLoader's shuffle
        self._resume_rng = None
        self._checked_ids = False
        self._scale = scaler.get_scale() if scaler.is_enabled() else None
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=plan.device)
        self._reset_window()
        self._metrics_file = None

    # ---- one optimizer step ------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._win_loss = torch.zeros((), device=self.precision.device)
        self._win_steps, self._win_count, self._win_t0 = 0, 0, time.perf_counter()

    def _backward(self, batch) -> torch.Tensor:
        batch = move_to(batch, self.precision.device)
        with self.precision.autocast():
            if self.loss_fn is not None:
                loss = self.loss_fn(self.net, batch)
                count = batch.shape[0] if isinstance(batch, torch.Tensor) else 1
            else:
                prepared = self.objective.prepare(batch)
                if not self._checked_ids:
                    check_token_ids(self.model, prepared, "train_data")
                    self._checked_ids = True
                loss, _, _ = forward_loss(self.net, prepared)
                count = prepared.count
        self._win_count += count
        loss = loss / self.args.grad_accum_steps
        self.scaler.scale(loss).backward()
        return loss.detach()

    def _optimizer_step(self, step_loss: torch.Tensor) -> None:
        self.scaler.unscale_(self.optimizer)
        self._grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self._skipped = False
        if self._scale is not None:
            # A skipped step (inf/NaN grads) shows as the scale backing off across update(); this
            # holds for fused optimizers too. One host sync per fp16 step (scaler.step syncs anyway).
            new_scale = self.scaler.get_scale()
            self._skipped = new_scale < self._scale
            self._scale = new_scale
            self.skipped_steps += self._skipped
        else:  # no scaler to absorb a non-finite loss: remember the first bad step, on the device
            bad = ~torch.isfinite(step_loss) & (self._bad_step < 0)
            self._bad_step = torch.where(bad, self.global_step, self._bad_step)
        if not self._skipped:
            self.scheduler.step()
        self._win_loss += step_loss
        self._win_steps += 1
        self._epoch_loss += step_loss
        self._epoch_steps += 1

    # ---- logging -----------------------------------------------------------------------------
    def _check_finite(self) -> None:
        bad = int(self._bad_step)
        if bad >= 0:
            raise FloatingPointError(
                f"The loss became non-finite at step {bad} in {self.precision.name}. Likely causes: a "
                f"learning rate too high (lr={self.args.lr}), no gradient clipping, or activations that "
                f"overflow; try a lower lr or max_grad_norm=1.0. The last good checkpoint was kept: "
                f"{self.checkpoint_path}."
            )

    def _write(self, record: dict) -> None:
        if self._metrics_file is not None:
            # Strict JSON (jq, pandas): a non-finite number is written as null.
            self._metrics_file.write(json.dumps(json_safe(record)) + "\n")
            self._metrics_file.flush()

    def _log_step(self) -> None:
        self._bad_step = self.world.max(self._bad_step)  # so every rank stops, not only the one that saw it
        self._check_finite()
        self._win_loss, self._win_count = self.world.mean(self._win_loss), self.world.sum(self._win_count)
        elapsed = max(time.perf_counter() - self._win_t0, 1e-9)
        metrics = {
            "type": "step", "step": self.global_step, "epoch": self.current_epoch,
            "loss": float(self._win_loss) / self._win_steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(self._grad_norm),
            "loss_scale": self._scale,
            "skipped": bool(self._skipped),
            "skipped_steps": self.skipped_steps,
            "tokens_per_s": self._win_count / elapsed,
        }
        self.history.append(metrics)
        self._write(metrics)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        self._tokens_done += self._win_count
        self._reset_window()
        _call(self.callbacks, "on_step_end", self, metrics)

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
            self._eval_s += time.perf_counter() - t_eval
            self._win_t0 = time.perf_counter()  # throughput counts training time only
            record.update(val)
            _call(self.callbacks, "on_validation_end", self, val)
        self.epoch_records.append(record)
        self._write(record)
        _call(self.callbacks, "on_train_epoch_end", self, self.model)  # current_epoch: the one that ended
        if complete:
            self.current_epoch += 1
            self.batch_in_epoch = 0
        is_best = record.get("val_loss") is not None and (
            self.best_val_loss is None or record["val_loss"] < self.best_val_loss)
        if is_best:
            self.best_val_loss = record["val_loss"]
        self.save_checkpoint(best=is_best)

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": ckpt_io.FORMAT, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": ckpt_io.rng_state(), "epoch_rng": self._epoch_rng,
            "position": {"epoch": self.current_epoch, "batch": self.batch_in_epoch},  # global batches
            "world_size": self.world.world_size,
            "global_step": self.global_step, "skipped_steps": self.skipped_steps,
            "precision": self.precision.name, "best_val_loss": self.best_val_loss,
            "args": {k: v for k, v in vars(self.args).items() if k != "progress"},
            "history": self.history, "epochs": self.epoch_records,
        }

    def save_checkpoint(self, best: bool = False) -> None:
        if self.run_dir is None:
            return
        self._check_finite()  # never overwrite a good checkpoint with a diverged model
        if not self.world.is_rank_zero:  # rank 0 writes; the others only note where
            self.checkpoint_path = str(self.run_dir / "checkpoints" / ckpt_io.LATEST)
            return
        state = self.state()
        folder = self.run_dir / "checkpoints"
        self.checkpoint_path = str(ckpt_io.save_atomic(state, folder / ckpt_io.LATEST))
        if best:
            ckpt_io.save_atomic(state, folder / ckpt_io.BEST)

    def restore(self, resume_from) -> None:
        path, state = ckpt_io.load_checkpoint(resume_from)
        saved = state.get("args", {})
        self.world.check_resume(path, state, self.args.batch_size, isinstance(self.batches, TensorBatches))
        for name in ("grad_accum_steps", "seed"):  # batch_size: check_resume compares global batches
            if name in saved and saved[name] != getattr(self.args, name):
                raise ValueError(
                    f"Checkpoint {str(path)!r} was trained with {name}={saved[name]!r}, but this call has "
                    f"{name}={getattr(self.args, name)!r}; the data position would not match. Pass {name}={saved[name]!r}."
                )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"Checkpoint {str(path)!r} does not fit this model: {e}") from e
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"Checkpoint {str(path)!r} has optimizer state that does not fit: {e}") from e
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
            self._scale = self.scaler.get_scale()
        self.global_step, self.skipped_steps = state["global_step"], state.get("skipped_steps", 0)
        self.current_epoch, self.batch_in_epoch = state["position"]["epoch"], state["position"]["batch"]
        self.best_val_loss = state.get("best_val_loss")
        self.history, self.epoch_records = list(state.get("history", [])), list(state.get("epochs", []))
        self._epoch_rng, self._resume_rng = state.get("epoch_rng"), state["rng"]
        self.checkpoint_path = str(path)

    # ---- the loop ----------------------------------------------------------------------------
    def _epoch_iter(self):
        """This epoch's batches from the saved position; RNG replayed so a DataLoader reshuffles the same."""
        start, resume = self.batch_in_epoch, self._resume_rng
        self._resume_rng = None
        if isinstance(self.batches, TensorBatches):  # its order depends on (seed, epoch) alone
            if resume is not None:
                ckpt_io.set_rng_state(resume)
            return self.batches.epoch(self.current_epoch, start)
        distributed.set_sampler_epoch(self.batches, self.current_epoch)
        if resume is not None and start > 0 and self._epoch_rng is not None:
            ckpt_io.set_rng_state(self._epoch_rng)
            it = iter(self.batches)
            for _ in range(start):  # a sampler draws its seed at the first next(): replay, don't jump
                next(it)
            ckpt_io.set_rng_state(resume)
            return it
        if resume is not None:
            ckpt_io.set_rng_state(resume)
        self._epoch_rng = ckpt_io.rng_state()
        return iter(self.batches)

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

    def _finish_step(self, step_loss: torch.Tensor, micro_batches: int) -> None:
        self._optimizer_step(step_loss)
        self.batch_in_epoch += micro_batches
        if self._bar is not None:
            self._bar.update(1)
        if self.global_step % self.args.log_every == 0 or self._done():
            self._log_step()
        every = self.args.checkpoint_every
        if every and self.global_step % every == 0:
            self.save_checkpoint()

    def _total_steps(self) -> int | None:
        if self.args.max_steps is not None:
            return self.args.max_steps
        try:
            return self.args.epochs * math.ceil(len(self.batches) / self.args.grad_accum_steps)
        except TypeError:
            return None

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        t0, self._tokens_done, self._eval_s, interrupted = time.perf_counter(), 0, 0.0, False
        self._bar = tqdm(total=self._total_steps(), initial=self.global_step,
                         disable=not (self.args.progress and self.world.is_rank_zero),
                         desc=f"train [{self.precision.name}]", unit="step")
        if self.run_dir is not None and self.world.is_rank_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        try:
            _call(self.callbacks, "on_train_start", self)
            self.model.train()
            self._reset_window()
            while not self._done():
                complete = self._run_epoch()
                if complete or self._done():
                    self._end_epoch(complete)
            if self._win_steps:
                self._log_step()
        except KeyboardInterrupt:
            interrupted = True
            self.optimizer.zero_grad(set_to_none=True)
            self.save_checkpoint()
        finally:
            self._bar.close()
            if self._metrics_file is not None:
                self._metrics_file.close()
        if not interrupted and self.run_dir is not None and self.checkpoint_path is None:
            self.save_checkpoint()
        wall = time.perf_counter() - t0
        result = TrainResult(
            history=self.history, epochs=self.epoch_records,
            final_loss=self.history[-1]["loss"] if self.history else None,
            skipped_steps=self.skipped_steps, final_loss_scale=self._scale, precision=self.precision,
            wall_time_s=wall, tokens_per_second=self._tokens_done / max(wall - self._eval_s, 1e-9),
            interrupted=interrupted, checkpoint_path=self.checkpoint_path, global_step=self.global_step,
            best_val_loss=self.best_val_loss,
            objective=self.objective.describe() if self.objective is not None else None,
        )
        _call(self.callbacks, "on_train_end", self, result)
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
          log_every=TrainSettings.log_every, progress=TrainSettings.progress, task=TrainSettings.task,
          mask_token_id=None) -> TrainResult:
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
        run_dir: folder for ``metrics.jsonl`` and ``checkpoints/{latest,best}.pt``.
        checkpoint_every: also checkpoint every N steps (epoch ends and the run end always do).
        resume_from: a checkpoint file or a run folder; continues that run exactly.
        task: what the model predicts, which sets the objective on token ids (default None:
            detected, see :func:`utils.tasks.detect_task`): ``"causal-lm"`` the next token;
            ``"masked-lm"`` 15% of positions hidden, loss on those only; ``"seq2seq"`` the window
            rebuilt from a corrupted copy through ``labels``; ``"classifier"`` needs
            ``(inputs, labels)`` batches. Ignored with ``loss_fn``. ``result.objective`` says which ran.
        mask_token_id: the id that hides a token (default: ``config.mask_token_id``, else 255,
            which the byte tokenizer never emits).

    Raises:
        ValueError: bad arguments, empty data, token ids outside the vocabulary, targets that do
            not fit the logits, a model with nothing to train, or a checkpoint that does not fit;
            ``task="causal-lm"`` for a model that sees later tokens; unlabelled token ids for a
            classifier or a model that takes none.
        FloatingPointError: a non-finite loss with no GradScaler to absorb it (fp32, bf16).

    .. note::
        Metrics are read from the device every ``log_every`` steps only; ``16-mixed`` reads the
        loss scale once per step (one host sync) to count skipped steps. KeyboardInterrupt ends
        the run cleanly with a checkpoint and ``interrupted=True``.

    .. note::
        Under ``torchrun`` each process runs this call: the model is wrapped in
        ``DistributedDataParallel``, ``batch_size`` is per process (a tensor ``train_data`` is
        sharded so a step's ``batch_size × world_size`` samples are those one process would draw),
        metrics are averaged over ranks, and rank 0 alone logs, runs ``callbacks`` and writes
        ``run_dir``. A checkpoint resumes on any number of processes with the same global batch.
        See :mod:`utils.training.distributed`.
    """
    args = TrainSettings(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, grad_accum_steps=grad_accum_steps, max_grad_norm=max_grad_norm,
                         warmup_steps=warmup_steps, checkpoint_every=checkpoint_every, seed=seed,
                         log_every=log_every, progress=progress, task=task)
    args.check()
    world = distributed.World.detect()  # torchrun's ranks; rank 0 of 1 in a plain process
    device = world.default_device(device)
    plan = precision if isinstance(precision, PrecisionPlan) else resolve_precision(precision, device)
    model = _place(model, plan)
    objective = None if loss_fn is not None else objective_for(
        model, task, mask_token_id=mask_token_id, call=f"train({type(model).__name__})")
    batches = world.shard(as_batches(train_data, batch_size, seed, "train_data"))
    val_batches = None if val_data is None else as_batches(val_data, batch_size, seed, "val_data", shuffle=False)
    optimizer = optimizer or default_optimizer(model, lr, weight_decay, plan.device_type)
    warm = max(warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    trainer = Trainer(model, plan, optimizer, scheduler, plan.make_scaler(), batches, val_batches, args,
                      loss_fn, callbacks, run_dir, world, objective)
    if resume_from is not None:
        trainer.restore(resume_from)
    else:
        torch.manual_seed(seed)
        random.seed(seed)
    return world.fit(trainer)
