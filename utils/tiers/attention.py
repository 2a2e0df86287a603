"""Tier 2's attention: capturing the weights of any attention without changing the model, and
checking their patterns (collapsed or uniform heads, causality).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from utils.common.figures import new_figure
from utils.models.calls import get_attentions, preserved_state
from utils.models.profile import ModelProfile
from utils.models.tasks import (
    TaskInfo,
    call_inputs,
)
from utils.tiers.inputs import analyzed_length, causality_words, checked_inputs
from utils.tiers.report import Check

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")


# ----------------------------------------------------------------------------------------------
# Capturing attention


def sdpa_attention_weights(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The attention weights ``F.scaled_dot_product_attention`` uses, ``(..., H, L, S)``, in fp32.

    ``weights @ value`` equals the SDPA output (without dropout). Follows the reference
    implementation in the SDPA docs: the causal mask is aligned top-left, a boolean mask marks the
    positions that *may* attend, a float mask is added. Fully masked rows come out as zeros.

    Example::

        >>> q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
        >>> w = sdpa_attention_weights(q, k, is_causal=True)
        >>> torch.allclose(w @ v, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
        True
    """
    q, k = query.float(), key.float()
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # (..., H, L, S)
    L, S = scores.shape[-2:]
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


@dataclass
class AttentionCapture:
    """Attention weights from one forward pass.

    Attributes:
        source: where they came from: ``"output_attentions"``, ``"nn.MultiheadAttention"``,
            ``"F.scaled_dot_product_attention"``, ``"softmax"`` (several joined by ``" + "``), or ``""``.
        maps: ``{layer name: weights (B, H, L, S)}`` in call order, on the CPU, in fp32.
    """

    source: str = ""
    maps: dict[str, torch.Tensor] = field(default_factory=dict)


_SOFTMAXES = (torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax)


def _softmax_dim(args, kwargs):
    """The ``dim`` a softmax call was given, positionally or by name (None when not given)."""
    return kwargs.get("dim", args[1] if len(args) > 1 else None)


def softmax_attention(output: torch.Tensor, dim, batch_size: int) -> torch.Tensor | None:
    """Attention weights ``(B, H, T, T)`` when ``output`` is a softmax over the key axis of a
    self-attention score, ``(B, H, T, T)`` or ``(B*H, T, T)``; None for any other softmax (over a
    vocabulary ``(B, T, V)``, a router, a 2-D one).

    Example::

        >>> w = torch.randn(2 * 3, 5, 5).softmax(-1)
        >>> tuple(softmax_attention(w, -1, batch_size=2).shape)
        (2, 3, 5, 5)
    """
    if not isinstance(output, torch.Tensor) or output.dim() not in (3, 4) or not isinstance(dim, int):
        return None
    if dim not in (-1, output.dim() - 1) or output.shape[-1] != output.shape[-2] or output.shape[-1] < 2:
        return None
    if output.dim() == 3:  # (B*H, T, T), heads folded into the batch as nn.MultiheadAttention does
        n, t = output.shape[0], output.shape[-1]
        heads = n // batch_size if n % batch_size == 0 else 1
        output = output.reshape(n // heads, heads, t, t)
    return output


class _AttentionRecorder(TorchFunctionMode):
    """Sees every ``F.scaled_dot_product_attention`` and softmax call, however it was imported, and
    records the attention weights they compute; the calls themselves run unchanged.

    ``record(kind, weights)`` gets ``"F.scaled_dot_product_attention"`` with the weights SDPA uses,
    or ``"softmax"`` with the output of a softmax over the key axis of a ``(B, H, T, T)`` or
    ``(B*H, T, T)`` score (hand-written attention: ``softmax(q @ k.T * scale)``, einsum, masked
    with ``-inf`` or not: masked keys come out as zeros, so causality reads off the weights).
    """

    def __init__(self, record, batch_size: int):
        super().__init__()
        self.record, self.batch_size = record, batch_size

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            a = dict(zip(_SDPA_ARGS, args)) | kwargs
            weights = sdpa_attention_weights(a["query"], a["key"], a.get("attn_mask"), a.get("is_causal", False),
                                             a.get("scale"), a.get("enable_gqa", False))
            self.record("F.scaled_dot_product_attention", weights)
        output = func(*args, **kwargs)
        if func in _SOFTMAXES:
            weights = softmax_attention(output, _softmax_dim(args, kwargs), self.batch_size)
            if weights is not None:
                self.record("softmax", weights)
        return output


def capture_attention(model: nn.Module, input_ids: torch.Tensor, info: TaskInfo | None = None) -> AttentionCapture:
    """Run ``model(input_ids)`` once in eval mode and collect its attention weights.

    Example::

        >>> cap = capture_attention(example_model("gpt-micro"), torch.zeros(1, 8, dtype=torch.long))
        >>> cap.source, list(cap.maps)[0], tuple(cap.maps["transformer.h.0.attn"].shape)
        ('F.scaled_dot_product_attention', 'transformer.h.0.attn', (1, 2, 8, 8))

    An encoder-decoder (``info.task == "seq2seq"``) gets the ids shifted right as decoder inputs.

    .. note::
        Runs with autograd enabled: PyTorch's fused ``TransformerEncoderLayer`` path would otherwise
        bypass ``nn.MultiheadAttention`` (and its weights) entirely in eval mode.
    """
    maps, sources, names = {}, [], _ModuleNames(model)

    def record(kind: str, name: str, weights: torch.Tensor) -> None:
        weights = _as_4d(weights)
        key, n = name or "attention", 2
        while key in maps:  # a module called twice
            key, n = f"{name or 'attention'} (call {n})", n + 1
        maps[key] = weights
        if kind not in sources:
            sources.append(kind)

    def seen(kind: str, weights: torch.Tensor) -> None:
        if not isinstance(names.current_module, nn.MultiheadAttention):  # its hooks already record it
            record(kind, names.current, weights)

    hf = _wants_output_attentions(model)
    with preserved_state(model), contextlib.ExitStack() as stack:
        model.eval()
        stack.enter_context(torch.enable_grad())
        stack.enter_context(names)
        for mha_name, mha in ((n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)):
            stack.enter_context(_mha_weights(mha, lambda w, n=mha_name: record("nn.MultiheadAttention", n, w)))
        stack.enter_context(_AttentionRecorder(seen, input_ids.shape[0]))
        args, kwargs = call_inputs(input_ids, info)
        if hf:
            try:
                output = model(*args, **kwargs, output_attentions=True)
            except TypeError:  # a Hugging Face-style config, but a forward without the argument
                maps.clear()
                hf, output = False, model(*args, **kwargs)
        else:
            output = model(*args, **kwargs)
    returned = _returned_attentions(output) if hf else None
    if returned:  # the model's own answer wins over what was seen inside it
        return AttentionCapture("output_attentions", {f"layer {i}": _as_4d(a) for i, a in enumerate(returned)})
    return AttentionCapture(" + ".join(sources), maps)


def _returned_attentions(output):
    """``attentions`` (decoder-only and encoder models) or, for an encoder-decoder, its encoder's
    then its decoder's self-attention (``encoder_attentions``, ``decoder_attentions``)."""
    found = get_attentions(output)
    if found or not hasattr(output, "get"):
        return found
    both = tuple(a for key in ("encoder_attentions", "decoder_attentions") for a in (output.get(key) or ())
                 if isinstance(a, torch.Tensor))
    return both or None


def _as_4d(a: torch.Tensor) -> torch.Tensor:
    a = a.detach().float().cpu()
    while a.dim() < 4:  # unbatched (H, L, S) or (L, S)
        a = a.unsqueeze(0)
    return a


def _wants_output_attentions(model: nn.Module) -> bool:
    """Hugging Face models: their config has ``output_attentions``; plain modules would reject the argument."""
    return hasattr(getattr(model, "config", None), "output_attentions")


@contextlib.contextmanager
def _mha_weights(mha: nn.MultiheadAttention, record):
    """Make ``mha`` return per-head weights (``need_weights=True, average_attn_weights=False``)
    and hand them to ``record``; its output is otherwise unchanged."""

    def ask_for_weights(module, args, kwargs):
        kwargs = dict(zip(_MHA_ARGS, args)) | kwargs
        kwargs.update(need_weights=True, average_attn_weights=False)
        return (kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value")), kwargs

    def keep_weights(module, args, kwargs, output):
        if isinstance(output, tuple) and isinstance(output[1], torch.Tensor):
            record(output[1])

    handles = [mha.register_forward_pre_hook(ask_for_weights, with_kwargs=True),
               mha.register_forward_hook(keep_weights, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _ModuleNames:
    """Tracks which named submodule is running (the innermost), to name the SDPA and softmax calls
    made inside it."""

    def __init__(self, model: nn.Module):
        self.model, self.stack, self.handles = model, [], []

    @property
    def current(self) -> str:
        return self.stack[-1][0] if self.stack else ""

    @property
    def current_module(self) -> nn.Module | None:
        return self.stack[-1][1] if self.stack else None

    def __enter__(self):
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter_hook(name)))
            self.handles.append(module.register_forward_hook(self._exit_hook))
        return self

    def _enter_hook(self, name: str):
        def hook(module, args) -> None:  # returning None keeps the inputs
            self.stack.append((name, module))
        return hook

    def _exit_hook(self, module, args, output) -> None:  # returning None keeps the output
        self.stack.pop()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.stack.clear()


# ----------------------------------------------------------------------------------------------
# Attention patterns


def check_attention_patterns(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 2,
    collapsed_below: float = 0.05,
    uniform_above: float = 0.99,
    trained: bool | None = None,
    figure: bool = True,
    seed: int = 0,
    task=None,
    profile: ModelProfile | None = None,
) -> Check:
    """Entropy per head, causality, and heatmaps of the attention weights on random input.

    A head's normalized entropy is its entropy over the keys a query may see, divided by the
    log of how many those are: 0 attends to one token ("collapsed"), 1 spreads evenly ("uniform").

    Fails when the weights are not finite or do not sum to 1, when a head is collapsed, and when
    a *trained* model has a uniform head. In an untrained model uniform heads are expected and
    reported as a note: at random initialization the attention logits ``q·k/√d`` are near zero,
    so the softmax is near uniform. Skipped, and said plainly, when no attention is found.

    Example::

        >>> check = check_attention_patterns(example_model("gpt-micro"), figure=False)
        >>> check.details["layers"]["transformer.h.0.attn"]["heads"]
        2
        >>> check.passed, check.details["trained"]    # fresh weights: uniform heads are expected
        (True, False)

    Args:
        collapsed_below: a head whose mean normalized entropy is below this is collapsed (default 0.05).
        uniform_above: a head whose mean normalized entropy is above this is uniform (default 0.99).
        trained: whether the model has been trained. Default None: inferred by
            :func:`looks_trained` from its normalization layers.

    .. note::
        When ``trained`` is None and the model has no normalization layer, whether it is trained
        cannot be told: uniform heads are then reported, not failed, and the summary says to pass
        ``trained=True`` to fail on them.
    """
    spec, info, calling = checked_inputs(model, profile, task, vocab_size, max_seq_len, f"check_attention_patterns({type(model).__name__})")
    ids = spec.random_ids(batch_size, analyzed_length(spec, seq_len), torch.Generator().manual_seed(seed))
    capture = capture_attention(model, ids, info)
    if not capture.maps:
        return Check("attention_patterns", True,
                     "No attention found: the model has no nn.MultiheadAttention, never calls "
                     "F.scaled_dot_product_attention, takes no softmax over a (T, T) score, and returns no "
                     "attentions. Nothing to analyze.",
                     {"source": None}, skipped=True)
    layers = {name: _head_stats(w, collapsed_below, uniform_above) for name, w in capture.maps.items()}
    broken = [n for n, s in layers.items() if not s["finite"] or s["row_sum_error"] > 1e-3]
    trained, trained_reason = (trained, f"given: trained={trained}") if trained is not None else looks_trained(model)
    details = {
        "source": capture.source,
        "causal": all(s["causal"] for s in layers.values()),
        "layers": layers,
        "collapsed_heads": [f"{n} head {h}" for n, s in layers.items() for h in s["collapsed_heads"]],
        "uniform_heads": [f"{n} head {h}" for n, s in layers.items() for h in s["uniform_heads"]],
        "trained": trained,
        "trained_reason": trained_reason,
    }
    fig = _heatmaps(capture.maps) if figure else None
    if broken:
        return Check("attention_patterns", False,
                     f"Attention weights in {', '.join(broken[:5])} are not finite or do not sum to 1.", details, fig)
    heads = sum(s["heads"] for s in layers.values())
    mean = sum(sum(s["normalized_entropy"]) for s in layers.values()) / heads
    counts = (f"{len(layers)} attention layer(s), {heads} heads, from {capture.source}"
              f"{_attention_causality(details['causal'], info)}; mean normalized entropy {mean:.2f}; "
              f"{len(details['collapsed_heads'])} collapsed, {len(details['uniform_heads'])} uniform heads.")
    problems, notes = _head_verdict(details["collapsed_heads"], details["uniform_heads"], trained)
    return Check("attention_patterns", not problems, " ".join([counts, *problems, *notes]), details, fig)


def _head_verdict(collapsed: list[str], uniform: list[str], trained: bool | None) -> tuple[list[str], list[str]]:
    """What fails and what is only said, for the named collapsed and uniform heads."""
    problems, notes = [], []
    if collapsed:
        cause = {True: "after training, the head attends to one key whatever the input",
                 False: "untrained, this means attention logits far too large: check the query/key init scale",
                 None: "the attention logits are far too large"}[trained]
        problems.append(f"Collapsed (each query puts nearly all its weight on one key; {cause}): "
                        f"{_names(collapsed)}.")
    if uniform and trained:
        problems.append(f"Uniform after training (each query spreads its weight evenly, so the head "
                        f"learned nothing): {_names(uniform)}.")
    elif uniform:
        notes.append("Uniform heads are expected before training: at random initialization the attention "
                     "logits q·k/√d are near zero, so the softmax is near uniform.")
    if uniform and trained is None:
        notes.append("Whether this model is trained could not be told (it has no normalization layer); "
                     "pass trained=True to fail on uniform heads.")
    return problems, notes


def _names(heads: list[str], most: int = 5) -> str:
    return ", ".join(heads[:most]) + (f" ... ({len(heads)} in all)" if len(heads) > most else "")


def looks_trained(model: nn.Module) -> tuple[bool | None, str]:
    """Whether the model's weights have moved from their initialization, told by its normalization layers.

    Every normalization layer (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, batch norms, and any
    module whose class name ends in ``Norm``) starts with a constant scale (ones, or zeros where
    the layer adds 1) and a zero bias; the first optimizer step moves them. So the model is
    untrained when every such layer still has a constant scale and a zero bias, and trained when
    any has moved (a pretrained or loaded checkpoint included). Other weights are random at
    initialization and tell nothing.

    Example::

        >>> looks_trained(example_model("gpt-micro"))
        (False, 'every normalization layer (5) still has its initial constant scale and zero bias')

    Returns:
        ``(trained, reason)``; ``trained`` is None, with the reason, when the model has no
        normalization layer with parameters.

    .. note::
        A model trained for only a few steps counts as trained; its heads may still be near uniform.
    """
    norms = {name: m for name, m in model.named_modules() if _is_norm(m)}
    if not norms:
        return None, "no normalization layer with parameters to compare with its initial values"
    moved = [name for name, m in norms.items() if not _at_init(m)]
    if moved:
        return True, f"normalization weights have moved from their initial values ({_names(moved, 3)})"
    return False, f"every normalization layer ({len(norms)}) still has its initial constant scale and zero bias"


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm, RMSNorm, GroupNorm, BatchNorm1d, InstanceNorm2d, LlamaRMSNorm, a hand-written RMSNorm ...
    named_norm = re.search(r"Norm(\d+d)?$", type(module).__name__) is not None
    return named_norm and isinstance(getattr(module, "weight", None), torch.Tensor)


def _at_init(norm: nn.Module) -> bool:
    weight, bias = norm.weight.detach().flatten(), getattr(norm, "bias", None)
    constant = weight.numel() == 0 or bool((weight == weight[0]).all())
    return constant and (not isinstance(bias, torch.Tensor) or not bool(bias.detach().any()))


def _attention_causality(causal: bool, info: TaskInfo) -> str:
    """`` (causal)``, or for a model that may see the future `` (bidirectional, as ...)``."""
    if causal:
        return " (causal)"
    return f" ({causality_words(False, info)})" if info.sees_future else ""


def _head_stats(weights: torch.Tensor, collapsed_below: float, uniform_above: float) -> dict:
    """Statistics of weights ``(B, H, L, S)``, averaged over batch and queries."""
    p = weights.clamp_min(0.0)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (B, H, L)
    keys = (p > 0).sum(-1)  # (B, H, L): how many keys each query can see
    informative = keys > 1  # one visible key has entropy 0 by definition
    normalized = entropy / keys.clamp_min(2).float().log()
    per_head = (normalized * informative).sum((0, 2)) / informative.sum((0, 2)).clamp_min(1)  # (H,)
    L, S = weights.shape[-2:]
    finite = bool(torch.isfinite(weights).all())
    # Causal: nothing above the diagonal. Undecidable for one query.
    causal = L == S and L > 1 and float(weights.triu(1).abs().max()) <= 1e-6
    return {
        "heads": weights.shape[1],
        "entropy_nats": [round(float(v), 4) for v in entropy.mean((0, 2))],
        "normalized_entropy": [round(float(v), 4) for v in per_head],
        "causal": causal,
        "finite": finite,
        "row_sum_error": float((weights.sum(-1) - 1).abs().max()) if finite else math.inf,
        "collapsed_heads": [h for h, v in enumerate(per_head.tolist()) if v < collapsed_below],
        "uniform_heads": [h for h, v in enumerate(per_head.tolist()) if v > uniform_above],
    }


def _heatmaps(maps: dict[str, torch.Tensor], max_layers: int = 4, max_heads: int = 4):
    """First sample's weights: up to ``max_layers`` layers (first to last) by ``max_heads`` heads,
    on one colour scale with one colour bar; query positions down, key positions across."""
    names = list(maps)
    if len(names) > max_layers:
        names = [names[round(i * (len(names) - 1) / (max_layers - 1))] for i in range(max_layers)]
    heads = min(max_heads, max(maps[n].shape[1] for n in names))
    shown = [maps[n][0, h] for n in names for h in range(min(heads, maps[n].shape[1]))]  # each (L, S)
    finite = [w[torch.isfinite(w)] for w in shown]
    vmax = max((float(w.max()) for w in finite if w.numel()), default=1.0)  # one scale, so one colour bar
    fig = new_figure(2.2 * heads + 0.8, 2.2 * len(names))
    axes = fig.subplots(len(names), heads, squeeze=False)
    for row, name in enumerate(names):
        for h in range(heads):
            ax = axes[row][h]
            if h >= maps[name].shape[1]:
                ax.set_axis_off()  # this layer has fewer heads than the widest one shown
                continue
            image = ax.imshow(maps[name][0, h].numpy(), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
            ax.set_title(f"{name}\nhead {h}", fontsize=7)
            _position_axes(ax, xlabel=row == len(names) - 1, ylabel=h == 0)
    fig.colorbar(image, ax=axes, label="attention weight", shrink=0.8)
    fig.suptitle("Attention weights, first sequence")
    return fig


def _position_axes(ax, xlabel: bool, ylabel: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=4, integer=True))  # positions are whole numbers
    ax.tick_params(labelsize=6)
    if xlabel:
        ax.set_xlabel("key position", fontsize=7)
    if ylabel:
        ax.set_ylabel("query position", fontsize=7)
