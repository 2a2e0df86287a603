"""Tier 2: how the model's attention behaves, and how robust its outputs are.

Attention weights are captured from ``nn.MultiheadAttention`` (asked for its weights), from
Hugging Face models (``output_attentions=True``), from any call to
``F.scaled_dot_product_attention`` (the weights recomputed from its ``q`` and ``k``) and from any
softmax over the key axis of a ``(B, H, T, T)`` or ``(B*H, T, T)`` score (attention written by
hand, with ``@`` or ``einsum``), without changing the model.

Example::

    >>> report = run_tier2(example_model("gpt-micro"))
    >>> report["attention_patterns"].details["source"]
    'F.scaled_dot_product_attention'
    >>> report["attention_patterns"].details["causal"]
    True
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from utils.models.calls import preserved_state
from utils.models.profile import ModelProfile, look_at
from utils.models.sizes import find_input_embedding
from utils.models.tasks import (
    CAUSAL_LM,
    earlier_positions_unchanged,
    logits_network,
)
from utils.tiers.attention import check_attention_patterns
from utils.tiers.inputs import analyzed_length, causality_words, checked_inputs, float_logits
from utils.tiers.report import Check, Report, run_checks


def run_tier2(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    device=None,
    seq_len: int | None = None,
    batch_size: int = 2,
    figures: bool = True,
    trained: bool | None = None,
    seed: int = 0,
    task: str | None = None,
    progress: bool = True,
) -> Report:
    """Run every Tier 2 check on a model: attention patterns, then robustness.

    Example::

        >>> report = run_tier2(example_model("encoder-classifier"))
        >>> [c.name for c in report.checks]
        ['attention_patterns', 'token_substitution', 'embedding_noise', 'batch_consistency']

    Args:
        model: maps token ids ``(B, T)`` to logits (a tensor, tuple, dict or ``ModelOutput``).
        vocab_size, max_seq_len: default None: found from the model (see ``utils.models.sizes.input_spec``).
        device: default None: where the model already is. Otherwise the model is moved there.
        seq_len: the length analyzed (default ``min(max_seq_len, 32)``).
        batch_size: sequences per check (default 2; the consistency check uses at least 3).
        figures: draw the attention heatmaps (default True).
        trained: whether the model has been trained, which decides whether uniform attention heads
            fail (see :func:`check_attention_patterns`). Default None: inferred by :func:`looks_trained`.
        seed: for the random inputs and noise (default 0).
        task: what the model predicts (default None: detected, see :func:`utils.models.tasks.detect_task`).
            For a masked LM, a classifier or an encoder-decoder, seeing later tokens is reported as
            the property it is, not as a defect.
        progress: show a ``tqdm.auto`` bar naming the check being run (default True).

    Raises:
        ValueError: the model takes no token ids, or a bad size or task.
    """
    call = f"run_tier2({type(model).__name__})"
    if device is not None:
        model.to(device)
    profile = look_at(model, task, vocab_size=vocab_size, max_seq_len=max_seq_len, call=call)  # the one look
    network = logits_network(model, call, own_loss=profile.returns_loss)  # a loss wrapper: through its network
    if network.module is not model:  # the network is the model these checks look at
        profile = look_at(network.module, task, vocab_size=vocab_size, max_seq_len=max_seq_len, call=call)
    model = network.module
    spec, info = profile.spec(), profile.task
    kw = dict(seq_len=seq_len, seed=seed, task=info, profile=profile)  # every check reads the model from this look
    checks = run_checks(f"Tier 2: {type(model).__name__}", [
        ("attention_patterns", lambda: check_attention_patterns(
            model, batch_size=batch_size, trained=trained, figure=figures, **kw)),
        ("token_substitution", lambda: check_token_substitution(model, batch_size=batch_size, **kw)),
        ("embedding_noise", lambda: check_embedding_noise(model, batch_size=batch_size, **kw)),
        ("batch_consistency", lambda: check_batch_consistency(model, batch_size=max(batch_size, 3), **kw)),
    ], progress)
    about = {"model": type(model).__name__, "task": info.describe(), "vocab_size": spec.vocab_size,
             "seq_len": analyzed_length(spec, seq_len), "device": str(spec.device)}
    if network.note:
        about["checked_through"] = network.note
    return Report(f"Tier 2: {type(model).__name__}", checks, info=about)


# ----------------------------------------------------------------------------------------------
# Robustness


def check_token_substitution(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 2,
    seed: int = 0,
    task=None,
    profile: ModelProfile | None = None,
) -> Check:
    """Change one random token per sequence and measure how much the output moves.

    Reports the relative change ``||y' - y|| / ||y||``, for per-token outputs the share of
    positions whose top prediction flips, and whether positions *before* the change stay exactly
    as they were (a causal model's must). Fails when the output is not finite or does not change
    at all (the model ignores its input).

    Example::

        >>> check_token_substitution(example_model("gpt-micro")).details["earlier_positions_unchanged"]
        True
    """
    spec, info, calling = checked_inputs(model, profile, task, vocab_size, max_seq_len, f"check_token_substitution({type(model).__name__})")
    gen = torch.Generator().manual_seed(seed)
    t = analyzed_length(spec, seq_len)
    ids = spec.random_ids(batch_size, t, gen)
    rows = torch.arange(batch_size)
    where = torch.randint(0, t, (batch_size,), generator=gen)
    changed = ids.clone()
    shift = torch.randint(1, max(spec.vocab_size, 2), (batch_size,), generator=gen).to(ids.device)
    changed[rows, where] = (ids[rows, where] + shift) % spec.vocab_size  # always a different token
    with preserved_state(model), torch.no_grad():
        model.eval()
        y, y2 = float_logits(model, ids, info, calling), float_logits(model, changed, info, calling)
    if not (torch.isfinite(y).all() and torch.isfinite(y2).all()):
        return Check("token_substitution", False, "The output has NaN/Inf on random or substituted tokens.", {})
    rel = ((y2 - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1).clamp_min(1e-12)).tolist()
    details = {"positions_changed": where.tolist(), "relative_change": [round(r, 5) for r in rel]}
    if y.dim() >= 3 and y.shape[1] == t:
        details.update(_per_token_effects(y, y2, where))
    if max(rel) == 0.0:
        return Check("token_substitution", False,
                     "The output does not change when a token changes: the model ignores its input.", details)
    summary = f"One token changed per sequence moves the output by {sum(rel) / len(rel):.1%} on average"
    if "top1_flipped" in details:
        summary += f"; {details['top1_flipped']:.1%} of top-1 predictions from there on flip"
    causal = details.get("earlier_positions_unchanged")
    if causal is not None:
        summary += f"; earlier positions {'unchanged' if causal else 'change too'} ({causality_words(causal, info)})"
    if causal is False and info.task == CAUSAL_LM:
        return Check("token_substitution", False,
                     f"{summary}: a causal LM whose earlier positions see later tokens reads each answer in "
                     f"next-token training (task {info.describe()}).", details)
    return Check("token_substitution", True, summary + ".", details)


def _per_token_effects(y: torch.Tensor, y2: torch.Tensor, where: torch.Tensor) -> dict:
    after = torch.arange(y.shape[1])[None, :] >= where.cpu()[:, None]  # (B, T)
    flipped = (y2.argmax(-1) != y.argmax(-1)).cpu()  # (B, T)
    return {
        # The causality probe's reading (utils.models.tasks); None when every change was at position 0.
        "earlier_positions_unchanged": earlier_positions_unchanged(y, y2, where),
        "top1_flipped": float(flipped[after].float().mean()),
    }


def check_embedding_noise(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 2,
    noise_levels: tuple[float, ...] = (0.01, 0.1),
    seed: int = 0,
    task=None,
    profile: ModelProfile | None = None,
) -> Check:
    """Add Gaussian noise to the input embedding's output (at each level times its std) and measure
    the relative output change. Fails on NaN/Inf; skipped when there is no input embedding.

    Example::

        >>> sorted(check_embedding_noise(example_model("gpt-micro")).details["relative_change"])
        [0.01, 0.1]
    """
    spec, info, calling = checked_inputs(model, profile, task, vocab_size, max_seq_len, f"check_embedding_noise({type(model).__name__})")
    embedding = profile.embedding if profile is not None else find_input_embedding(model)
    if embedding is None:
        return Check("embedding_noise", True, "No input embedding found (no nn.Embedding): nothing to perturb.",
                     {}, skipped=True)
    gen = torch.Generator().manual_seed(seed)
    ids = spec.random_ids(batch_size, analyzed_length(spec, seq_len), gen)
    changes, finite = {}, True
    with preserved_state(model), torch.no_grad():
        model.eval()
        y = float_logits(model, ids, info, calling)
        for level in noise_levels:
            with _noisy(embedding, level, gen):
                y2 = float_logits(model, ids, info, calling)
            finite &= bool(torch.isfinite(y2).all())
            changes[level] = float((y2 - y).norm() / y.norm().clamp_min(1e-12)) if finite else math.inf
    details = {"embedding": type(embedding).__name__, "relative_change": changes}
    if not finite or not torch.isfinite(y).all():
        return Check("embedding_noise", False, "Noise on the input embedding makes the output NaN/Inf.", details)
    pairs = ", ".join(f"{level:g} noise -> {change:.2%}" for level, change in changes.items())
    return Check("embedding_noise", True, f"Relative output change under embedding noise: {pairs}.", details)


@contextlib.contextmanager
def _noisy(embedding: nn.Module, level: float, gen: torch.Generator):
    def add_noise(module, args, out):
        noise = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
        return out + level * out.float().std().to(out.dtype) * noise

    handle = embedding.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


def check_batch_consistency(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 3,
    rtol: float = 1e-4,
    seed: int = 0,
    task=None,
    profile: ModelProfile | None = None,
) -> Check:
    """Each sequence's output must not depend on the rest of the batch: compare a batch with each
    sequence alone and with the batch reversed. Fails (naming the sequences) beyond ``rtol`` of the
    output's scale, e.g. for a model that normalizes across the batch in eval mode.

    Example::

        >>> check_batch_consistency(example_model("gpt-micro")).passed
        True
    """
    spec, info, calling = checked_inputs(model, profile, task, vocab_size, max_seq_len, f"check_batch_consistency({type(model).__name__})")
    ids = spec.random_ids(batch_size, analyzed_length(spec, seq_len), torch.Generator().manual_seed(seed))
    with preserved_state(model), torch.no_grad():
        model.eval()
        y = float_logits(model, ids, info, calling)
        alone = torch.cat([float_logits(model, ids[i:i + 1], info, calling) for i in range(batch_size)])
        reversed_ = float_logits(model, ids.flip(0), info, calling).flip(0)
    scale = max(float(y.abs().max()), 1e-12)
    alone_diff = ((alone - y).flatten(1).abs().amax(1) / scale).tolist()
    reversed_diff = float((reversed_ - y).abs().max()) / scale
    details = {"relative_diff_alone": alone_diff, "relative_diff_reversed": reversed_diff, "rtol": rtol}
    bad = [i for i, d in enumerate(alone_diff) if not d <= rtol]
    if bad or not reversed_diff <= rtol:
        worst = max(alone_diff + [reversed_diff])
        return Check("batch_consistency", False,
                     f"Outputs depend on the rest of the batch: sequence(s) {bad or 'all (reversed)'} differ "
                     f"by up to {worst:.3g} of the output's scale (rtol {rtol}).", details)
    return Check("batch_consistency", True,
                 f"Each of {batch_size} sequences gives the same output alone and in a reversed batch "
                 f"(within {max(alone_diff + [reversed_diff]):.2g} of the output's scale).", details)
