"""The one home for reading whatever a user's model returns and what it expects as input.

Models come hand-written, from visual builders or from Hugging Face, and return a tensor, a
tuple, a dict or a ``ModelOutput``. The loop, the tiers and the benchmark all ask here.

Example::

    >>> logits = get_logits(model(input_ids))      # doctest: +SKIP
    >>> find_vocab_size(model), find_context_length(model)   # doctest: +SKIP
    (4096, 128)
    >>> find_num_layers(model), find_hidden_size(model)      # doctest: +SKIP
    (4, 256)
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

_CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx", "block_size", "max_seq_len",
                  "max_seq_length", "context_length", "max_len", "seq_len")
_LAYER_ATTRS = ("n_layer", "num_hidden_layers", "num_layers", "n_layers")
_WIDTH_ATTRS = ("n_embd", "hidden_size", "d_model", "dim")


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


def find_input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The token embedding: ``get_input_embeddings()`` when the model has it, else the first
    ``nn.Embedding`` whose name does not look positional."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except NotImplementedError:  # transformers' base class raises this when not overridden
            emb = None
        if isinstance(emb, nn.Embedding):
            return emb
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and "pos" not in name.lower():
            return module
    return None


def _config_int(model: nn.Module, names) -> int | None:
    for holder in (getattr(model, "config", None), model):
        if holder is None:
            continue
        for attr in names:
            value = holder.get(attr) if isinstance(holder, Mapping) else getattr(holder, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def find_vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size: ``config.vocab_size``, ``model.vocab_size``, or the input embedding's rows."""
    found = _config_int(model, ("vocab_size", "n_vocab", "ntoken", "num_tokens"))
    if found is not None:
        return found
    emb = find_input_embedding(model)
    return emb.num_embeddings if emb is not None else None


def find_context_length(model: nn.Module) -> int | None:
    """The longest sequence the model takes: a config attribute (``n_positions``,
    ``max_position_embeddings``, ``block_size``, ...) or the rows of a positional embedding.
    None when the model has no fixed limit."""
    found = _config_int(model, _CONTEXT_ATTRS)
    if found is not None:
        return found
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and "pos" in name.lower():
            return module.num_embeddings
    return None


def find_num_layers(model: nn.Module) -> int | None:
    """The number of transformer layers the config names (``n_layer``, ``num_hidden_layers``,
    ``num_layers``, ``n_layers``, on ``model.config`` or the model); None when it names none."""
    return _config_int(model, _LAYER_ATTRS)


def find_hidden_size(model: nn.Module) -> int | None:
    """The model's width as its config names it (``n_embd``, ``hidden_size``, ``d_model``, ``dim``,
    on ``model.config`` or the model); None when it names none."""
    return _config_int(model, _WIDTH_ATTRS)


# ----------------------------------------------------------------------------------------------
# What to feed a model: the tiers and the benchmark ask here for vocabulary, context and device.

DEFAULT_CONTEXT = 64  # used for models with no fixed context length (no position table, no config)


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: token ids below ``vocab_size``, sequences up to ``max_seq_len``, on ``device``.

    Example::

        >>> spec = input_spec(example_model("gpt-micro"))          # doctest: +SKIP
        >>> spec.vocab_size, spec.max_seq_len, spec.context_from    # doctest: +SKIP
        (256, 64, 'model')
        >>> spec.random_ids(2, 16, torch.Generator().manual_seed(0)).shape   # doctest: +SKIP
        torch.Size([2, 16])
    """

    vocab_size: int
    max_seq_len: int
    context_from: str  # "argument", "model", or "default" (the model has no fixed context)
    device: torch.device

    def random_ids(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform token ids ``(batch_size, seq_len)`` on the spec's device, reproducible by ``generator``."""
        ids = torch.randint(0, self.vocab_size, (batch_size, seq_len), generator=generator)
        return ids.to(self.device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither.

    Example::

        >>> model_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def input_spec(model: nn.Module, vocab_size: int | None = None, max_seq_len: int | None = None,
               *, call: str = "input_spec(model)") -> InputSpec:
    """Resolve what to feed ``model``: the arguments when given, else what the model says.

    Example::

        >>> input_spec(nn.Embedding(100, 8))          # no position table: the default context
        InputSpec(vocab_size=100, max_seq_len=64, context_from='default', device=device(type='cpu'))

    Args:
        vocab_size: default None: :func:`find_vocab_size`.
        max_seq_len: default None: :func:`find_context_length`, or ``DEFAULT_CONTEXT`` (64) when the
            model has no fixed limit.
        call: how the caller was called, repeated in errors.

    Raises:
        ValueError: the vocabulary size is not given and cannot be found (the model takes no token
            ids: the message says what it takes), or a size is not a positive int.
    """
    for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{call}: {name}={value!r} must be a positive int or None.")
    vocab = vocab_size if vocab_size is not None else find_vocab_size(model)
    if vocab is None:
        from utils.tasks import not_a_token_model_error  # tasks builds on this module

        raise not_a_token_model_error(model, call)
    if max_seq_len is not None:
        context, source = max_seq_len, "argument"
    elif (found := find_context_length(model)) is not None:
        context, source = found, "model"
    else:
        context, source = DEFAULT_CONTEXT, "default"
    return InputSpec(vocab, context, source, model_device(model))


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
