"""What a model is trained to predict from a batch: the objective that fits its task.

A causal LM predicts the next token (batches shifted); a masked LM predicts the tokens hidden
in its input (BERT's recipe), with the loss on those positions only; an encoder-decoder rebuilds
a corrupted window through ``labels`` (it makes its own decoder inputs, as Hugging Face seq2seq
models do); a classifier needs labels. One :class:`Objective` per run turns each batch into a
:class:`~utils.training.batches.Prepared` whose targets are aligned with the logits, so nothing
downstream shifts a second time.

Example::

    >>> objective = objective_for(model)                         # doctest: +SKIP
    >>> objective.describe()                                     # doctest: +SKIP
    'masked-lm: 15% of positions hidden (80% -> id 255, 10% random, 10% kept); loss on those only'
    >>> prepared = objective.prepare(batch)                      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from utils.common.checks import NOT_ALLOWED, check_int
from utils.models.calls import get_logits
from utils.models.profile import ModelProfile, look_at
from utils.models.tasks import (
    CAUSAL_LM,
    CLASSIFIER,
    IGNORE_INDEX,
    MASKED_LM,
    NON_TOKEN,
    SEQ2SEQ,
    TaskInfo,
    shift_right,
)
from utils.training.batches import (
    Prepared,
    count_tokens,
    cross_entropy,
    forward_loss,
    prepare_batch,
)

MASK_PROB = 0.15  # BERT's share of positions to predict


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, *, prob: float = MASK_PROB,
                generator: torch.Generator | None = None,
                allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick ``prob`` of the positions; of those 80% become ``mask_id``, 10% a random
    id, 10% stay. Returns ``(inputs, labels)``, labels ``IGNORE_INDEX`` where nothing was picked.

    Example::

        >>> ids = torch.arange(40).view(2, 20)
        >>> inputs, labels = mask_tokens(ids, 255, 256, generator=torch.Generator().manual_seed(0))
        >>> bool(((labels == IGNORE_INDEX) | (labels == ids)).all())
        True

    Args:
        ids: token ids ``(B, T)``.
        prob: share of positions picked (default 0.15); at least one per sequence.
        generator: a CPU generator (default: the global RNG, which checkpoints save).
        allowed: bool ``(B, T)``, positions that may be picked (e.g. an ``attention_mask``).

    .. note::
        The random draws are made on the CPU and moved to ``ids``' device.
    """
    shape = ids.shape
    draw = torch.rand(shape, generator=generator)  # (B, T): pick where below prob
    if allowed is not None:
        draw = draw.masked_fill(~allowed.bool().cpu(), 2.0)
    picked = draw < prob
    picked |= draw == draw.min(dim=1, keepdim=True).values  # never a sequence with nothing to predict
    if allowed is not None:
        picked &= allowed.bool().cpu()
    kind = torch.rand(shape, generator=generator)  # 80% mask, 10% random, 10% kept
    random_ids = torch.randint(0, vocab_size, shape, generator=generator)
    picked, kind, random_ids = (t.to(ids.device) for t in (picked, kind, random_ids))
    inputs = torch.where(picked & (kind < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(picked & (kind >= 0.8) & (kind < 0.9), random_ids, inputs)
    labels = ids.masked_fill(~picked, IGNORE_INDEX)
    return inputs, labels


@dataclass(frozen=True)
class Objective:
    """How to turn a batch into model inputs and aligned targets for one task.

    Attributes:
        info: the model's task (see :func:`utils.models.tasks.detect_task`).
        vocab_size: for the random replacements of masking.
        model_name: the model's class name, for messages.
        mask_prob: share of positions a masked LM predicts (default 0.15).
        own_loss: the model's forward returns its loss (``loss = model(seq)``): token-id windows
            are passed whole, the model shifts them itself (default False).
        profile: the look at the model this objective was found from (default None); it goes with
            every prepared batch, so the step does not look up the calling convention again.
    """

    info: TaskInfo
    vocab_size: int | None
    model_name: str
    mask_prob: float = MASK_PROB
    own_loss: bool = False
    profile: ModelProfile | None = field(default=None, compare=False, repr=False)

    @property
    def task(self) -> str:
        return self.info.task

    def describe(self) -> str:
        """The objective in one line, e.g. for a plan or a run's summary."""
        pct = f"{self.mask_prob:.0%}"
        if self.own_loss:
            return (f"own loss: {self.model_name}.forward returns the loss; windows are passed whole, "
                    f"the model shifts them itself [{self.info.reason}]")
        return {
            CAUSAL_LM: "causal-lm: predict the next token",
            MASKED_LM: f"masked-lm: {pct} of positions hidden (80% -> id {self.info.mask_token_id}, 10% "
                       f"random, 10% kept); loss on those only",
            SEQ2SEQ: f"seq2seq: rebuild the window from a copy with {pct} of positions hidden (id "
                     f"{self.info.mask_token_id}), through labels; the model makes its decoder inputs",
            CLASSIFIER: "classifier: one label per sequence",
            NON_TOKEN: "none: the model takes no token ids",
        }[self.task] + f" [{self.info.reason}]"

    def prepare(self, batch, *, generator: torch.Generator | None = None, argument: str = "train_data") -> Prepared:
        """Split ``batch`` into the model's inputs and targets aligned with its logits, with the
        model's calling convention when the objective has its profile.

        Raises:
            ValueError: the batch cannot train this task (token ids for a classifier or a model
                that takes none), the message naming what to pass instead.
            TypeError: the batch is none of the accepted forms (see ``prepare_batch``).
        """
        prepared = self._split(batch, generator, argument)
        return prepared if self.profile is None else replace(prepared, profile=self.profile)

    def _split(self, batch, generator, argument: str) -> Prepared:
        if self.own_loss and isinstance(batch, torch.Tensor):  # the model shifts its windows itself
            return Prepared((batch,), {}, None, batch, count_tokens(batch))
        if self.task == CAUSAL_LM or (isinstance(batch, (tuple, list)) and self.task != SEQ2SEQ):
            return prepare_batch(batch)  # next token; a user's (inputs, targets) pair is used as is
        if isinstance(batch, torch.Tensor):
            return self._from_ids(batch, generator, argument)
        if isinstance(batch, Mapping):
            return self._from_dict(batch, generator, argument)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:  # seq2seq (inputs, labels)
            return self._from_dict({"input_ids": batch[0], "labels": batch[1]}, generator, argument)
        return prepare_batch(batch)  # raises the TypeError naming the accepted forms

    def _from_ids(self, batch: torch.Tensor, generator, argument: str) -> Prepared:
        if self.task in (CLASSIFIER, NON_TOKEN):
            raise self._needs_labels(argument)
        if batch.dim() != 2 or batch.shape[1] < 2:
            return prepare_batch(batch)  # raises the shape error
        ids = batch[:, :-1].contiguous()  # a window is context + 1 long; the model takes context tokens
        return self._masked(ids, None, generator, {})

    def _from_dict(self, batch: Mapping, generator, argument: str) -> Prepared:
        if "input_ids" not in batch:
            return prepare_batch(batch)  # raises the TypeError naming the keys
        ids, labels = batch["input_ids"], batch.get("labels")
        if labels is not None:  # the user's own labels: aligned with the logits, never shifted
            return Prepared((), dict(batch), labels, ids, count_tokens(ids))
        if self.task in (CLASSIFIER, NON_TOKEN):
            raise self._needs_labels(argument)
        rest = {k: v for k, v in batch.items() if k != "input_ids"}
        return self._masked(ids, batch.get("attention_mask"), generator, rest)

    def _masked(self, ids: torch.Tensor, attention_mask, generator, rest: dict) -> Prepared:
        mask_id = self.info.mask_token_id
        if mask_id is None:
            raise ValueError(
                f"{self.model_name} is trained as {self.task}, which hides tokens, but it has no "
                f"config.mask_token_id and its vocabulary ({self.vocab_size}) does not hold the byte "
                f"tokenizer's reserved id 255. Pass mask_token_id= (an id your tokenizer never emits)."
            )
        inputs, labels = mask_tokens(ids, mask_id, self.vocab_size or mask_id + 1, prob=self.mask_prob,
                                     generator=generator, allowed=attention_mask)
        if self.task == SEQ2SEQ:  # denoise: rebuild every token of the window from the corrupted copy
            labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
            return Prepared((), {**rest, "input_ids": inputs, "labels": labels}, labels, inputs, count_tokens(inputs))
        return Prepared((inputs,), rest, labels, inputs, count_tokens(inputs))

    def _needs_labels(self, argument: str) -> ValueError:
        if self.task == NON_TOKEN:
            return ValueError(
                f"{argument} holds token ids, but {self.model_name} takes no token ids: "
                f"{self.info.expected_input}. Pass your own batches and loss_fn=."
            )
        return ValueError(
            f"{argument} holds unlabelled token ids, but {self.model_name} is a sequence classifier "
            f"({self.info.reason}): it needs labels. Pass (inputs, labels) batches or dicts with "
            f"'labels', e.g. utils.data.make_topic_dataset()."
        )


def objective_for(model: nn.Module, task: str | None = None, *, mask_token_id: int | None = None,
                  call: str | None = None, profile: ModelProfile | None = None) -> Objective:
    """The objective for ``model``'s task (detected, or stated with ``task=``).

    Example::

        >>> objective_for(example_model("gpt-micro")).task           # doctest: +SKIP
        'causal-lm'

    Args:
        task: see :func:`utils.models.tasks.detect_task`.
        mask_token_id: overrides the mask id (default: the config's, else the byte tokenizer's 255).
        profile: the entry point's look at ``model`` (:func:`~utils.models.profile.look_at`, built with
            the same ``task``); default None: looked at here.

    Raises:
        ValueError: as :func:`~utils.models.tasks.detect_task`, or a ``mask_token_id`` outside the vocabulary.
    """
    call = call or f"objective_for({type(model).__name__})"
    profile = profile or look_at(model, task, call=call)
    info, vocab = profile.task, profile.vocab_size
    if mask_token_id is not None:
        check_int("mask_token_id", mask_token_id, minimum=0, maximum=vocab - 1 if vocab else None, call=call,
                  rule=f"an id in 0..{(vocab or 1) - 1}, the model's vocabulary", message="{call}: " + NOT_ALLOWED)
        info = TaskInfo(info.task, info.reason, mask_token_id, info.decoder_start_token_id, info.expected_input)
    return Objective(info, vocab, type(model).__name__, own_loss=profile.returns_loss, profile=profile)


def objective_loss_fn(model: nn.Module, task: str | Objective | None = None):
    """A ``loss_fn(model, batch) -> loss`` with ``model``'s objective, for one-off measurements
    (memory, the fp16 report): the task is found now, before any hook watches a forward pass, and
    each call hides the same positions (a fresh generator seeded 0), so two passes compare.
    ``task`` may be the model's :class:`Objective` already found (then the model is not looked at again).

    Example::

        >>> loss = objective_loss_fn(bert)(bert, ids)          # doctest: +SKIP
    """
    objective = task if isinstance(task, Objective) else objective_for(model, task)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return forward_loss(m, objective.prepare(batch, generator=torch.Generator().manual_seed(0), argument="batch"))[0]

    return loss_fn


def suite_loss_fn(model: nn.Module, task: str | None = None):
    """A ``loss_fn(model, batch) -> loss`` that leaves the model's own loss out: the model is called
    without targets or labels and the suite's cross-entropy is taken on its logits, with
    ``model``'s objective (next token, hidden tokens, seq2seq labels, class labels). For a model whose
    own loss raises inside its library.

    Example::

        >>> result = train(model, data, loss_fn=suite_loss_fn(model))   # doctest: +SKIP
    """
    objective = objective_for(model, task)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        prepared = objective.prepare(batch)
        kwargs = {k: v for k, v in prepared.kwargs.items() if k != "labels"}
        targets, shift = prepared.targets, False
        if targets is None:  # a dict batch: labels (or input_ids) shifted, as Hugging Face does
            targets, shift = prepared.kwargs.get("labels", prepared.input_ids), True
        if objective.task == SEQ2SEQ:  # the model made its decoder inputs from labels; make them here
            kwargs["decoder_input_ids"] = shift_right(targets, objective.info.decoder_start_token_id or 0)
        logits = get_logits(m(*prepared.args, **kwargs))
        return cross_entropy(logits, targets, shift=shift and logits.dim() == 3)

    return loss_fn
