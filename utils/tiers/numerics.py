"""Tier 1's numerics: finite outputs on random and edge-case tokens, under fp32 and the AMP plan,
and parameters initialized at sane scales.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from utils.models.calls import ModelCall, preserved_state
from utils.models.profile import ModelProfile
from utils.models.tasks import TaskInfo, task_logits
from utils.tiers.inputs import MAX_NAMED, checked_inputs
from utils.tiers.report import Check
from utils.training.amp.precision import PrecisionPlan


def check_numerical_stability(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    batch_size: int = 2,
    trials: int = 3,
    max_sweep_tokens: int = 65536,
    plan: PrecisionPlan | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    task=None,
    profile: ModelProfile | None = None,
) -> Check:
    """Look for NaN/Inf outputs and for non-determinism in eval mode.

    Runs ``trials`` random batches of ``seq_len`` tokens (default: the full context; when shorter,
    one more sequence of full length, so every position is seen), then every token id alone
    (``(V, 1)`` in chunks, up to ``max_sweep_tokens`` ids, a random sample beyond) to name the
    tokens whose output is not finite, then the first batch twice to compare, and, when ``plan``
    autocasts, one small batch under it.

    Example::

        >>> check_numerical_stability(example_model("gpt-micro")).details["bad_tokens"]
        []
    """
    spec, info, calling = checked_inputs(model, profile, task, vocab_size, max_seq_len, f"check_numerical_stability({type(model).__name__})")
    gen = torch.Generator().manual_seed(seed)
    length = min(seq_len or spec.max_seq_len, spec.max_seq_len)
    batches = [spec.random_ids(batch_size, length, gen) for _ in range(trials)]
    if length < spec.max_seq_len:
        batches.append(spec.random_ids(1, spec.max_seq_len, gen))
    trials = len(batches)
    problems, details = [], {}
    with preserved_state(model), torch.no_grad():
        model.eval()
        outs = [task_logits(model, ids, info, calling) for ids in batches]
        bad_trials = [i for i, out in enumerate(outs) if not torch.isfinite(out).all()]
        if bad_trials:
            problems.append(f"{len(bad_trials)} of {trials} random batches give NaN/Inf")
        details["max_abs_output"] = max(float(o.float().abs().nan_to_num(0.0, 0.0, 0.0).max()) for o in outs)
        bad_tokens, swept = _sweep_tokens(model, spec, max_sweep_tokens, gen, info, calling)
        details.update(bad_tokens=bad_tokens[:MAX_NAMED], tokens_swept=swept)
        if bad_tokens:
            problems.append(f"{len(bad_tokens)} token id(s) alone give NaN/Inf, e.g. {bad_tokens[:5]}")
        diff = (task_logits(model, batches[0], info, calling).float() - outs[0].float()).abs().nan_to_num(0.0).max()
        details["eval_repeat_max_diff"] = float(diff)
        if diff > 1e-6 * max(1.0, details["max_abs_output"]):
            problems.append(f"eval mode is not deterministic: the same batch twice differs by {float(diff):.3g}")
        if plan is not None and plan.autocast_dtype is not None:
            details.update(_autocast_finite(model, batches[0][:1, :16], plan, info, calling))
            if not details["autocast_finite"]:
                problems.append(f"under {plan.name} the output has NaN/Inf")
    if problems:
        return Check("numerical_stability", False, "; ".join(problems) + ".", details)
    return Check("numerical_stability", True,
                 f"Finite outputs on {trials} random batches and {_swept(swept, spec.vocab_size)} alone; eval is "
                 f"deterministic; largest |output| {details['max_abs_output']:.3g}.", details)


def _swept(swept: int, vocab_size: int) -> str:
    return f"all {swept} token ids" if swept >= vocab_size else f"{swept} of {vocab_size} token ids (a random sample)"


def _sweep_tokens(model: nn.Module, spec, max_tokens: int, gen: torch.Generator, info: TaskInfo, calling: ModelCall,
                  chunk: int = 1024) -> tuple[list[int], int]:
    """Token ids whose one-token input gives a non-finite output; and how many ids were tried."""
    if spec.vocab_size <= max_tokens:
        ids = torch.arange(spec.vocab_size)
    else:  # a huge vocabulary: a random sample of it
        ids = torch.randperm(spec.vocab_size, generator=gen)[:max_tokens].sort().values
    bad = []
    for part in ids.split(chunk):
        out = task_logits(model, part.view(-1, 1).to(spec.device), info, calling)  # (n, 1, V) or (n, C)
        finite = torch.isfinite(out.reshape(len(part), -1)).all(dim=1).cpu()
        bad += part[~finite].tolist()
    return bad, len(ids)


def _autocast_finite(model: nn.Module, ids: torch.Tensor, plan: PrecisionPlan, info: TaskInfo, calling: ModelCall) -> dict:
    with plan.autocast():
        out = task_logits(model, ids, info, calling)
    return {"autocast_precision": plan.name, "autocast_finite": bool(torch.isfinite(out).all())}


# ----------------------------------------------------------------------------------------------
# Initialization


def check_initialization(
    model: nn.Module,
    *,
    max_gain: float = 10.0,
    max_embedding_std: float = 10.0,
    max_abs_vector: float = 100.0,
) -> Check:
    """Per-parameter statistics; name the outliers.

    A weight matrix is an outlier when its ``std * sqrt(fan_in)`` (its gain: about 0.3-2 for
    PyTorch's defaults, GPT-2's 0.02 and Kaiming/Xavier) exceeds ``max_gain``; an embedding when
    its std exceeds ``max_embedding_std``; a vector (bias, norm scale) when a value exceeds
    ``max_abs_vector``; anything holding NaN/Inf. Constant matrices are noted, not failed (some
    schemes zero-initialize output projections on purpose).

    Example::

        >>> check_initialization(example_model("gpt-micro")).details["outliers"]
        {}
    """
    layers, outliers, constant, seen = {}, {}, [], set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied weight is reported once, under its first owner
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            stats = _param_stats(module, pname, p)
            layers[name] = stats
            reason = _init_outlier(stats, max_gain, max_embedding_std, max_abs_vector)
            if reason:
                outliers[name] = reason
            elif stats["std"] == 0.0 and p.dim() >= 2:
                constant.append(name)
    details = {"layers": layers, "outliers": outliers, "constant_matrices": constant[:MAX_NAMED]}
    if outliers:
        first = next(iter(outliers))
        return Check("initialization", False,
                     f"{len(outliers)} parameter(s) initialized out of range, e.g. {first}: {outliers[first]}.",
                     details)
    note = f" Constant (e.g. zero) matrices: {', '.join(constant[:5])}." if constant else ""
    return Check("initialization", True, f"All {len(layers)} parameters are finite and in range.{note}", details)


def _param_stats(module: nn.Module, pname: str, p: torch.Tensor) -> dict:
    w = p.detach().float()
    kind = "embedding" if isinstance(module, nn.Embedding) else ("matrix" if p.dim() >= 2 else "vector")
    # One pass for std and mean, one for the extremes (NaN propagates to them): a 124M model's
    # 38M-value embedding read 4 times was a second of Tier 1 on a CPU.
    std, mean = torch.std_mean(w) if w.numel() > 1 else (torch.zeros(()), w.sum())
    low, high = (float(v) for v in torch.aminmax(w)) if w.numel() else (0.0, 0.0)
    stats = {"kind": kind, "shape": tuple(p.shape), "mean": float(mean), "std": float(std),
             "abs_max": max(abs(low), abs(high)), "finite": math.isfinite(low) and math.isfinite(high)}
    if kind == "matrix":
        # transformers' Conv1D stores (in, out); everything else (Linear, MHA, conv) stores out first.
        fan_in = p.shape[0] if type(module).__name__ == "Conv1D" else p[0].numel()
        stats["gain"] = stats["std"] * math.sqrt(fan_in)
    return stats


def _init_outlier(stats: dict, max_gain: float, max_embedding_std: float, max_abs_vector: float) -> str:
    if not stats["finite"]:
        return "holds NaN/Inf"
    if stats["kind"] == "matrix" and stats["gain"] > max_gain:
        return f"std {stats['std']:.3g} gives gain std*sqrt(fan_in) = {stats['gain']:.3g} > {max_gain}"
    if stats["kind"] == "embedding" and stats["std"] > max_embedding_std:
        return f"embedding std {stats['std']:.3g} > {max_embedding_std}"
    if stats["kind"] == "vector" and stats["abs_max"] > max_abs_vector:
        return f"a value of magnitude {stats['abs_max']:.3g} > {max_abs_vector}"
    return ""
