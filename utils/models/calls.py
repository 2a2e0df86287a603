"""The one home for calling a user's model and reading what it returns and expects as input.

Models come hand-written, from visual builders or from Hugging Face, and return a tensor, a
tuple, a dict or a ``ModelOutput``. Some take the targets too (``forward(idx, targets=None)``,
nanoGPT and llama2.c style) and return only the last position's logits without them. The loop,
the tiers, ``evaluate``, the benchmark and the fp16 scan all call models through here
(:func:`model_call`, :func:`predict`, :meth:`ModelCall.run`).

Example::

    >>> logits = predict(model, input_ids)        # (B, T, V), whatever the convention  # doctest: +SKIP
    >>> model_call(model).describe()               # doctest: +SKIP
    'GPT.forward(idx, targets=None): targets are passed, so every position comes back'
    >>> logits = get_logits(model(input_ids))      # doctest: +SKIP

Sizes (vocabulary, context, width) are read in :mod:`utils.models.sizes`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from utils.models.sizes import CONTEXT_SEARCH, find_input_embedding, find_vocab_size, model_device, unwrap


def _field(output, name: str):
    if isinstance(output, Mapping):  # dicts, and Hugging Face ModelOutput (an OrderedDict)
        return output.get(name)
    return getattr(output, name, None)


def get_logits(output) -> torch.Tensor:
    """The logits in a model's output: a tensor, a tuple/list's first item, or ``output["logits"]``.

    Raises:
        TypeError: the output holds no logits; the message names what it got.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = _field(output, "logits")
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"Cannot find logits in a model output of type {type(output).__name__}: return a tensor, a "
        f"tuple whose first item is the logits, or a dict/ModelOutput with 'logits'."
    )


def get_loss(output) -> torch.Tensor | None:
    """The loss a model computed itself (``output["loss"]`` or ``output.loss``), else None."""
    if isinstance(output, (torch.Tensor, tuple, list)):
        return None
    loss = _field(output, "loss")
    return loss if isinstance(loss, torch.Tensor) else None


def get_attentions(output) -> tuple[torch.Tensor, ...] | None:
    """The attention weights a model returned (``output["attentions"]`` or ``output.attentions``,
    as Hugging Face models do with ``output_attentions=True``): one ``(B, H, L, S)`` per layer.

    None for plain tensors and tuples, and when the model returned none (e.g. an empty tuple from a
    Hugging Face model using SDPA).
    """
    if isinstance(output, (torch.Tensor, tuple, list)):
        return None
    found = tuple(a for a in (_field(output, "attentions") or ()) if isinstance(a, torch.Tensor))
    return found or None


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Run checks on ``model`` and leave it as it was: each submodule's train/eval mode and every
    parameter's ``.grad`` are restored on exit.

    Example::

        >>> with preserved_state(model):             # doctest: +SKIP
        ...     model.train(); model(x).sum().backward()
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for param, grad in grads:
            param.grad = grad


# ----------------------------------------------------------------------------------------------
# How to call a model, read from ``forward``'s signature

TARGET_NAMES = ("targets", "labels", "target", "y")  # how hand-written forwards name the targets
PLAIN, TARGETS, HUGGING_FACE = "plain", "targets", "hugging-face"


@dataclass
class ModelCall:
    """How the suite calls one model, read once from its ``forward`` signature (:func:`model_call`).

    Example::

        >>> class LM(nn.Module):
        ...     def forward(self, idx, targets=None): ...
        >>> model_call(LM()).convention, model_call(LM()).target_arg
        ('targets', 'targets')

    Attributes:
        owner: ``"GPT.forward"``, for messages.
        signature: ``forward``'s parameters as text, e.g. ``"(idx, targets=None)"``.
        convention: ``"plain"`` (``forward(ids)``: called with the ids alone), ``"targets"``
            (``forward(idx, targets=None)``: the targets are passed as ``target_arg``, so every
            position's logits come back and the model's own loss is used), or ``"hugging-face"``
            (``input_ids=``; dict batches pass ``labels=`` and ``attention_mask=`` as given).
        target_arg: the name the targets go under (``targets``, ``labels``, ``target`` or ``y``).
        last_position_only: for ``"targets"``: whether a call without targets returns only the
            last position (llama2.c, nanoGPT), learnt from the first :func:`predict` given this
            call on more than one token, or True when the targets have no default; None until known.
        returns_loss: for ``"plain"``: whether ``forward(ids)`` returns a loss, not logits (a
            wrapper that shifts the sequence and computes the loss itself), learnt by
            :func:`returns_loss` given this call; None until known.

    The entry points hold one per model in their look (:class:`utils.models.profile.ModelProfile`),
    so what is learnt is learnt once.
    """

    owner: str
    signature: str
    convention: str
    target_arg: str | None = None
    last_position_only: bool | None = field(default=None, compare=False)
    returns_loss: bool | None = field(default=None, compare=False)

    def describe(self) -> str:
        """One line: the convention and what the suite does about it."""
        head = f"{self.owner}{self.signature}"
        if self.convention == TARGETS:
            return (f"{head}: the suite passes {self.target_arg}= so every position's logits come back, "
                    f"and uses the loss the model returns")
        if self.convention == HUGGING_FACE:
            return f"{head}: a Hugging Face model, called with input_ids (and labels, attention_mask from dict batches)"
        return f"{head}: called with the token ids alone"

    def run(self, model: nn.Module, args: tuple, kwargs: dict, targets: torch.Tensor | None):
        """``model(*args, **kwargs)``, with ``targets`` passed as the model names them when its
        ``forward`` takes them (convention ``"targets"``); returns the raw output."""
        if self.convention == TARGETS and targets is not None:
            # Contiguous: the loop's targets are a slice (ids[:, 1:]), and such models often .view(-1) them.
            return model(*args, **kwargs, **{self.target_arg: targets.contiguous()})
        return model(*args, **kwargs)

    def loss(self, output) -> torch.Tensor | None:
        """The loss the model returned: ``output.loss`` / ``output["loss"]``, or for a ``forward(idx,
        targets=None)`` model the second item of its ``(logits, loss)`` tuple; else None."""
        loss = get_loss(output)
        if loss is None and self.convention == TARGETS and isinstance(output, (tuple, list)):
            second = output[1] if len(output) > 1 else None
            if isinstance(second, torch.Tensor) and second.dim() == 0 and second.is_floating_point():
                loss = second
        return loss

    def short_logits_error(self, logits: torch.Tensor, seq_len: int) -> ValueError | None:
        """The error to raise when the model gave logits for one position of ``seq_len`` (the inference
        shortcut of models that return every position only when given the targets); None otherwise."""
        if not (logits.dim() == 3 and logits.shape[1] == 1 and seq_len > 1):
            return None
        head = (f"{self.owner}{self.signature} returned logits of shape {tuple(logits.shape)}: one position of "
                f"{seq_len}")
        if self.convention == TARGETS:
            return ValueError(f"{head}, even with {self.target_arg}= passed. Return every position's logits "
                              f"when the targets are given.")
        return ValueError(
            f"{head}. Models that return only the last position's logits unless they get the targets must "
            f"name that argument {', '.join(TARGET_NAMES[:-1])} or {TARGET_NAMES[-1]}, so the suite can pass "
            f"it; or return every position's logits."
        )


def model_call(model: nn.Module) -> ModelCall:
    """How to call ``model`` (a :class:`ModelCall`), read from ``forward``'s signature; wrappers
    (DDP, ``torch.compile``) are called as their module. Nothing is cached here: the entry points
    read it once into their look at the model (:func:`utils.models.profile.look_at`) and pass that
    :class:`ModelCall` on, so what :func:`predict` and :func:`returns_loss` learn is kept there.
    """
    return _unwrapped(model, None)[1]


def read_call(module: nn.Module, device: torch.device | None = None) -> ModelCall:
    """How to call ``module`` (the user's module, already out of any wrapper) and, for a plain
    ``forward(ids)``, whether it returns its own loss: one probe on ``(2, 4)`` zeros on ``device``
    (default: the module's). The look at a model (:func:`utils.models.profile.look_at`) reads both
    at once; :func:`model_call` reads the signature alone."""
    call = _detect(module)
    if call.convention == PLAIN:
        call.returns_loss = _probe_returns_loss(module, device)
    return call


def _unwrapped(model: nn.Module, call: ModelCall | None) -> tuple[nn.Module, ModelCall]:
    """The user's module inside any wrapper, and ``call`` (default: read from its signature now)."""
    inner = unwrap(model)
    return inner, call or _detect(inner)


def _detect(model: nn.Module) -> ModelCall:
    owner = f"{type(model).__name__}.forward"
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C-implemented forward: nothing to read
        return ModelCall(owner, "(...)", PLAIN)
    params = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [p.name for p in params]
    text = str(signature)
    if "input_ids" in names:
        return ModelCall(owner, text, HUGGING_FACE)
    target = next((p for p in params[1:] if p.name in TARGET_NAMES), None)
    if target is None:
        return ModelCall(owner, text, PLAIN)
    required = target.default is target.empty
    return ModelCall(owner, text, TARGETS, target.name, last_position_only=True if required else None)


def is_loss_output(output) -> bool:
    """True for what a forward that computes its own loss returns: a 0-dim float tensor, or a
    dict/``ModelOutput`` with a ``loss`` and no ``logits``."""
    if isinstance(output, torch.Tensor):
        return output.dim() == 0 and output.is_floating_point()
    return get_loss(output) is not None and not isinstance(_field(output, "logits"), torch.Tensor)


_PROBE_IDS = (2, 4)  # a loss wrapper shifts its input, so the probe stays short of any context


def returns_loss(model: nn.Module, call: ModelCall | None = None) -> bool:
    """Whether ``model(ids)`` returns a loss instead of logits (``loss = model(seq)``: the wrapper
    shifts the sequence and computes the cross-entropy itself). Only plain ``forward(ids)`` models
    are probed, on ``(2, 4)`` zeros in eval mode; the answer is kept on ``call`` (default: read
    now), so a caller holding the model's :class:`ModelCall` probes once.

    Example::

        >>> class Wrapper(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.net = nn.Embedding(10, 10)
        ...     def forward(self, seq):
        ...         return self.net(seq[:, :-1]).logsumexp(-1).mean()
        >>> returns_loss(Wrapper()), returns_loss(nn.Embedding(10, 10))
        (True, False)
    """
    inner, call = _unwrapped(model, call)
    if call.returns_loss is None:
        call.returns_loss = call.convention == PLAIN and _probe_returns_loss(inner)
    return call.returns_loss


def _probe_returns_loss(model: nn.Module, device: torch.device | None = None) -> bool:
    ids = torch.zeros(_PROBE_IDS, dtype=torch.long, device=device if device is not None else model_device(model))
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            return is_loss_output(model(ids))
    except Exception:  # noqa: BLE001  a model that fails on this probe fails, with its message, where it is used
        return False


def find_logits_network(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the first submodule (outermost first) that holds an input embedding
    and maps token ids ``(B, T)`` to logits ``(B, T, V)`` over its vocabulary: the network a
    loss-returning wrapper calls. None when no submodule does.

    .. note:: Calls each candidate once on ``(2, 4)`` zeros without gradients, in eval mode.
    """
    ids = torch.zeros(_PROBE_IDS, dtype=torch.long, device=model_device(model))
    for name, child in model.named_modules():
        if child is model or isinstance(child, nn.Embedding) or find_input_embedding(child) is None:
            continue
        vocab = find_vocab_size(child)
        try:
            with preserved_state(child), torch.no_grad():
                child.eval()
                logits = get_logits(child(ids))
        except Exception:  # noqa: BLE001  a part that does not take token ids alone is not the network
            continue
        if logits.dim() == 3 and tuple(logits.shape) == (*_PROBE_IDS, vocab):
            return name, child
    return None


def predict(model: nn.Module, ids: torch.Tensor, call: ModelCall | None = None) -> torch.Tensor:
    """Per-position logits for token ids ``(B, T)``: ``(B, T, V)`` (or ``(B, C)`` for a classifier).

    A ``forward(idx, targets=None)`` model that returns only the last position without targets
    (found on the first call with ``T > 1``) is called with placeholder targets (zeros), so every
    position comes back; its loss on them is ignored. What the first call learns is kept on
    ``call`` (default: read now, and forgotten after the call).

    Example::

        >>> predict(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10)), torch.zeros(2, 3, dtype=torch.long)).shape
        torch.Size([2, 3, 10])
    """
    call = call or model_call(model)
    if call.convention != TARGETS:
        return get_logits(model(ids))
    if call.last_position_only:
        return get_logits(model(ids, **{call.target_arg: torch.zeros_like(ids)}))
    logits = get_logits(model(ids))
    if call.last_position_only is None and ids.dim() == 2 and ids.shape[1] > 1:
        call.last_position_only = logits.dim() == 3 and logits.shape[1] == 1 and ids.shape[0] == logits.shape[0]
        if call.last_position_only:
            return get_logits(model(ids, **{call.target_arg: torch.zeros_like(ids)}))
    return logits


def short_logits_error(model: nn.Module, logits: torch.Tensor, seq_len: int) -> ValueError | None:
    """The error for logits of one position of ``seq_len``, else None (see :meth:`ModelCall.short_logits_error`)."""
    return model_call(model).short_logits_error(logits, seq_len)


def check_context(model: nn.Module, seq_len: int, context_from: str, how: str, forward=None) -> None:
    """Run one forward on ``(1, seq_len)`` token ids and turn a failure into an error that names the
    context length, where it came from and how to pass another (``how``, e.g. ``"--context N"``),
    when the length is the cause: a model that fails on two tokens as well gets an error that says
    the length is not the cause.

    Example::

        >>> check_context(nn.Embedding(10, 4), 8, "default", "max_seq_len=")

    Args:
        forward: ``forward(model, ids) -> logits``, how the caller calls the model (default
            :func:`predict`; an encoder-decoder needs :func:`utils.models.tasks.task_logits` with its task).

    Raises:
        ValueError: the forward failed (the model's own error is chained as the cause).

    .. note:: Costs one forward pass without gradients (two when it fails); modes and gradients are kept.
    """
    forward = forward or predict
    error = _forward_error(model, seq_len, forward)
    if error is None:
        return
    failed = (f"{model_call(model).owner} failed on a sequence of {seq_len} tokens ({type(error).__name__}: "
              f"{str(error) or 'no message'})")
    short = 2
    if seq_len > short and _forward_error(model, short, forward) is not None:
        raise ValueError(
            f"{failed}, and on {short} tokens too, so the length is not the cause. The suite calls it so: "
            f"{model_call(model).describe()}."
        ) from error
    where = ("found on the model" if context_from == "model" else
             "as given" if context_from == "argument" else
             f"a default: none of {CONTEXT_SEARCH} was found")
    raise ValueError(
        f"{failed}. The context length {seq_len} is {where}. Pass a length the model takes with {how}."
    ) from error


def _forward_error(model: nn.Module, seq_len: int, forward) -> Exception | None:
    """The error ``forward(model, zeros (1, seq_len))`` raises, or None when it runs."""
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=model_device(model))
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            forward(model, ids)
    except Exception as e:  # a bare AssertionError, an IndexError, a shape RuntimeError: all re-raised
        return e
    return None
