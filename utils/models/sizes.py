"""What a model's sizes are and what to feed it: vocabulary, context, width, layers, device.

The lowest of :mod:`utils.models` but :mod:`~utils.models.input_kind`: every size is read here
from the model's config (Hugging Face and nanoGPT ``config``, llama2.c ``params``, ``args``) or its
layers. :func:`read_sizes` reads them all at once, for :func:`utils.models.profile.look_at`.

Example::

    >>> find_vocab_size(nn.Embedding(100, 8)), find_context_length(nn.Embedding(100, 8))
    (100, None)
    >>> read_sizes(nn.Embedding(100, 8)).vocab_size
    100
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from utils.common.checks import check_int, is_int
from utils.models.input_kind import not_a_token_model_error

_CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx", "block_size", "max_seq_len",
                  "max_seq_length", "context_length", "max_len", "seq_len")
_LAYER_ATTRS = ("n_layer", "num_hidden_layers", "num_layers", "n_layers")
_WIDTH_ATTRS = ("n_embd", "hidden_size", "d_model", "dim")


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


# Where hand-written models keep their sizes: HF and nanoGPT ``config``, llama2.c ``params``,
# others ``args``, or attributes on the model itself.
_HOLDERS = ("config", "params", "args")


def _config_int(model: nn.Module, names) -> int | None:
    for holder in (*(getattr(model, h, None) for h in _HOLDERS), model):
        if holder is None:
            continue
        for attr in names:
            value = holder.get(attr) if isinstance(holder, Mapping) else getattr(holder, attr, None)
            if is_int(value, minimum=1):
                return value
    return None


def find_vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size: ``config.vocab_size``, ``model.vocab_size``, or the input embedding's rows."""
    found = _config_int(model, ("vocab_size", "n_vocab", "ntoken", "num_tokens"))
    if found is not None:
        return found
    emb = find_input_embedding(model)
    return emb.num_embeddings if emb is not None else None


CONTEXT_SEARCH = (
    f"{', '.join(_CONTEXT_ATTRS)} on model.config, model.params, model.args and the model itself, "
    f"and the rows of a learned position embedding (an nn.Embedding or nn.Parameter with 'pos' in its name)"
)


def find_context_length(model: nn.Module) -> int | None:
    """The longest sequence the model takes: a size attribute (``n_positions``,
    ``max_position_embeddings``, ``n_ctx``, ``block_size``, ``max_seq_len``, ...) on ``model.config``,
    ``model.params`` (llama2.c), ``model.args`` or the model, else the rows of a learned position
    embedding (``nn.Embedding`` or an ``nn.Parameter`` of shape ``(1, T, C)`` / ``(T, C)`` named
    ``*pos*``). None when the model has no fixed limit, or keeps it elsewhere (see
    ``CONTEXT_SEARCH``)."""
    found = _config_int(model, _CONTEXT_ATTRS)
    if found is not None:
        return found
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and "pos" in name.lower():
            return module.num_embeddings
    for name, param in model.named_parameters():
        if "pos" in name.lower() and param.dim() in (2, 3) and (param.dim() == 2 or param.shape[0] == 1):
            return param.shape[-2]  # (1, T, C) or (T, C)
    return None


def find_num_layers(model: nn.Module) -> int | None:
    """The number of transformer layers the config names (``n_layer``, ``num_hidden_layers``,
    ``num_layers``, ``n_layers``, on ``model.config`` or the model); None when it names none."""
    return _config_int(model, _LAYER_ATTRS)


def find_hidden_size(model: nn.Module) -> int | None:
    """The model's width as its config names it (``n_embd``, ``hidden_size``, ``d_model``, ``dim``,
    on ``model.config`` or the model); None when it names none."""
    return _config_int(model, _WIDTH_ATTRS)


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
    _check_sizes(vocab_size, max_seq_len, call)
    vocab = vocab_size if vocab_size is not None else find_vocab_size(model)
    if vocab is None:
        raise not_a_token_model_error(model, call)
    if max_seq_len is not None:
        context, source = max_seq_len, "argument"
    elif (found := find_context_length(model)) is not None:
        context, source = found, "model"
    else:
        context, source = DEFAULT_CONTEXT, "default"
    return InputSpec(vocab, context, source, model_device(model))


def _check_sizes(vocab_size, max_seq_len, call: str) -> None:
    for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len)):
        check_int(name, value, minimum=1, optional=True, call=call, rule="a positive int or None",
                  message="{call}: {name}={value!r} must be {rule}.")


@dataclass(frozen=True)
class Sizes:
    """Every size a model names, read at once (:func:`read_sizes`); None where it names none.

    ``module`` is the model read: the user's module inside any DDP or ``torch.compile`` wrapper.
    """

    module: nn.Module
    vocab_size: int | None
    context_length: int | None
    hidden_size: int | None
    num_layers: int | None
    embedding: nn.Embedding | None
    input: InputSpec | None = None  # what to feed it by default; None when it has no vocabulary

    def spec(self, vocab_size: int | None = None, max_seq_len: int | None = None, *,
             call: str = "input_spec(model)") -> InputSpec:
        """What to feed the module (as :func:`input_spec`), from the sizes read: none is searched again."""
        if vocab_size is None and max_seq_len is None and self.input is not None:
            return self.input
        vocab = vocab_size if vocab_size is not None else self.vocab_size
        if max_seq_len is None and self.context_length is not None:
            return replace(input_spec(self.module, vocab, self.context_length, call=call), context_from="model")
        if max_seq_len is None and vocab is not None:  # the module names no context: the default
            return replace(input_spec(self.module, vocab, DEFAULT_CONTEXT, call=call), context_from="default")
        return input_spec(self.module, vocab, max_seq_len, call=call)


def read_sizes(model: nn.Module, vocab_size: int | None = None, max_seq_len: int | None = None, *,
               call: str = "read_sizes(model)") -> Sizes:
    """The model's vocabulary, context length, width, layer count, input embedding and the
    :class:`InputSpec` to feed it, read once; ``vocab_size`` and ``max_seq_len`` override the model's.

    Example::

        >>> read_sizes(nn.Embedding(100, 8)).spec().max_seq_len      # no position table: the default
        64

    Raises:
        ValueError: a size is not a positive int (the message names ``call``).
    """
    _check_sizes(vocab_size, max_seq_len, call)
    inner = unwrap(model)
    vocab = vocab_size if vocab_size is not None else find_vocab_size(inner)
    found = Sizes(inner, vocab, find_context_length(inner), find_hidden_size(inner), find_num_layers(inner),
                  find_input_embedding(inner))
    return found if vocab is None else replace(found, input=found.spec(max_seq_len=max_seq_len, call=call))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP/DataParallel wrapper or a ``torch.compile`` result."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model

