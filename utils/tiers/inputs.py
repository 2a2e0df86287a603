"""What every check of both tiers shares: the model's task, how its logits are read, the lengths tried.

Example::

    >>> seq_grid(64)
    [1, 2, 16, 32, 64]
"""

from __future__ import annotations

import torch
from torch import nn

from utils.models.calls import ModelCall
from utils.models.profile import ModelProfile, look_at
from utils.models.sizes import InputSpec
from utils.models.tasks import TaskInfo, task_logits

DEFAULT_BATCH_SIZES = (1, 2, 4)
MAX_NAMED = 20  # names listed in a summary or a details list before it is cut
SHORT_LEN = 64  # the length of the "short" inputs a reduced Tier 1 uses besides the full context


def seq_grid(max_seq_len: int) -> list[int]:
    """1, 2, a quarter, a half and all of the context: the edges and the middle."""
    return sorted({n for n in (1, 2, max_seq_len // 4, max_seq_len // 2, max_seq_len) if n >= 1})


def checked_inputs(model: nn.Module, profile: ModelProfile | None, task, vocab_size, max_seq_len,
                   call: str) -> tuple[InputSpec, TaskInfo, ModelCall]:
    """What a check feeds the model, its task and how to call it: from the tier's look at it
    (``profile``, built with ``vocab_size`` and ``max_seq_len``) when given, else from one look here;
    a ``TaskInfo`` from ``run_tier1``/``run_tier2`` is used as is.

    Raises:
        ValueError: the model takes no token ids (the message names ``call``), or a bad size or task.
    """
    if profile is None:
        stated = None if isinstance(task, TaskInfo) else task
        profile = look_at(model, stated, vocab_size=vocab_size, max_seq_len=max_seq_len, call=call)
    spec = profile.spec(call=call)
    return spec, task if isinstance(task, TaskInfo) else profile.task, profile.call


def analyzed_length(spec, seq_len: int | None) -> int:
    """The length Tier 2 analyses: ``seq_len`` (default 32), at most the model's context."""
    return min(seq_len or 32, spec.max_seq_len)


def float_logits(model: nn.Module, ids: torch.Tensor, info: TaskInfo | None = None,
                 calling: ModelCall | None = None) -> torch.Tensor:
    """Per-position logits as float32, detached: what Tier 2 compares."""
    return task_logits(model, ids, info, calling).detach().float()


def causality_words(causal: bool | None, info: TaskInfo) -> str:
    """Causality in words: a property for models that may see the future, a finding for a causal LM."""
    if causal is None:
        return ""
    if causal:
        return "causal"
    if info.sees_future:
        return f"bidirectional, as a {info.task} model may be"
    return "not causal"
