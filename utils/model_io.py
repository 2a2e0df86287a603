"""The one home for reading whatever a user's model returns and what it expects as input.

Models come hand-written, from visual builders or from Hugging Face, and return a tensor, a
tuple, a dict or a ``ModelOutput``. The loop, the tiers and the benchmark all ask here.

Example::

    >>> logits = get_logits(model(input_ids))      # doctest: +SKIP
    >>> find_vocab_size(model), find_context_length(model)   # doctest: +SKIP
    (4096, 128)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx", "block_size", "max_seq_len",
                  "max_seq_length", "context_length", "max_len", "seq_len")


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
