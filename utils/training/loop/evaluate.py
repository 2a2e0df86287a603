"""Scoring a model on validation data: the mean loss, and accuracy and perplexity where they apply.

Example::

    >>> evaluate(model, val_ids, resolve_precision("32-true"))["val_loss"]   # doctest: +SKIP
    2.31
"""

from __future__ import annotations

import math

import torch
from torch import nn

from utils.models.calls import find_logits_network, returns_loss
from utils.training.amp.precision import PrecisionPlan
from utils.training.batches import (
    IGNORE_INDEX,
    TensorBatches,
    as_batches,
    check_token_ids,
    forward_loss,
    move_to,
)
from utils.training.objectives import Objective, objective_for


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
