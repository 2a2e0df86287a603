"""What a model predicts: causal LM, masked LM, sequence classifier, encoder-decoder, or no tokens at all.

The loop, ``evaluate``, the tiers and the CLI ask here once per model, so a BERT is never trained
to predict the next token, a T5 gets its decoder inputs, and a ViT is told plainly that the suite
takes token ids.

Decided, in order, from: what the user states (``task=``); the Hugging Face config
(``is_encoder_decoder``, the class or ``architectures`` name, ``is_decoder``); ``forward`` taking
``decoder_input_ids``; then one probe call on random ids: logits ``(B, C)`` are a classifier, logits
``(B, T, V)`` a causal LM when changing the last token leaves every earlier position as it was,
a masked LM otherwise.

Example::

    >>> info = detect_task(example_model("gpt-micro"))           # doctest: +SKIP
    >>> info.task, info.reason                                   # doctest: +SKIP
    ('causal-lm', 'changing the last token leaves earlier positions unchanged (causal)')
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from utils.common.checks import is_int
from utils.models.calls import (
    ModelCall,
    find_logits_network,
    get_logits,
    predict,
    preserved_state,
    returns_loss,
)
from utils.models.input_kind import expected_input
from utils.models.sizes import InputSpec, find_vocab_size, input_spec, model_device

CAUSAL_LM, MASKED_LM, CLASSIFIER, SEQ2SEQ, NON_TOKEN = "causal-lm", "masked-lm", "classifier", "seq2seq", "non-token"
TASKS = (CAUSAL_LM, MASKED_LM, CLASSIFIER, SEQ2SEQ, NON_TOKEN)
IGNORE_INDEX = -100  # a target no loss counts (PyTorch's cross_entropy default, Hugging Face's labels)
BYTE_MASK_ID = 0xFF  # never a byte of UTF-8 text: the byte tokenizer's reserved mask id
_PROBE_LEN = 16
_CAUSAL_RTOL = 1e-5  # earlier outputs may move by rounding only

# Hugging Face head classes, by the end of their name.
_HF_SUFFIXES = (("ForMaskedLM", MASKED_LM), ("ForSequenceClassification", CLASSIFIER),
                ("ForConditionalGeneration", SEQ2SEQ), ("ForCausalLM", CAUSAL_LM), ("LMHeadModel", CAUSAL_LM))


@dataclass(frozen=True)
class TaskInfo:
    """What a model predicts and how that was decided.

    Attributes:
        task: one of :data:`TASKS`.
        reason: how it was decided, in words (shown in plans, reports and errors).
        mask_token_id: the id that hides a token for masked-LM and denoising objectives: the
            config's ``mask_token_id``, else :data:`BYTE_MASK_ID` when the vocabulary holds the bytes;
            None when neither applies.
        decoder_start_token_id: seq2seq only: the first decoder input (config, else pad id, else 0).
        expected_input: non-token only: what the model takes instead of token ids.
    """

    task: str
    reason: str
    mask_token_id: int | None = None
    decoder_start_token_id: int | None = None
    expected_input: str | None = None

    @property
    def sees_future(self) -> bool:
        """True when every position may read every token: next-token training would be cheating."""
        return self.task in (MASKED_LM, CLASSIFIER, SEQ2SEQ)

    def describe(self) -> str:
        """One line for plans and reports, e.g. ``"masked-lm (the config names BertForMaskedLM)"``."""
        extra = f"; mask id {self.mask_token_id}" if self.task in (MASKED_LM, SEQ2SEQ) else ""
        return f"{self.task} ({self.reason}{extra})"


def check_task(task, call: str) -> str | None:
    """``task`` when it is None or one of :data:`TASKS`; otherwise a ValueError that lists them."""
    if task is None or task in TASKS:
        return task
    allowed = ", ".join(repr(t) for t in TASKS)
    raise ValueError(f"{call}: task={task!r} is not allowed: use one of {allowed}, or None to detect it.")


# ----------------------------------------------------------------------------------------------
# What the model says about itself


def _config(model: nn.Module):
    return getattr(model, "config", None)


def _config_value(model: nn.Module, name: str):
    for holder in (_config(model), model):
        value = holder.get(name) if isinstance(holder, dict) else getattr(holder, name, None)
        if value is not None:
            return value
    return None


def _hf_task(model: nn.Module) -> tuple[str, str] | None:
    """The task a Hugging Face-style config or class name states, with the reason; None if none."""
    if _config_value(model, "is_encoder_decoder") is True:
        return SEQ2SEQ, "the config says is_encoder_decoder=True"
    names = [type(model).__name__, *(getattr(_config(model), "architectures", None) or [])]
    for name in names:
        for suffix, task in _HF_SUFFIXES:
            if name.endswith(suffix):
                return task, f"the model is a {name}"
    if _accepts(model, "decoder_input_ids"):
        return SEQ2SEQ, f"{type(model).__name__}.forward takes decoder_input_ids"
    return None


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # builtins and C extensions have no signature
        return False
    return name in params


def find_mask_token_id(model: nn.Module, vocab_size: int | None = None) -> int | None:
    """``config.mask_token_id`` (or ``model.mask_token_id``), else :data:`BYTE_MASK_ID` (255) when the
    vocabulary holds all 256 bytes; None otherwise.

    Example::

        >>> find_mask_token_id(nn.Embedding(256, 4))
        255
    """
    found = _config_value(model, "mask_token_id")
    if is_int(found):
        return found
    vocab = vocab_size if vocab_size is not None else find_vocab_size(model)
    return BYTE_MASK_ID if vocab is not None and vocab > BYTE_MASK_ID else None


def find_decoder_start_token_id(model: nn.Module) -> int:
    """``config.decoder_start_token_id``, else ``config.pad_token_id``, else 0 (T5's choice)."""
    for name in ("decoder_start_token_id", "pad_token_id"):
        found = _config_value(model, name)
        if is_int(found):
            return found
    return 0


def find_num_classes(model: nn.Module) -> int | None:
    """A classifier's number of classes: ``config.num_labels`` / ``num_classes``, else the width of
    its logits on a two-token input (one probe call, the model left as it was)."""
    for name in ("num_labels", "num_classes"):
        value = _config_value(model, name)
        if is_int(value):
            return value
    with preserved_state(model), torch.no_grad():
        model.eval()
        return int(predict(model, torch.zeros(1, 2, dtype=torch.long, device=model_device(model))).shape[-1])


def is_token_model(model: nn.Module) -> bool:
    """True when the model has a vocabulary (a config ``vocab_size`` or an ``nn.Embedding``)."""
    return find_vocab_size(model) is not None


# ----------------------------------------------------------------------------------------------
# A forward that returns its own loss


@dataclass(frozen=True)
class LogitsNetwork:
    """What the checks that need logits call: the model, or the network a loss wrapper holds.

    Attributes:
        module: the model itself, or the submodule that returns logits.
        note: None for the model itself; else one line saying the model returns its loss and which
            attribute is checked instead (shown in reports).
    """

    module: nn.Module
    note: str | None = None


def logits_network(model: nn.Module, call: str, own_loss: bool | None = None) -> LogitsNetwork:
    """The module to read logits from: ``model``, unless its forward returns its own loss
    (:func:`~utils.models.calls.returns_loss`); then the network it wraps (an attribute whose module
    maps token ids to logits, see :func:`~utils.models.calls.find_logits_network`).

    Example::

        >>> logits_network(wrapper, "run_tier1(Wrapper)").note           # doctest: +SKIP
        'Wrapper.forward returns its loss, not logits: checked through model.net (Decoder), ...'

    Raises:
        ValueError: the model returns a loss and holds no network that returns logits; the message
            says what to pass instead.
    """
    if not (own_loss if own_loss is not None else returns_loss(model)):  # own_loss: the caller's look knows
        return LogitsNetwork(model)
    name = type(model).__name__
    found = find_logits_network(model)
    if found is None:
        raise ValueError(
            f"{call}: {name}.forward returns a loss (a scalar), not logits, and none of its submodules maps "
            f"token ids (B, T) to logits (B, T, V). The tiers, evaluate and the benchmark's accuracy need "
            f"logits: pass the network your wrapper calls (the module that returns logits). train() "
            f"trains {name} itself with the loss it returns."
        )
    attr, net = found
    return LogitsNetwork(net, f"{name}.forward returns its loss, not logits: checked through model.{attr} "
                              f"({type(net).__name__}), which returns logits")


# ----------------------------------------------------------------------------------------------
# Calling a token model for per-position logits


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int | None = None) -> torch.Tensor:
    """Decoder inputs from labels ``(B, T)``, as Hugging Face seq2seq models build them: the start
    id, then the labels minus their last token, ignored positions (``IGNORE_INDEX``, -100) as ``pad_id``.

    Example::

        >>> shift_right(torch.tensor([[5, 6, -100]]), start_id=0).tolist()
        [[0, 5, 6]]
    """
    out = labels.new_full(labels.shape, start_id)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == IGNORE_INDEX, start_id if pad_id is None else pad_id)


def call_inputs(ids: torch.Tensor, info: TaskInfo | None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` that give per-position logits for token ids ``(B, T)``: ``(ids,)`` for
    most models; for an encoder-decoder the ids and, as decoder inputs, the ids shifted right (a
    copy task), so the logits are ``(B, T, V)`` aligned with ``ids``."""
    if info is not None and info.task == SEQ2SEQ:
        return (ids,), {"decoder_input_ids": shift_right(ids, info.decoder_start_token_id or 0)}
    return (ids,), {}


def task_logits(model: nn.Module, ids: torch.Tensor, info: TaskInfo | None = None,
                call: ModelCall | None = None) -> torch.Tensor:
    """Per-position logits of ``model`` on token ids ``(B, T)``, called as its task needs: an
    encoder-decoder with decoder inputs (see :func:`call_inputs`), any other model through
    :func:`utils.models.calls.predict` (which knows the calling conventions; ``call`` is the model's
    :class:`~utils.models.calls.ModelCall` when the caller holds it)."""
    if info is None or info.task != SEQ2SEQ:
        return predict(model, ids, call)
    args, kwargs = call_inputs(ids, info)
    return get_logits(model(*args, **kwargs))


# ----------------------------------------------------------------------------------------------
# The causality probe (Tier 2's token substitution reads it too)


def earlier_positions_unchanged(y: torch.Tensor, y2: torch.Tensor, where: torch.Tensor) -> bool | None:
    """Whether per-position outputs ``(B, T, ...)`` before each sequence's changed position
    ``where`` (B,) stayed as they were, within rounding (``1e-5`` of the output's scale). None when
    every change was at position 0, so there was nothing before it to compare.

    Example::

        >>> y = torch.zeros(1, 3, 2); y2 = y.clone(); y2[0, 2] = 1.0
        >>> earlier_positions_unchanged(y, y2, torch.tensor([2]))
        True
    """
    y, y2 = y.detach(), y2.detach()
    before = torch.arange(y.shape[1], device=where.device)[None, :] < where[:, None]  # (B, T)
    if not before.any():
        return None
    diff = (y2 - y).abs().flatten(2).amax(-1).cpu()  # (B, T)
    scale = max(float(y.abs().max()), 1e-12)
    return float(diff[before.cpu()].max()) <= _CAUSAL_RTOL * scale


def probe_causal(model: nn.Module, ids: torch.Tensor, info: TaskInfo | None = None,
                 call: ModelCall | None = None) -> bool | None:
    """Does changing the last token leave every earlier position's output as it was? Runs the model
    twice in eval mode; None when the output is not per position ``(B, T, ...)``."""
    changed = ids.clone()
    vocab = int(ids.max()) + 2
    changed[:, -1] = (ids[:, -1] + 1) % max(vocab, 2)  # always a different token
    with preserved_state(model), torch.no_grad():
        model.eval()
        y, y2 = (task_logits(model, x, info, call).float() for x in (ids, changed))
    if y.dim() < 3 or y.shape[1] != ids.shape[1]:
        return None
    where = torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
    return earlier_positions_unchanged(y, y2, where)


# ----------------------------------------------------------------------------------------------
# The decision


def detect_task(model: nn.Module, task: str | None = None, *, vocab_size: int | None = None,
                max_seq_len: int | None = None, call: str | None = None, own_loss: bool | None = None,
                spec: InputSpec | None = None, calling: ModelCall | None = None) -> TaskInfo:
    """What ``model`` predicts; ``task`` states it (then only ``"causal-lm"`` is checked).

    Example::

        >>> detect_task(example_model("encoder-classifier")).task       # doctest: +SKIP
        'classifier'

    Args:
        task: None (default): detect it. Else one of :data:`TASKS`.
        vocab_size, max_seq_len: for the probe, as :func:`utils.models.calls.input_spec` takes them.
        call: how the caller was called, repeated in errors (default ``detect_task(<class>)``).
        own_loss: whether the forward returns its own loss, when already known (default None:
            :func:`~utils.models.calls.returns_loss`).
        spec: what to feed the probe, when already resolved (default None: from ``vocab_size`` and
            ``max_seq_len``, see :func:`~utils.models.sizes.input_spec`).
        calling: the model's :class:`~utils.models.calls.ModelCall`, when the caller holds it: what
            the probe learns about the model is kept there (default None: read now).

    Raises:
        ValueError: an unknown ``task``; ``task="causal-lm"`` for a model whose earlier positions
            see later tokens (next-token training would let it read each answer).

    .. note::
        Costs up to three forward passes of ``(2, 16)`` ids, in eval mode, the model left as it was.
    """
    call = call or f"detect_task({type(model).__name__})"
    task = check_task(task, call)
    if vocab_size is None and not is_token_model(model):
        return TaskInfo(NON_TOKEN, "no config.vocab_size and no nn.Embedding", expected_input=expected_input(model))
    stated = _hf_task(model)
    if stated is None and (own_loss if own_loss is not None else returns_loss(model, calling)):
        return _own_loss_task(model, task, vocab_size, call)
    if task is not None and task != CAUSAL_LM:
        return _with_ids(model, TaskInfo(task, "stated with task="), vocab_size)
    if stated is not None and not (task == CAUSAL_LM and stated[0] != CAUSAL_LM):
        return _with_ids(model, TaskInfo(*stated), vocab_size)
    return _probe(model, task, spec or input_spec(model, vocab_size, max_seq_len, call=call), call, calling)


def _own_loss_task(model: nn.Module, task: str | None, vocab_size, call: str) -> TaskInfo:
    """A loss-returning model's task: its network's (detected through it), else as stated or causal."""
    found = find_logits_network(model)
    own = f"{type(model).__name__}.forward returns its own loss"
    if found is None:
        return _with_ids(model, TaskInfo(task or CAUSAL_LM, f"{own}; " + ("stated with task=" if task else "assumed")),
                         vocab_size)
    inner = detect_task(found[1], task, vocab_size=vocab_size, call=call)
    return TaskInfo(inner.task, f"{own}; model.{found[0]}: {inner.reason}", inner.mask_token_id,
                    inner.decoder_start_token_id)


def _with_ids(model: nn.Module, info: TaskInfo, vocab_size: int | None) -> TaskInfo:
    start = find_decoder_start_token_id(model) if info.task == SEQ2SEQ else None
    return TaskInfo(info.task, info.reason, find_mask_token_id(model, vocab_size), start, info.expected_input)


def _probe(model: nn.Module, task: str | None, spec: InputSpec, call: str, calling: ModelCall | None) -> TaskInfo:
    ids = spec.random_ids(2, min(_PROBE_LEN, spec.max_seq_len), torch.Generator().manual_seed(0))
    with preserved_state(model), torch.no_grad():
        model.eval()
        logits = task_logits(model, ids, call=calling)
    if logits.dim() == 2:
        found = TaskInfo(CLASSIFIER, f"one output per sequence, logits {tuple(logits.shape)}")
    else:
        causal = probe_causal(model, ids, call=calling) if ids.shape[1] > 1 else None
        if causal is False:
            found = TaskInfo(MASKED_LM, "changing the last token changes earlier positions (bidirectional)")
        else:
            found = TaskInfo(CAUSAL_LM, "changing the last token leaves earlier positions unchanged (causal)")
    if task == CAUSAL_LM and found.task != CAUSAL_LM:
        raise ValueError(
            f"{call}: task='causal-lm' is not allowed for {type(model).__name__}: {found.reason}, so "
            f"next-token training would let it read each answer. Use task={found.task!r} (or None to detect)."
        )
    return _with_ids(model, TaskInfo(found.task, "stated with task=, and the probe agrees") if task else found,
                     spec.vocab_size)
