"""Tier 1: does the model work at all? Shapes, gradients, numerics, initialization, memory, speed.

Every check takes any ``nn.Module`` that maps token ids ``(B, T)`` to logits (a tensor, a tuple,
a dict or a ``ModelOutput``), leaves the model as it found it, and returns a :class:`Check`.

Example::

    >>> report = run_tier1(example_model("gpt-micro"))
    >>> report.passed
    True
    >>> report["inference_speed"].details["fp32"]["latency_ms_median"]   # doctest: +SKIP
    {1: 1.9, 2: 2.4, 4: 3.6}
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils.common.figures import new_figure
from utils.models.calls import (
    CONTEXT_SEARCH,
    input_spec,
    model_call,
    model_device,
    preserved_state,
    short_logits_error,
)
from utils.models.tasks import TaskInfo, detect_task, logits_network, task_logits
from utils.tiers.report import Check, Report, run_checks
from utils.training.amp.measure import runs_natively, saved_tensor_bytes, synchronize
from utils.training.amp.precision import PrecisionPlan, plan_for, precision_facts, resolve_precision

DEFAULT_BATCH_SIZES = (1, 2, 4)
_MAX_NAMED = 20  # names listed in a summary or a details list before it is cut

# A model whose one full-length forward costs more than this (2 x parameters x context FLOPs) is
# measured with smaller inputs on a CPU: ~0.1-0.5 s on a 2-core CPU. GPT-2 small (124M x 1024) is
# 13x over it; the example models are thousands of times under it.
CPU_FULL_FORWARD_FLOPS = 2e10
_SHORT = 64  # the length of the "short" inputs a reduced Tier 1 uses besides the full context


@dataclass(frozen=True)
class Tier1Sizes:
    """What Tier 1 measures, chosen once from the model's size and device (:func:`tier1_sizes`).

    Example::

        >>> tier1_sizes(example_model("gpt-micro"), input_spec(example_model("gpt-micro"))).reduced   # doctest: +SKIP
        False

    Attributes:
        reduced: measure with smaller inputs: every length at the smallest batch, the larger batches
            at short lengths, one full-length batch for numerics, a sample of token ids, memory
            measured at one batch and scaled, speed at a short length.
        reason: why, in words (empty when not reduced).
    """

    reduced: bool = False
    reason: str = ""

    def shapes(self) -> dict:
        return {"max_tokens": 4 * _SHORT} if self.reduced else {}

    def numerics(self) -> dict:
        return {"trials": 2, "seq_len": _SHORT, "max_sweep_tokens": 512} if self.reduced else {}

    def memory(self, batch_sizes) -> dict:
        return {"measured_batch_sizes": (min(batch_sizes),)} if self.reduced else {}

    def speed(self) -> dict:
        return {"seq_len": _SHORT // 2, "repeats": 3} if self.reduced else {}


def tier1_sizes(model: nn.Module, spec) -> Tier1Sizes:
    """Reduced sizes when one full-length forward of ``model`` on a CPU costs more than
    :data:`CPU_FULL_FORWARD_FLOPS`; the full sizes otherwise (any GPU, any small model)."""
    params = sum(p.numel() for p in model.parameters())
    flops = 2 * params * spec.max_seq_len
    if spec.device.type != "cpu" or flops <= CPU_FULL_FORWARD_FLOPS:
        return Tier1Sizes()
    return Tier1Sizes(True, f"{params / 1e6:,.0f}M parameters at a context of {spec.max_seq_len} on a CPU: one "
                            f"full-length forward is {flops:.1e} FLOPs, so the checks use the full length once "
                            f"each and short inputs ({_SHORT} tokens) otherwise")


def run_tier1(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    device=None,
    precision="auto",
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    figures: bool = True,
    seed: int = 0,
    task: str | None = None,
    progress: bool = True,
) -> Report:
    """Run every Tier 1 check on a model.

    Example::

        >>> report = run_tier1(example_model("gpt-micro"))
        >>> [c.name for c in report.checks]
        ['shape_robustness', 'gradient_flow', 'numerical_stability', 'initialization', 'memory_footprint', 'inference_speed']

    Args:
        model: maps token ids ``(B, T)`` to logits ``(B, T, V)``, ``(B, C)`` or similar.
        vocab_size: default None: found from the model (config, input embedding).
        max_seq_len: default None: the model's context length, or 64 when it has none.
        device: default None: where the model already is. Otherwise the model is moved there.
        precision: the AMP plan to compare with fp32, through
            :func:`~utils.training.amp.precision.resolve_precision` (default ``"auto"``).
        batch_sizes: batch sizes for shapes, memory and speed (default ``(1, 2, 4)``).
        figures: draw matplotlib figures (default True).
        seed: for the random inputs (default 0).
        task: what the model predicts (default None: detected, see :func:`utils.models.tasks.detect_task`);
            an encoder-decoder is called with the ids shifted right as its decoder inputs.
        progress: show a ``tqdm.auto`` bar naming the check being run (default True).

    A model whose forward returns its own loss (``loss = model(seq)``) is checked through the
    network it wraps (see :func:`utils.models.tasks.logits_network`), and the report says so.

    Raises:
        ValueError: the model takes no token ids, or a bad size, precision or task; it returns a
            loss and holds no network that returns logits.

    .. note::
        Cost: about 40 forward passes of up to ``max(batch_sizes) x max_seq_len`` tokens and one
        backward pass. A few seconds for ``example_model("gpt-micro")`` on a laptop CPU. A model
        too big for that on a CPU (see :func:`tier1_sizes`) is measured with smaller inputs, and
        the report's ``sizes`` line says so: under a minute for a 124M GPT on a 2-core CPU.
    """
    call = f"run_tier1({type(model).__name__})"
    if device is not None:
        model.to(device)
    network = logits_network(model, call)  # a loss-returning wrapper is checked through its network
    model = network.module
    spec = input_spec(model, vocab_size, max_seq_len, call=call)
    plan = resolve_precision(precision, device=spec.device)
    info, task_note = _tier_task(model, task, vocab_size, max_seq_len, call)
    sizes = tier1_sizes(model, spec)
    # The checks resolve the same spec again (cheap), so each knows where its context came from.
    kw = dict(vocab_size=vocab_size, max_seq_len=max_seq_len, seed=seed, task=info)
    checks = run_checks(f"Tier 1: {type(model).__name__}", [
        ("shape_robustness", lambda: check_shapes(model, batch_sizes=batch_sizes, **sizes.shapes(), **kw)),
        ("gradient_flow", lambda: check_gradient_flow(model, figure=figures, **kw)),
        ("numerical_stability", lambda: check_numerical_stability(model, plan=plan, **sizes.numerics(), **kw)),
        ("initialization", lambda: check_initialization(model)),
        ("memory_footprint", lambda: check_memory(
            model, batch_sizes=batch_sizes, plan=plan, figure=figures, **sizes.memory(batch_sizes), **kw)),
        ("inference_speed", lambda: check_inference_speed(
            model, batch_sizes=batch_sizes, plan=plan, figure=figures, **sizes.speed(), **kw)),
    ], progress)
    info = _model_info(model, spec, plan) | {"task": task_note}
    if sizes.reduced:
        info["sizes"] = sizes.reason
    return Report(f"Tier 1: {type(model).__name__}", checks, info=info | _through(network))


def _through(network) -> dict:
    """The report line saying a loss-returning wrapper was checked through its network."""
    return {"checked_through": network.note} if network.note else {}


def _model_info(model: nn.Module, spec, plan: PrecisionPlan) -> dict:
    context = f"{spec.max_seq_len}" + {"model": " (from the model)", "argument": " (given)",
                                       "default": " (the model has no fixed context; default)"}[spec.context_from]
    return {
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": spec.vocab_size,
        "max_seq_len": context,
        "device": str(spec.device),
        "precision": plan.describe(),
        "calling": model_call(model).describe(),
    }


def _seq_grid(max_seq_len: int) -> list[int]:
    """1, 2, a quarter, a half and all of the context: the edges and the middle."""
    return sorted({n for n in (1, 2, max_seq_len // 4, max_seq_len // 2, max_seq_len) if n >= 1})


def _forward(model: nn.Module, ids: torch.Tensor, info: TaskInfo | None = None) -> torch.Tensor:
    return task_logits(model, ids, info)


def _tier_task(model: nn.Module, task, vocab_size, max_seq_len, call: str) -> tuple:
    """``(task for the checks, one line for the report)``. When the probe call itself raises, the
    checks get ``task`` as given and each reports the model's error (run_check), as without it."""
    try:
        info = _task(model, task, vocab_size, max_seq_len, call)
    except ValueError:
        raise
    except Exception as e:  # the model's own failure: the checks that call it report it one by one
        return task, f"not detected: calling the model raised {type(e).__name__}"
    return info, info.describe()


def _task(model: nn.Module, task, vocab_size, max_seq_len, call: str) -> TaskInfo:
    """The model's task: as given (a ``TaskInfo`` from :func:`run_tier1`), else detected."""
    if isinstance(task, TaskInfo):
        return task
    return detect_task(model, task, vocab_size=vocab_size, max_seq_len=max_seq_len, call=call)


# ----------------------------------------------------------------------------------------------
# Shapes


def check_shapes(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    max_tokens: int | None = None,
    seed: int = 0,
    task=None,
) -> Check:
    """Run every batch size against sequence lengths from 1 to the maximum, and edge-case tokens.

    Fails when a forward raises, the output's first dimension is not the batch, a per-token output
    ``(B, T, ...)`` has the wrong length, or the trailing dimensions change with the input.

    Args:
        max_tokens: default None: every batch size at every length. Else the lengths are 1, 2, 64, a
            quarter and all of the context; the smallest batch size runs each, the larger ones only
            inputs of at most this many tokens, and the edge-case tokens run at a length of 64.

    Example::

        >>> check_shapes(example_model("gpt-micro")).details["output"]   # doctest: +SKIP
        '(B, T, 256)'
    """
    spec = input_spec(model, vocab_size, max_seq_len, call=f"check_shapes({type(model).__name__})")
    info = _task(model, task, vocab_size, max_seq_len, f"check_shapes({type(model).__name__})")
    gen = torch.Generator().manual_seed(seed)
    long = spec.max_seq_len
    grid, edge = _seq_grid(long), long
    if max_tokens is not None:  # the edges, a quarter and all of the context; short inputs besides
        grid = sorted({n for n in (1, 2, min(_SHORT, long), long // 4, long) if n >= 1})
        edge = min(long, _SHORT, max_tokens)
    cases = [(f"({b}, {t})", spec.random_ids(b, t, gen)) for b in batch_sizes for t in grid
             if max_tokens is None or b == min(batch_sizes) or b * t <= max_tokens]
    cases += [(f"(1, {edge}) all id {i}", torch.full((1, edge), i, device=spec.device))
              for i in (0, spec.vocab_size - 1)]
    problems, shapes, trailing = [], {}, set()
    with preserved_state(model), torch.no_grad():
        model.eval()
        for key, ids in cases:
            b, t = ids.shape
            try:
                out = _forward(model, ids, info)
            except Exception as e:  # a shape the model cannot take is the finding itself
                problems.append(f"input {key} raised {type(e).__name__}: {e}{_default_context_hint(spec)}")
                continue
            if error := short_logits_error(model, out, t):  # the inference shortcut, under another name
                problems.append(f"input {key}: {error}")
                continue
            shapes[key] = tuple(out.shape)
            problems += _shape_problems(key, out, b, t)
            trailing.add(tuple(out.shape[2:] if out.dim() >= 3 and out.shape[1] == t else out.shape[1:]))
    if len(trailing) > 1:
        problems.append(f"the output's trailing dimensions change with the input: {sorted(trailing)}")
    details = {"inputs_tried": len(cases), "output_shapes": shapes,
               "too_long_input": _too_long_behaviour(model, spec, info)}
    if problems:
        details["problems"] = problems[:_MAX_NAMED]
        return Check("shape_robustness", False, f"{len(problems)} shape problem(s); first: {problems[0]}.", details)
    per_token = all(len(s) >= 3 for s in shapes.values())
    details["output"] = ("(B, T, " if per_token else "(B, ") + ", ".join(map(str, next(iter(trailing)))) + ")"
    return Check("shape_robustness", True,
                 f"All {len(cases)} inputs (batch {min(batch_sizes)}-{max(batch_sizes)}, length 1-{long}, "
                 f"ids 0 and {spec.vocab_size - 1}) give {details['output']}.", details)


def _default_context_hint(spec) -> str:
    if spec.context_from != "default":
        return ""
    return (f" (the context length {spec.max_seq_len} is a default: none of {CONTEXT_SEARCH} was found; "
            f"pass max_seq_len=)")


def _shape_problems(key: str, out: torch.Tensor, b: int, t: int) -> list[str]:
    if out.dim() == 0 or out.shape[0] != b:
        return [f"input {key} gave output {tuple(out.shape)}: the first dimension is not the batch size {b}"]
    if out.dim() >= 3 and out.shape[1] != t:
        return [f"input {key} gave output {tuple(out.shape)}: per-token output of length {out.shape[1]}, not {t}"]
    return []


def _too_long_behaviour(model: nn.Module, spec, info: TaskInfo) -> str:
    """What an input one token longer than the context does: informative, not pass/fail."""
    if spec.context_from != "model":
        return ("not tried: the model has no fixed context" if spec.context_from == "default"
                else "not tried: max_seq_len was given")
    with preserved_state(model), torch.no_grad():
        model.eval()
        try:
            _forward(model, torch.zeros(1, spec.max_seq_len + 1, dtype=torch.long, device=spec.device), info)
        except Exception as e:  # raising is the good outcome here
            return f"refused ({type(e).__name__})"
    return "accepted (the model does not enforce its context length)"


# ----------------------------------------------------------------------------------------------
# Gradients


def check_gradient_flow(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    batch_size: int = 2,
    seq_len: int | None = None,
    vanishing_below: float = 1e-7,
    exploding_above: float = 1e3,
    figure: bool = True,
    seed: int = 0,
    task=None,
) -> Check:
    """One forward and backward in train mode; name parameters whose gradient is missing, zero,
    vanishing (norm below ``vanishing_below``), exploding (above ``exploding_above``) or not finite.

    The loss is cross-entropy against random targets over the output's last dimension, so every
    parameter that shapes the logits should get a gradient. Frozen parameters are listed, not failed.

    Example::

        >>> check_gradient_flow(example_model("gpt-micro")).passed
        True
    """
    spec = input_spec(model, vocab_size, max_seq_len, call=f"check_gradient_flow({type(model).__name__})")
    info = _task(model, task, vocab_size, max_seq_len, f"check_gradient_flow({type(model).__name__})")
    gen = torch.Generator().manual_seed(seed)
    ids = spec.random_ids(batch_size, min(seq_len or 32, spec.max_seq_len), gen)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    with preserved_state(model):
        model.train()
        for _, p in params:
            p.grad = None
        logits = _forward(model, ids, info)
        if not logits.requires_grad:
            return Check("gradient_flow", False,
                         "The output does not depend on any trainable parameter: no gradient reaches the model.",
                         {"trainable_parameters": len(params), "frozen": frozen[:_MAX_NAMED]})
        _surrogate_loss(logits, gen).backward()
        norms = {n: (None if p.grad is None else float(p.grad.detach().float().norm())) for n, p in params}
    groups = _classify_grad_norms(norms, vanishing_below, exploding_above)
    inert = _inert_parameters(model, ids, info, dict(params), norms, groups, vanishing_below, gen)
    bad = {k: v for k, v in groups.items() if v}
    details = {"grad_norms": norms, "frozen": frozen[:_MAX_NAMED], "inert_by_design": inert,
               **{k: v[:_MAX_NAMED] for k, v in bad.items()}}
    fig = _grad_norm_figure(norms, groups) if figure else None
    if bad:
        first = next(iter(bad))
        summary = "; ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in bad.items())
        return Check("gradient_flow", False,
                     f"{summary} (of {len(params)} trainable parameters), e.g. {first.replace('_', ' ')}: "
                     f"{', '.join(bad[first][:5])}.", details, fig)
    return Check("gradient_flow", True, _flow_summary(norms, inert), details, fig)


def _flow_summary(norms: dict, inert: dict) -> str:
    learning = [v for n, v in norms.items() if n not in inert]
    text = (f"All {len(learning)} {'other ' if inert else ''}trainable parameters get a finite gradient, "
            f"norms {min(learning):.2e} to {max(learning):.2e}.")
    if inert:
        text += (f" {len(inert)} inert by design (the output does not depend on them, e.g. a key bias under "
                 f"softmax): {', '.join(list(inert)[:5])}.")
    return text


_INERT_NOISE_STD = 5.0  # a perturbation far larger than any trained value
_INERT_RTOL = 1e-5  # output change that is rounding, not dependence


def _inert_parameters(model, ids, info, params: dict, norms: dict, groups: dict, vanishing_below: float,
                      gen: torch.Generator) -> dict[str, str]:
    """Move zero and vanishing gradients that are so by design out of ``groups`` (in place).

    A parameter is inert by design when it is a vector (a bias or a scale), perturbing it by
    N(0, 5²) leaves the output as it was (relative change below 1e-5), and another parameter of
    its module does learn: a key bias, which softmax cancels, is the usual one. A dead layer (every
    parameter of the module silent), a matrix fed by a dead layer, or a parameter the output does
    depend on stays a failure.
    """
    inert = {}
    for group in ("zero_gradient", "vanishing_gradient"):
        for name in list(groups[group]):
            if params[name].dim() > 1:
                continue
            owner = name.rpartition(".")[0]
            siblings = [n for n in params if n != name and n.rpartition(".")[0] == owner]
            if not any((norms[n] or 0.0) >= vanishing_below for n in siblings):
                continue
            moved = _output_change(model, ids, info, params[name], gen)
            if moved < _INERT_RTOL:
                groups[group].remove(name)
                inert[name] = (f"gradient norm {norms[name]:.1e}; perturbing it by N(0, {_INERT_NOISE_STD:g}²) "
                               f"moved the output by {moved:.1e} relative")
    return inert


def _output_change(model, ids, info, param: nn.Parameter, gen: torch.Generator) -> float:
    """Relative change of the eval-mode output when ``param`` gets N(0, 5²) noise (then restored)."""
    noise = _INERT_NOISE_STD * torch.randn(param.shape, generator=gen).to(param.device, param.dtype)
    with preserved_state(model), torch.no_grad():
        model.eval()
        y = _forward(model, ids, info).float()
        param.add_(noise)
        try:
            y2 = _forward(model, ids, info).float()
        finally:
            param.sub_(noise)
    return float((y2 - y).norm() / y.norm().clamp_min(1e-12))


def _surrogate_loss(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Cross-entropy of logits ``(..., C)`` against random classes: a loss every output feeds."""
    flat = logits.float().reshape(-1, logits.shape[-1])  # (N, C)
    targets = torch.randint(0, flat.shape[-1], (flat.shape[0],), generator=gen).to(flat.device)
    return F.cross_entropy(flat, targets)


def _classify_grad_norms(norms: dict, vanishing_below: float, exploding_above: float) -> dict[str, list[str]]:
    groups = {"no_gradient": [], "zero_gradient": [], "non_finite_gradient": [],
              "vanishing_gradient": [], "exploding_gradient": []}
    for name, norm in norms.items():
        if norm is None:
            groups["no_gradient"].append(name)
        elif not math.isfinite(norm):
            groups["non_finite_gradient"].append(name)
        elif norm == 0.0:
            groups["zero_gradient"].append(name)
        elif norm < vanishing_below:
            groups["vanishing_gradient"].append(name)
        elif norm > exploding_above:
            groups["exploding_gradient"].append(name)
    return groups


def _grad_norm_figure(norms: dict, groups: dict):
    bad = {n for names in groups.values() for n in names}
    fig = new_figure(max(6.4, 0.18 * len(norms)), 3.6)
    ax = fig.add_subplot()
    names = list(norms)
    # Missing and zero gradients are drawn at the floor, in red, so they are seen.
    floor = min([v for v in norms.values() if v and math.isfinite(v)] or [1e-12]) / 10
    heights = [norms[n] if norms[n] and math.isfinite(norms[n]) else floor for n in names]
    ax.bar(range(len(names)), heights, color=["tab:red" if n in bad else "tab:blue" for n in names])
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("gradient norm")
    ax.set_title("Gradient norm per parameter (red: missing, zero, vanishing or exploding)", fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------
# Numerics


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
    spec = input_spec(model, vocab_size, max_seq_len, call=f"check_numerical_stability({type(model).__name__})")
    info = _task(model, task, vocab_size, max_seq_len, f"check_numerical_stability({type(model).__name__})")
    gen = torch.Generator().manual_seed(seed)
    length = min(seq_len or spec.max_seq_len, spec.max_seq_len)
    batches = [spec.random_ids(batch_size, length, gen) for _ in range(trials)]
    if length < spec.max_seq_len:
        batches.append(spec.random_ids(1, spec.max_seq_len, gen))
    trials = len(batches)
    problems, details = [], {}
    with preserved_state(model), torch.no_grad():
        model.eval()
        outs = [_forward(model, ids, info) for ids in batches]
        bad_trials = [i for i, out in enumerate(outs) if not torch.isfinite(out).all()]
        if bad_trials:
            problems.append(f"{len(bad_trials)} of {trials} random batches give NaN/Inf")
        details["max_abs_output"] = max(float(o.float().abs().nan_to_num(0.0, 0.0, 0.0).max()) for o in outs)
        bad_tokens, swept = _sweep_tokens(model, spec, max_sweep_tokens, gen, info)
        details.update(bad_tokens=bad_tokens[:_MAX_NAMED], tokens_swept=swept)
        if bad_tokens:
            problems.append(f"{len(bad_tokens)} token id(s) alone give NaN/Inf, e.g. {bad_tokens[:5]}")
        diff = (_forward(model, batches[0], info).float() - outs[0].float()).abs().nan_to_num(0.0).max()
        details["eval_repeat_max_diff"] = float(diff)
        if diff > 1e-6 * max(1.0, details["max_abs_output"]):
            problems.append(f"eval mode is not deterministic: the same batch twice differs by {float(diff):.3g}")
        if plan is not None and plan.autocast_dtype is not None:
            details.update(_autocast_finite(model, batches[0][:1, :16], plan, info))
            if not details["autocast_finite"]:
                problems.append(f"under {plan.name} the output has NaN/Inf")
    if problems:
        return Check("numerical_stability", False, "; ".join(problems) + ".", details)
    return Check("numerical_stability", True,
                 f"Finite outputs on {trials} random batches and {_swept(swept, spec.vocab_size)} alone; eval is "
                 f"deterministic; largest |output| {details['max_abs_output']:.3g}.", details)


def _swept(swept: int, vocab_size: int) -> str:
    return f"all {swept} token ids" if swept >= vocab_size else f"{swept} of {vocab_size} token ids (a random sample)"


def _sweep_tokens(model: nn.Module, spec, max_tokens: int, gen: torch.Generator, info: TaskInfo,
                  chunk: int = 1024) -> tuple[list[int], int]:
    """Token ids whose one-token input gives a non-finite output; and how many ids were tried."""
    if spec.vocab_size <= max_tokens:
        ids = torch.arange(spec.vocab_size)
    else:  # a huge vocabulary: a random sample of it
        ids = torch.randperm(spec.vocab_size, generator=gen)[:max_tokens].sort().values
    bad = []
    for part in ids.split(chunk):
        out = _forward(model, part.view(-1, 1).to(spec.device), info)  # (n, 1, V) or (n, C)
        finite = torch.isfinite(out.reshape(len(part), -1)).all(dim=1).cpu()
        bad += part[~finite].tolist()
    return bad, len(ids)


def _autocast_finite(model: nn.Module, ids: torch.Tensor, plan: PrecisionPlan, info: TaskInfo) -> dict:
    with plan.autocast():
        out = _forward(model, ids, info)
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
    details = {"layers": layers, "outliers": outliers, "constant_matrices": constant[:_MAX_NAMED]}
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


# ----------------------------------------------------------------------------------------------
# Memory


def check_memory(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    plan: PrecisionPlan | None = None,
    figure: bool = True,
    measured_batch_sizes: tuple[int, ...] | None = None,
    seed: int = 0,
    task=None,
) -> Check:
    """Parameters, gradients, Adam state and activations, by batch size and by precision.

    ``measured_batch_sizes`` (default: all of ``batch_sizes``) are measured in fp32; the others are
    scaled from the largest measured one by the batch ratio (activations are per sample).

    Activations are the tensors autograd saves for backward in one train-mode forward at full
    length, measured with ``saved_tensors_hooks`` (so it works on any device). fp32 is measured at
    every batch size; the 16-bit comparison (``plan`` when it autocasts, else ``bf16-mixed``) is
    measured at batches 1 and 2 of a short length and scaled to fp32's sizes (16-bit is slow on most CPUs). Fails when fp32 training at the smallest
    batch size would not fit the device's memory.

    Example::

        >>> check_memory(example_model("gpt-micro")).details["activation_bytes"]["32-true"]   # doctest: +SKIP
        {1: 1703936, 2: 3407872, 4: 6815744}
    """
    spec = input_spec(model, vocab_size, max_seq_len, call=f"check_memory({type(model).__name__})")
    info = _task(model, task, vocab_size, max_seq_len, f"check_memory({type(model).__name__})")
    gen = torch.Generator().manual_seed(seed)
    # parameters() yields a tied weight once, so it is counted once.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    fp32_plan = _measuring_plan("32-true", spec.device)
    measured = {b: _activation_bytes(model, spec.random_ids(b, spec.max_seq_len, gen), fp32_plan, info)
                for b in (measured_batch_sizes or batch_sizes)}
    fp32 = {b: measured.get(b, _per_sample(measured, b)) for b in batch_sizes}
    activations = {"32-true": fp32}
    # The 16-bit precision worth comparing: the plan's when it autocasts (e.g. 16-mixed on a GPU
    # without bf16), otherwise bf16-mixed, to show what it would save here.
    half = plan.name if plan is not None and plan.autocast_dtype is not None else "bf16-mixed"
    activations[half] = _scaled_activations(model, spec, fp32, _measuring_plan(half, spec.device), gen, info)
    training = {name: {b: _training_bytes(name, trainable, param_bytes + buffer_bytes, act)
                       for b, act in acts.items()} for name, acts in activations.items()}
    available = _device_memory_bytes(spec.device)
    details = {"parameters": sum(p.numel() for p in model.parameters()), "trainable": trainable,
               "fp32_measured_at": sorted(measured),
               "parameter_bytes": param_bytes, "buffer_bytes": buffer_bytes,
               "activation_bytes": activations, "training_bytes_adam": training,
               "device_memory_bytes": available}
    fig = _memory_figure(training) if figure else None
    smallest = training["32-true"][min(batch_sizes)]
    if available and smallest > available:
        return Check("memory_footprint", False,
                     f"fp32 training at batch {min(batch_sizes)} needs about {_mib(smallest)}, more than "
                     f"the {_mib(available)} of {spec.device}.", details, fig)
    big = max(batch_sizes)
    return Check("memory_footprint", True,
                 f"{details['parameters']:,} parameters ({_mib(param_bytes)}); fp32 training with Adam at "
                 f"batch {big} x {spec.max_seq_len} needs about {_mib(training['32-true'][big])}, "
                 f"{half} about {_mib(training[half][big])}.", details, fig)


def _per_sample(measured: dict[int, int], batch_size: int) -> int:
    """Activation bytes at ``batch_size``, scaled from the largest measured batch."""
    b = max(measured)
    return measured[b] * batch_size // b


def _measuring_plan(name: str, device: torch.device) -> PrecisionPlan:
    """``name``'s plan on ``device`` from :func:`plan_for`: the memory check reports what a precision
    would hold on this device even where :func:`resolve_precision` would warn about its speed."""
    return plan_for(name, device, reason="Tier 1's memory check measures it.")


def _scaled_activations(model: nn.Module, spec, fp32: dict, plan: PrecisionPlan, gen, info) -> dict[int, int]:
    """Activation bytes under ``plan``'s autocast, from two short measurements instead of full ones
    (16-bit matmuls can be 100x slower than fp32 on a CPU without native support).

    Batches of 1 and 2 give the per-sample ratio to fp32 and a constant part (the cached 16-bit
    weight copies autocast keeps for backward); fp32's full-size measurements are scaled by them.
    """
    short = spec.random_ids(2, min(spec.max_seq_len, 16), gen)
    fp32_plan = _measuring_plan("32-true", spec.device)
    f1, f2 = (_activation_bytes(model, short[:n], fp32_plan, info) for n in (1, 2))
    l1, l2 = (_activation_bytes(model, short[:n], plan, info) for n in (1, 2))
    ratio = (l2 - l1) / max(f2 - f1, 1)
    constant = max(l1 - ratio * f1, 0)
    return {b: int(ratio * v + constant) for b, v in fp32.items()}


def _activation_bytes(model: nn.Module, ids: torch.Tensor, plan: PrecisionPlan, info: TaskInfo) -> int:
    """Bytes autograd saves in one train-mode forward of ``ids`` to the logits (no loss), parameters
    left out. Autocast's 16-bit weight copies count here too: like activations, they are memory a
    training step holds beyond the weights (the constant part :func:`_scaled_activations` finds)."""
    saved = saved_tensor_bytes(model, ids, plan, loss_fn=lambda m, x: _forward(m, x, info))
    return saved.activations + saved.weight_copies


def _training_bytes(precision: str, trainable: int, weight_bytes: int, activation_bytes: int) -> int:
    """Weights + gradients + Adam's two moments + activations, for one training step."""
    size = precision_facts(precision).param_dtype.itemsize  # "-true": weights, gradients, moments in 16 bits
    return weight_bytes * size // 4 + trainable * size * 3 + activation_bytes


def _device_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _memory_figure(training: dict):
    fig = new_figure()
    ax = fig.add_subplot()
    for name, by_batch in training.items():
        ax.plot(list(by_batch), [v / 2**20 for v in by_batch.values()], marker="o", label=name)
    _batch_size_axis(ax, [b for by_batch in training.values() for b in by_batch])
    ax.set_ylabel("MiB (weights + grads + Adam + activations)")
    ax.set_title("Training memory by batch size and precision")
    ax.legend()
    return fig


def _batch_size_axis(ax, batch_sizes) -> None:
    """Ticks at the measured batch sizes only (a count has no 1.5); a log2 axis when they span 8x or more."""
    from matplotlib.ticker import NullLocator

    ticks = sorted(set(batch_sizes))
    if ticks[-1] >= 8 * ticks[0]:
        ax.set_xscale("log", base=2)  # 1, 2, 4, ..., 64 evenly spaced instead of crowded at the left
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.xaxis.set_minor_locator(NullLocator())  # the log axis would add unlabelled ticks between
    ax.set_xlabel("batch size")


# ----------------------------------------------------------------------------------------------
# Speed


def check_inference_speed(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    seq_len: int | None = None,
    plan: PrecisionPlan | None = None,
    repeats: int = 5,
    warmup: int = 1,
    figure: bool = True,
    seed: int = 0,
    task=None,
) -> Check:
    """Forward latency (median and p95, ms) and throughput (tokens/s) by batch size, in fp32 and
    under ``plan`` (default: ``resolve_precision("auto")`` on the model's device) when it differs.

    Example::

        >>> speed = check_inference_speed(example_model("gpt-micro"), batch_sizes=(1, 8))
        >>> sorted(speed.details["fp32"])
        ['latency_ms_median', 'latency_ms_p95', 'tokens_per_s']

    .. note::
        A ``-true`` plan runs on a copy of the model cast to 16 bits (twice the weights' memory
        for a moment). On a CPU without native bf16, bf16 runs many times slower than fp32: a plan
        whose dtype is emulated on the device is timed at the smallest batch size only, and the
        summary says so.
    """
    spec = input_spec(model, vocab_size, max_seq_len, call=f"check_inference_speed({type(model).__name__})")
    info = _task(model, task, vocab_size, max_seq_len, f"check_inference_speed({type(model).__name__})")
    plan = plan if plan is not None else resolve_precision("auto", device=spec.device)
    t = min(seq_len or 128, spec.max_seq_len)
    gen = torch.Generator().manual_seed(seed)
    inputs = {b: spec.random_ids(b, t, gen) for b in batch_sizes}
    results = {"fp32": _time_forwards(model, inputs, None, repeats, warmup, info)}
    small, big = min(batch_sizes), max(batch_sizes)
    emulated = plan.name != "32-true" and not runs_natively(spec.device, plan.autocast_dtype or plan.param_dtype)
    if plan.name != "32-true":
        target = model if plan.param_dtype == torch.float32 else copy.deepcopy(model).to(plan.param_dtype)
        timed = {small: inputs[small]} if emulated else inputs  # emulated: many times slower, one batch says it
        results[plan.name] = _time_forwards(target, timed, plan, repeats, warmup, info)
    details = {"seq_len": t, "repeats": repeats, "plan": plan.describe(), **results}
    if plan.name != "32-true":
        details["plan_emulated"] = emulated
    fig = _latency_figure(results) if figure else None
    fp32_tps = results["fp32"]["tokens_per_s"][big]
    summary = (f"fp32: {results['fp32']['latency_ms_median'][min(batch_sizes)]:.3g} ms at batch "
               f"{min(batch_sizes)}, {fp32_tps:,.0f} tokens/s at batch {big} (length {t}).")
    if plan.name == "32-true":
        summary += f" The AMP plan is fp32 here: {plan.reason}"
    else:
        at = small if emulated else big
        ratio = results[plan.name]["tokens_per_s"][at] / results["fp32"]["tokens_per_s"][at]
        summary += f" {plan.name}: {ratio:.2f}x fp32's throughput at batch {at}"
        summary += f" (emulated on this {spec.device.type}: timed at batch {small} only)." if emulated else "."
        if ratio < 1:  # a measurement on this model, not a property of the device
            summary += (" Slower than fp32 on this model (inference); benchmark_amp measures training before "
                        "you pick.")
    return Check("inference_speed", True, summary, details, fig)


def _time_forwards(model: nn.Module, inputs: dict, plan: PrecisionPlan | None, repeats: int, warmup: int,
                   info: TaskInfo) -> dict:
    """Forward latency per batch size: ``repeats`` timed calls after ``warmup`` untimed ones, each
    one call between two device synchronizations (``torch.utils.benchmark.Timer.timeit`` would run
    two more untimed calls before each: three times the cost for a large model on a CPU)."""
    device = model_device(model)
    autocast = plan.autocast if plan is not None else (lambda: torch.autocast(device.type, enabled=False))
    lat_median, lat_p95, tps = {}, {}, {}
    with preserved_state(model), torch.inference_mode():
        model.eval()
        for b, ids in inputs.items():
            for _ in range(warmup):
                with autocast():
                    _forward(model, ids, info)
            times = [_timed_forward(model, ids, info, autocast, device) for _ in range(repeats)]
            median = statistics.median(times)
            lat_median[b], tps[b] = 1e3 * median, ids.numel() / median
            # p95 between samples (inclusive method); with one sample, that sample
            lat_p95[b] = 1e3 * (statistics.quantiles(times, n=20, method="inclusive")[-1] if repeats > 1 else times[0])
    return {"latency_ms_median": lat_median, "latency_ms_p95": lat_p95, "tokens_per_s": tps}


def _timed_forward(model: nn.Module, ids: torch.Tensor, info: TaskInfo, autocast, device: torch.device) -> float:
    """Seconds of one forward, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    with autocast():
        _forward(model, ids, info)
    synchronize(device)
    return time.perf_counter() - start


def _latency_figure(results: dict):
    fig = new_figure()
    ax = fig.add_subplot()
    for name, r in results.items():
        batches = list(r["latency_ms_median"])
        ax.plot(batches, list(r["latency_ms_median"].values()), marker="o", label=f"{name} median")
        ax.plot(batches, list(r["latency_ms_p95"].values()), linestyle="--", label=f"{name} p95")
    _batch_size_axis(ax, [b for r in results.values() for b in r["latency_ms_median"]])
    ax.set_ylabel("forward latency (ms)")
    ax.set_title("Inference latency by batch size")
    ax.legend()
    return fig
