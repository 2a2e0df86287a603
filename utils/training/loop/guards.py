"""Checks of every training step that cost no host sync: kept on the device, read at log steps.

- a non-finite loss or gradient norm where no GradScaler absorbs it (32-true, bf16, "-true");
- token ids outside the model's vocabulary (checked on the host when the batch is on the CPU, as
  loaded data usually is; tracked on the device otherwise);
- a batch with no target to learn from (every target ``IGNORE_INDEX``);
- a run that makes no progress: under a GradScaler, every step skipped until the scale is under a floor;
- before a save: weights and optimizer state that are not all finite (one host sync).

Example::

    >>> checks = StepChecks(model, plan)                       # doctest: +SKIP
    >>> checks.observe_ids(batch_ids, step=0)                  # each micro-batch  # doctest: +SKIP
    >>> checks.verify(global_step)                             # at log steps      # doctest: +SKIP
"""

from __future__ import annotations

import torch

from utils.models.profile import ModelProfile
from utils.models.sizes import find_input_embedding
from utils.models.tasks import IGNORE_INDEX
from utils.training.batches import check_id_dtype
from utils.training.runs.sharded_checkpoint import local_tensors

# fp16's smallest subnormal: a loss scale below it cannot bring any gradient back into range.
SCALE_FLOOR = 2.0 ** -24
NO_PROGRESS_STEPS = 50  # consecutive skipped steps that end a run whatever the scale


class StepChecks:
    """What a run checks each step, kept on the device (``plan.device``) until :meth:`verify`.

    .. note:: :meth:`verify` reads three scalars from the device: call it where the loop syncs
        anyway (the log step, the end of an epoch).
    """

    def __init__(self, model, plan, argument: str = "train_data", profile: ModelProfile | None = None):
        emb = profile.embedding if profile is not None else find_input_embedding(model)  # the look's, when given
        self.vocab = emb.num_embeddings if emb is not None else None
        self.argument, self.precision = argument, plan.name
        device = plan.device
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step
        self.empty_step = torch.full((), -1, dtype=torch.int64, device=device)  # first with no target
        self.ids = torch.tensor([0, -1], dtype=torch.int64, device=device)  # (min, max) of device ids
        self.consecutive_skipped = 0

    # ---- each micro-batch / step: no host sync -------------------------------------------------
    def observe_ids(self, ids: torch.Tensor | None, step: int) -> None:
        if ids is None or self.vocab is None or ids.numel() == 0:
            return
        check_id_dtype(ids, self.argument)
        if ids.device.type == "cpu":  # a host reduction, no device sync: fail before the embedding does
            self._check_range(int(ids.min()), int(ids.max()), f"in the batch of step {step + 1}")
            return
        lo_hi = torch.stack([ids.min(), ids.max()]).long()
        self.ids = torch.stack([torch.minimum(self.ids[0], lo_hi[0]), torch.maximum(self.ids[1], lo_hi[1])])

    def observe_targets(self, targets: torch.Tensor | None, step: int) -> None:
        if targets is None or targets.is_floating_point():
            return
        empty = ~(targets != IGNORE_INDEX).any() & (self.empty_step < 0)
        self.empty_step = torch.where(empty, step + 1, self.empty_step)

    def observe_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """A step with no scaler: remember the first whose loss or gradient norm is not finite."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self.bad_step < 0)
        self.bad_step = torch.where(bad, step, self.bad_step)

    def observe_skip(self, skipped: bool, scale: float, step: int) -> None:
        """A step under a GradScaler (the scale is on the host already)."""
        self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0
        if skipped and (scale < SCALE_FLOOR or self.consecutive_skipped >= NO_PROGRESS_STEPS):
            raise FloatingPointError(
                f"No progress: the last {self.consecutive_skipped} steps (to step {step}) were all skipped "
                f"for inf/NaN gradients in {self.precision}, and the loss scale fell to {scale:g}. fp16 cannot "
                f"hold these gradients: try precision='bf16-mixed' or '32-true', a lower lr, or check the data."
            )

    # ---- at a log step -------------------------------------------------------------------------
    def verify(self, world, last_good: str, lr: float) -> None:
        """Raise for what the steps since the last check saw (every rank raises the same; with
        ``world=None`` this process's view only, with no collective: used before a save).

        Raises:
            ValueError: token ids outside the vocabulary, or a batch with no target.
            FloatingPointError: a non-finite step with no GradScaler.
        """
        found = torch.stack([self.bad_step, self.empty_step, self.ids[1], -self.ids[0]])
        bad, empty, hi, lo = (int(v) for v in (world.max(found) if world is not None else found).tolist())
        if hi >= 0:
            self._check_range(-lo, hi, "in the steps before this log step")
        if empty >= 0:
            raise ValueError(
                f"{self.argument} gave a batch with no target to learn from at step {empty}: every target is "
                f"IGNORE_INDEX ({IGNORE_INDEX}). Drop such batches, or check how labels are masked."
            )
        if bad >= 0:
            raise FloatingPointError(
                f"The loss became non-finite at step {bad} in {self.precision}. Likely causes: a learning rate "
                f"too high (lr={lr}), no gradient clipping, or activations that overflow; try a lower lr or "
                f"max_grad_norm=1.0. {last_good}"
            )

    # ---- before a checkpoint is written --------------------------------------------------------
    def before_save(self, model, optimizer, world, step: int, last_good: str, lr: float) -> None:
        """A bad step not logged yet (this process's view), then every weight and optimizer value
        finite (under FSDP each rank checks its shards and all agree): else nothing may be saved.

        Raises:
            ValueError: a bad batch not logged yet.
            FloatingPointError: a non-finite step not logged yet, or non-finite weights or optimizer state.
        """
        self.verify(None, last_good, lr)
        optimizer_values = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        ok = all_finite(local_tensors([*model.parameters(), *optimizer_values]))
        if world.strategy == "fsdp" and world.is_distributed:
            ok = not bool(world.max(torch.tensor(float(not ok), device=self.bad_step.device)))
        if not ok:
            raise FloatingPointError(
                f"The weights or optimizer state are not finite at step {step} in {self.precision}: not saved. "
                f"{last_good} Likely causes: a learning rate too high (lr={lr}) or activations that overflow; "
                f"try a lower lr or max_grad_norm=1.0."
            )

    def _check_range(self, low: int, high: int, where: str) -> None:
        if low < 0 or high >= self.vocab:
            bad = high if high >= self.vocab else low
            raise ValueError(
                f"{self.argument} holds token id {bad}, outside the model's vocabulary: its input embedding "
                f"has {self.vocab} rows (ids 0..{self.vocab - 1}). Check the tokenizer's vocab_size. Found {where}."
            )


def all_finite(tensors) -> bool:
    """True when every float tensor is finite: one max-abs per device group, then ONE host sync.

    .. note:: Called before each save only; the steps themselves never sync for it.
    """
    groups: dict = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    flags = []
    for ts in groups.values():
        norms = torch._foreach_norm(ts, float("inf"))  # max |x|: NaN or inf propagates, no overflow
        flags.append(torch.isfinite(torch.stack(norms)).all().cpu())
    return bool(torch.stack(flags).all()) if flags else True
