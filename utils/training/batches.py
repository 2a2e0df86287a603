"""Turning what users pass as data into batches, and batches into a loss.

A batch is a LongTensor (B, T) of token ids (the model sees ``[:, :-1]`` and predicts ``[:, 1:]``),
an ``(inputs, targets)`` pair, or a Hugging Face style dict with ``input_ids`` and optional
``labels`` / ``attention_mask``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils.models.calls import (
    TARGETS,
    get_logits,
    get_loss,
    is_loss_output,
    model_call,
)
from utils.models.profile import ModelProfile
from utils.models.sizes import find_input_embedding
from utils.models.tasks import IGNORE_INDEX


@dataclass
class Prepared:
    """One batch, split into what the model is called with and what it should predict."""

    args: tuple
    kwargs: dict
    targets: torch.Tensor | None  # None: the model computes its own loss from kwargs["labels"]
    input_ids: torch.Tensor | None
    count: int  # tokens (2-D ids) or samples in the batch, for throughput
    profile: ModelProfile | None = None  # the objective's look at the model: how to call it, its embedding


def move_to(batch, device: torch.device):
    """Move a batch (tensor, tuple/list or dict of tensors) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def count_tokens(ids: torch.Tensor) -> int:
    """What a batch counts for throughput: its tokens for 2-D token ids, else its samples."""
    return ids.numel() if ids.dim() >= 2 and not ids.is_floating_point() else ids.shape[0]


def prepare_batch(batch) -> Prepared:
    """Split a batch into model inputs and targets.

    Raises:
        TypeError: the batch is none of the accepted forms.
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() != 2 or batch.shape[1] < 2:
            raise TypeError(f"A tensor batch must be token ids of shape (B, T) with T >= 2, got {tuple(batch.shape)}.")
        inputs = batch[:, :-1]
        return Prepared((inputs,), {}, batch[:, 1:], inputs, count_tokens(inputs))
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise TypeError(f"A dict batch needs 'input_ids'; got keys {sorted(batch)}.")
        ids = batch["input_ids"]
        return Prepared((), dict(batch), None, ids, count_tokens(ids))
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        ids = inputs if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() else None
        return Prepared((inputs,), {}, targets, ids, count_tokens(inputs))
    raise TypeError(
        f"Cannot use a batch of type {type(batch).__name__}: pass a LongTensor (B, T) of token ids, "
        f"an (inputs, targets) pair, or a dict with 'input_ids'."
    )


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, shift: bool = False) -> torch.Tensor:
    """Cross-entropy over logits cast to float32, ``ignore_index=IGNORE_INDEX`` (-100).

    Args:
        logits: (B, T, V) for language models or (B, C) for classifiers.
        targets: (B, T) or (B,).
        shift: predict ``targets[:, 1:]`` from ``logits[:, :-1]`` (Hugging Face ``labels`` convention).

    Raises:
        ValueError: the targets' shape does not fit the logits.
    """
    if shift:
        logits, targets = logits[:, :-1], targets[:, 1:]
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not fit logits of shape {tuple(logits.shape)}: "
            f"expected targets of shape {tuple(logits.shape[:-1])}."
        )
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def run_model(model: nn.Module, prepared: Prepared):
    """Call the model on one prepared batch the way it takes it (see :func:`utils.models.calls.model_call`):
    a ``forward(idx, targets=None)`` model gets the targets too. Returns the raw output.

    Raises:
        ValueError: a dict batch for a model whose forward takes token ids and targets.
        OwnLossError: (a ``ValueError``) the call with targets/labels raised, the forward without
            them runs: the model's own loss failed; the message names it and the way around it.
    """
    call = prepared.profile.call if prepared.profile is not None else model_call(model)
    if call.convention == TARGETS and prepared.kwargs:
        raise ValueError(
            f"{call.owner}{call.signature} takes token ids and {call.target_arg}, not a dict batch with "
            f"{', '.join(map(repr, sorted(prepared.kwargs)))}: pass token ids (B, T) or (inputs, targets) pairs."
        )
    try:
        return call.run(model, prepared.args, prepared.kwargs, prepared.targets)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # re-raised: as the model's own loss failing when the forward alone runs
        passed = call.target_arg if call.convention == TARGETS and prepared.targets is not None else (
            "labels" if "labels" in prepared.kwargs else None)
        if passed is None or not _runs_without_targets(model, prepared):
            raise
        raise OwnLossError(
            f"{type(model).__name__}'s own loss raised {type(e).__name__}: {str(e) or 'no message'}. "
            f"{call.owner} runs without {passed}=, so the failure is in the loss the model computes itself "
            f"(inside its library), not in the batch. Pass loss_fn=suite_loss_fn(model) (from "
            f"utils.training) to train, evaluate or benchmark_amp to use the suite's cross-entropy on its "
            f"logits instead; the command line has no such option."
        ) from e


class OwnLossError(ValueError):
    """A model's own loss raised inside its library while its forward alone runs (see :func:`run_model`)."""


def _runs_without_targets(model: nn.Module, prepared: Prepared) -> bool:
    """Whether the forward runs when the targets/labels are left out (one call, no gradients)."""
    kwargs = {k: v for k, v in prepared.kwargs.items() if k != "labels"}
    try:
        with torch.no_grad():
            model(*prepared.args, **kwargs)
    except Exception:  # noqa: BLE001  the forward fails too: the caller re-raises the first error
        return False
    return True


def forward_loss(model: nn.Module, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the model; return (loss, logits, targets-aligned-with-logits).

    A loss the model returns itself (``output.loss``, or the ``(logits, loss)`` of a
    ``forward(idx, targets=None)`` model) is used as is. A model that returns only a loss
    (``loss = model(seq)``) gives ``(loss, None, None)``.

    Raises:
        ValueError: the logits do not fit the targets; a model that returned one position of many
            gets a message naming its convention and the way through.
    """
    output = run_model(model, prepared)
    if is_loss_output(output):  # ``loss = model(seq)``: no logits to align or score
        return (output if isinstance(output, torch.Tensor) else get_loss(output)), None, None
    logits = get_logits(output)
    targets = prepared.targets
    shift = False
    if targets is None:  # dict batch: labels (or input_ids) shifted inside, as Hugging Face does
        targets = prepared.kwargs.get("labels", prepared.input_ids)
        shift = logits.dim() == 3
    call = prepared.profile.call if prepared.profile is not None else model_call(model)
    if targets.dim() == 2 and (error := call.short_logits_error(logits, targets.shape[1])):
        raise error
    loss = call.loss(output)
    if loss is None:
        loss = cross_entropy(logits, targets, shift=shift)
    if shift:
        logits, targets = logits[:, :-1], targets[:, 1:]
    return loss, logits, targets


ID_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding takes


def check_id_dtype(ids: torch.Tensor, argument: str) -> None:
    """Token ids are integers an embedding takes: float, bool, int16 or uint8 ids are an error."""
    if ids.dtype not in ID_DTYPES:
        raise ValueError(
            f"{argument} holds token ids of dtype {ids.dtype}: token ids must be torch.int64 (long) or "
            f"torch.int32. Convert them with .long()."
        )


def check_token_ids(model: nn.Module, prepared: Prepared, argument: str) -> None:
    """Fail clearly when token ids have a dtype an embedding does not take, or fall outside the
    model's input embedding.

    .. note:: Reads the batch on the host: used for validation batches (evaluation syncs anyway);
        training steps use :class:`utils.training.loop.guards.StepChecks`, which does not sync.
    """
    emb = prepared.profile.embedding if prepared.profile is not None else find_input_embedding(model)
    ids = prepared.input_ids
    if emb is None or ids is None or ids.numel() == 0:
        return
    check_id_dtype(ids, argument)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= emb.num_embeddings:
        bad = high if high >= emb.num_embeddings else low
        raise ValueError(
            f"{argument} holds token id {bad}, outside the model's vocabulary: its input embedding has "
            f"{emb.num_embeddings} rows (ids 0..{emb.num_embeddings - 1}). Check the tokenizer's vocab_size."
        )


class TensorBatches:
    """Shuffled mini-batches of a (N, T) tensor, one permutation per epoch drawn from ``seed``.

    The permutation depends only on (seed, epoch), so a resumed run sees the same batches. With
    ``labels`` (N,), each batch is the pair ``(inputs (B, T), labels (B,))``.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True, labels: torch.Tensor | None = None):
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.labels = labels
        n = data.shape[0]
        self.n_batches = n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)

    def __len__(self) -> int:
        return self.n_batches

    def epoch(self, epoch: int, start: int = 0) -> Iterator:
        n = self.data.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        for i in range(start, self.n_batches):
            rows = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.data[rows] if self.labels is None else (self.data[rows], self.labels[rows])


def _labelled_pair(data) -> bool:
    """A tuple ``(inputs (N, ...), labels (N,))`` of tensors, as ``make_topic_dataset`` returns."""
    return (isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
            and data[1].dim() == 1 and data[0].dim() >= 1 and data[0].shape[0] == data[1].shape[0])


def as_batches(data, batch_size: int, seed: int, argument: str, shuffle: bool = True):
    """``TensorBatches`` for a tensor or an ``(inputs, labels)`` tuple of tensors with one label per
    row; the re-iterable itself otherwise; empty data is an error."""
    if isinstance(data, TensorBatches):
        return data
    if _labelled_pair(data):
        if data[0].shape[0] == 0:
            raise ValueError(f"{argument} is empty: inputs of shape {tuple(data[0].shape)}.")
        return TensorBatches(data[0], batch_size, seed, shuffle=shuffle, drop_last=shuffle, labels=data[1])
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] < 2:
            raise ValueError(
                f"{argument} is a tensor of shape {tuple(data.shape)}: expected token ids of shape (N, T) "
                f"with N >= 1 and T >= 2."
            )
        return TensorBatches(data, batch_size, seed, shuffle=shuffle, drop_last=shuffle)
    if data is None or not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise ValueError(f"{argument}={data!r} is not data: pass a LongTensor (N, T), a DataLoader or an iterable of batches.")
    if iter(data) is data:
        raise ValueError(f"{argument} is a one-shot iterator; pass something re-iterable (a list or a DataLoader).")
    try:
        empty = len(data) == 0
    except TypeError:
        empty = next(iter(data), None) is None
    if empty:
        raise ValueError(f"{argument} is empty: it yields no batches.")
    return data
