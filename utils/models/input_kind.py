"""What a model takes when it is not token ids, and the one error for paths that need token ids.

The lowest module of :mod:`utils.models`: :mod:`~utils.models.calls` raises
:func:`not_a_token_model_error` when it finds no vocabulary, and :mod:`~utils.models.tasks` names a
non-token model's input with :func:`expected_input`; neither imports the other for it.

Example::

    >>> expected_input(nn.Sequential(nn.Linear(8, 2)))
    'Sequential.forward(input); its first layer 0 (Linear) takes float vectors (..., 8)'
"""

from __future__ import annotations

import inspect

from torch import nn


def expected_input(model: nn.Module) -> str:
    """What a model takes, read from ``forward``'s signature and its first layer with parameters.

    Example::

        >>> expected_input(nn.Sequential(nn.Linear(8, 2)))
        'Sequential.forward(input); its first layer 0 (Linear) takes float vectors (..., 8)'
    """
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = ["..."]
    head = f"{type(model).__name__}.forward({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    layers = [(n, m) for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    known = [(n, m) for n, m in layers if isinstance(m, _KNOWN_LAYERS)]
    for name, module in (known or layers)[:1]:
        return f"{head}; its first layer {name or '(root)'} ({type(module).__name__}) takes {_takes(module)}"
    return f"{head}; it has no layer with parameters"


_KNOWN_LAYERS = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Linear, nn.MultiheadAttention, nn.LayerNorm)


def _takes(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return f"token ids below {module.num_embeddings}"
    if isinstance(module, nn.Conv2d):
        return f"images (B, {module.in_channels}, H, W)"
    if isinstance(module, nn.Conv1d):
        return f"signals (B, {module.in_channels}, L)"
    if isinstance(module, nn.Linear):
        return f"float vectors (..., {module.in_features})"
    if isinstance(module, nn.MultiheadAttention):
        return f"embeddings (..., {module.embed_dim}), not token ids"
    if isinstance(module, nn.LayerNorm):
        return f"float vectors (..., {module.normalized_shape[-1]})"
    return "floating-point tensors"


def not_a_token_model_error(model: nn.Module, call: str) -> ValueError:
    """The one message for paths that need token ids and got a model that takes something else."""
    return ValueError(
        f"{call}: {type(model).__name__} is not a token model: it has no config.vocab_size and no "
        f"nn.Embedding. The tiers, evaluate and train on text take models of token ids (B, T); found "
        f"instead: {expected_input(model)}. For such a model, call train() with your own batches and "
        f"loss_fn=. (If it does take token ids, pass vocab_size=.)"
    )
