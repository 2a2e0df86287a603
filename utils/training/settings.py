"""Every training default, defined once: ``train()``, the CLI, the notebooks and ``make demo`` read them.

Example::

    >>> TrainSettings.batch_size                       # what train(), the CLI and the notebooks default to
    16
    >>> settings = TrainSettings(batch_size=32, max_steps=200)
    >>> settings.check()                               # raises a ValueError naming a bad value
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields, replace
from typing import ClassVar

from utils.common.checks import check_choice, check_int, check_number
from utils.models.tasks import TASKS  # the list of tasks lives with their detection

STRATEGIES = ("ddp", "fsdp")  # how several processes share the model (utils.training.parallel.distributed runs them)


def check_strategy_name(strategy, call: str = "train") -> None:
    """``strategy`` is one of :data:`STRATEGIES`, else a ValueError naming the value and what is allowed."""
    check_choice("strategy", strategy, STRATEGIES, call=call, message="{call}({name}={value!r}) is not allowed: use {rule}.")


@dataclass
class TrainSettings:
    """A training run's settings, with their defaults.

    ``train(model, data, settings=TrainSettings(...), **overrides)`` trains with them (each override
    a field name, applied on top; see :func:`settings_with`); ``python -m utils.training train``
    derives its option defaults from them and hands ``train()`` one of these; the notebooks' settings cell and ``make demo``
    start from them (a test keeps the notebooks' literal values equal).

    Args:
        epochs: full passes over the training data (default 1); ignored when ``max_steps`` is set.
        max_steps: optimizer steps for the whole run (default None: ``epochs`` decides).
        batch_size: samples per step per process (default 16: a 2-core CPU trains gpt-micro at it
            in seconds, and a Colab GPU is not starved by it).
        lr: the peak learning rate (default 3e-4).
        weight_decay: AdamW's, on matrices only (default 0.01).
        grad_accum_steps: micro-batches per optimizer step (default 1).
        max_grad_norm: clip the unscaled gradient norm; None turns clipping off (default 1.0).
        warmup_steps: linear learning-rate warm-up (default 0).
        checkpoint_every: also checkpoint every N steps (default None: epoch ends and the run end).
        checkpoint_minutes: also checkpoint when this many minutes of wall time passed since the last
            save, checked at log steps (default 10: a Colab disconnect loses at most that, while a
            save costs seconds; None: off).
        seed: weights and shuffling (default 0).
        log_every: read metrics from the device every N steps (default 10).
        progress: show a progress bar (default True).
        overwrite: a fresh run into a folder that holds a run moves the old run aside (default
            False: an error that suggests resuming or a new folder).
        task: what the model predicts, which sets the objective on token ids (default None:
            detected from its config and a probe; see :func:`utils.models.tasks.detect_task`): one of
            ``"causal-lm"``, ``"masked-lm"``, ``"classifier"``, ``"seq2seq"``, ``"non-token"``.
        strategy: how several processes share the model (default ``"ddp"``: a full copy in each,
            gradients all-reduced); ``"fsdp"`` shards weights, gradients and optimizer state over
            them (FSDP2's ``fully_shard``), for a model that does not fit one GPU.

    .. note::
        ``precision`` (default ``"auto"``) is a class attribute, not a field: the run's precision
        is the plan :func:`~utils.training.amp.precision.resolve_precision` returns, recorded on its own.
    """

    precision: ClassVar[str] = "auto"

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    checkpoint_every: int | None = None
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    checkpoint_minutes: float | None = 10.0
    overwrite: bool = False
    task: str | None = None
    strategy: str = "ddp"

    def check(self) -> None:
        """Every bad value is a ``ValueError`` naming the argument and what is allowed."""
        for name, low in (("epochs", 1), ("batch_size", 1), ("grad_accum_steps", 1), ("log_every", 1),
                          ("warmup_steps", 0)):
            check_int(name, getattr(self, name), minimum=low)
        for name in ("max_steps", "checkpoint_every"):
            check_int(name, getattr(self, name), minimum=1, optional=True)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} is not allowed: it must be a number > 0.")
        check_number("checkpoint_minutes", self.checkpoint_minutes, above=0, optional=True,
                     rule="None or a number > 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} is not allowed: it must be None or > 0.")
        check_strategy_name(self.strategy)
        check_choice("task", self.task, (None, *TASKS), rule=f"one of {', '.join(map(repr, TASKS))}, or None to "
                     "detect it", message="{name}={value!r} is not allowed: use {rule}.")


def settings_with(settings: TrainSettings | None, overrides: dict, *, call: str = "train",
                  others: tuple[str, ...] = ()) -> TrainSettings:
    """``settings`` (default ``TrainSettings()``) with ``overrides`` applied on top (``dataclasses.replace``).

    Example::

        >>> settings_with(TrainSettings(batch_size=32), {"max_steps": 200}).batch_size
        32

    Args:
        overrides: field names of :class:`TrainSettings` and their values.
        call: the function the overrides were passed to, for the error.
        others: the call's own keyword arguments, also offered as a "did you mean".

    Raises:
        TypeError: ``settings`` is not a TrainSettings, or an override is not one of its fields; the
            message names it, the closest allowed name, and where the fields are listed.
    """
    if settings is not None and not isinstance(settings, TrainSettings):
        raise TypeError(f"{call}(settings={settings!r}) is not allowed: pass a TrainSettings or None.")
    names = [f.name for f in fields(TrainSettings)]
    for name in overrides:
        if name not in names:
            close = difflib.get_close_matches(name, [*names, *others], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{call}() got an unexpected keyword argument {name!r}.{hint} Its settings are the "
                            f"fields of TrainSettings (utils/training/settings.py): {', '.join(names)}.")
    return replace(settings if settings is not None else TrainSettings(), **overrides)
