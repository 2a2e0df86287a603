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

from dataclasses import dataclass

import torch
from torch import nn

from utils.models.calls import ModelCall, preserved_state
from utils.models.profile import ModelProfile, look_at
from utils.models.sizes import CONTEXT_SEARCH
from utils.models.tasks import TaskInfo, logits_network, task_logits
from utils.tiers.gradients import check_gradient_flow
from utils.tiers.inputs import DEFAULT_BATCH_SIZES, MAX_NAMED, SHORT_LEN, checked_inputs, seq_grid
from utils.tiers.memory_speed import check_inference_speed, check_memory
from utils.tiers.numerics import check_initialization, check_numerical_stability
from utils.tiers.report import Check, Report, run_checks
from utils.training.amp.precision import PrecisionPlan, resolve_precision

# A model whose one full-length forward costs more than this (2 x parameters x context FLOPs) is
# measured with smaller inputs on a CPU: ~0.1-0.5 s on a 2-core CPU. GPT-2 small (124M x 1024) is
# 13x over it; the example models are thousands of times under it.
CPU_FULL_FORWARD_FLOPS = 2e10


@dataclass(frozen=True)
class Tier1Sizes:
    """What Tier 1 measures, chosen once from the model's size and device (:func:`tier1_sizes`).

    Example::

        >>> tier1_sizes(example_model("gpt-micro"), look_at(example_model("gpt-micro")).spec()).reduced   # doctest: +SKIP
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
        return {"max_tokens": 4 * SHORT_LEN} if self.reduced else {}

    def numerics(self) -> dict:
        return {"trials": 2, "seq_len": SHORT_LEN, "max_sweep_tokens": 512} if self.reduced else {}

    def memory(self, batch_sizes) -> dict:
        return {"measured_batch_sizes": (min(batch_sizes),)} if self.reduced else {}

    def speed(self) -> dict:
        return {"seq_len": SHORT_LEN // 2, "repeats": 3} if self.reduced else {}


def tier1_sizes(model: nn.Module, spec) -> Tier1Sizes:
    """Reduced sizes when one full-length forward of ``model`` on a CPU costs more than
    :data:`CPU_FULL_FORWARD_FLOPS`; the full sizes otherwise (any GPU, any small model)."""
    params = sum(p.numel() for p in model.parameters())
    flops = 2 * params * spec.max_seq_len
    if spec.device.type != "cpu" or flops <= CPU_FULL_FORWARD_FLOPS:
        return Tier1Sizes()
    return Tier1Sizes(True, f"{params / 1e6:,.0f}M parameters at a context of {spec.max_seq_len} on a CPU: one "
                            f"full-length forward is {flops:.1e} FLOPs, so the checks use the full length once "
                            f"each and short inputs ({SHORT_LEN} tokens) otherwise")


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

    The model is looked at once (:func:`utils.models.profile.look_at`); each check takes that look as
    ``profile=`` (called alone, a check looks at the model itself). A model whose forward returns
    its own loss (``loss = model(seq)``) is checked through the network it wraps (see :func:`utils.models.tasks.logits_network`), and the report says so.

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
    profile = look_at(model, task, vocab_size=vocab_size, max_seq_len=max_seq_len, call=call)  # the one look
    network = logits_network(model, call, own_loss=profile.returns_loss)  # a loss wrapper: through its network
    if network.module is not model:  # the network is the model these checks look at
        profile = look_at(network.module, task, vocab_size=vocab_size, max_seq_len=max_seq_len, call=call)
    model = network.module
    spec = profile.spec()
    plan = resolve_precision(precision, device=spec.device)
    info, task_note = _tier_task(profile, task)
    sizes = tier1_sizes(model, spec)
    kw = dict(seed=seed, task=info, profile=profile)  # every check reads the model from this look
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
    info = _model_info(profile, spec, plan) | {"task": task_note}
    if sizes.reduced:
        info["sizes"] = sizes.reason
    return Report(f"Tier 1: {type(model).__name__}", checks, info=info | _through(network))


def _through(network) -> dict:
    """The report line saying a loss-returning wrapper was checked through its network."""
    return {"checked_through": network.note} if network.note else {}


def _model_info(profile: ModelProfile, spec, plan: PrecisionPlan) -> dict:
    model = profile.model
    context = f"{spec.max_seq_len}" + {"model": " (from the model)", "argument": " (given)",
                                       "default": " (the model has no fixed context; default)"}[spec.context_from]
    return {
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": spec.vocab_size,
        "max_seq_len": context,
        "device": str(spec.device),
        "precision": plan.describe(),
        "calling": profile.call.describe(),
    }


def _tier_task(profile: ModelProfile, task) -> tuple:
    """``(task for the checks, one line for the report)``. When the probe call itself raises, the
    checks get ``task`` as given and each reports the model's error (run_check), as without it."""
    try:
        info = profile.task
    except ValueError:
        raise
    except Exception as e:  # the model's own failure: the checks that call it report it one by one
        return task, f"not detected: calling the model raised {type(e).__name__}"
    return info, info.describe()


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
    profile: ModelProfile | None = None,
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
    spec, info, calling = checked_inputs(model, profile, task, vocab_size, max_seq_len, f"check_shapes({type(model).__name__})")
    gen = torch.Generator().manual_seed(seed)
    long = spec.max_seq_len
    grid, edge = seq_grid(long), long
    if max_tokens is not None:  # the edges, a quarter and all of the context; short inputs besides
        grid = sorted({n for n in (1, 2, min(SHORT_LEN, long), long // 4, long) if n >= 1})
        edge = min(long, SHORT_LEN, max_tokens)
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
                out = task_logits(model, ids, info, calling)
            except Exception as e:  # a shape the model cannot take is the finding itself
                problems.append(f"input {key} raised {type(e).__name__}: {e}{_default_context_hint(spec)}")
                continue
            if error := calling.short_logits_error(out, t):  # the inference shortcut, under another name
                problems.append(f"input {key}: {error}")
                continue
            shapes[key] = tuple(out.shape)
            problems += _shape_problems(key, out, b, t)
            trailing.add(tuple(out.shape[2:] if out.dim() >= 3 and out.shape[1] == t else out.shape[1:]))
    if len(trailing) > 1:
        problems.append(f"the output's trailing dimensions change with the input: {sorted(trailing)}")
    details = {"inputs_tried": len(cases), "output_shapes": shapes,
               "too_long_input": _too_long_behaviour(model, spec, info, calling)}
    if problems:
        details["problems"] = problems[:MAX_NAMED]
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


def _too_long_behaviour(model: nn.Module, spec, info: TaskInfo, calling: ModelCall) -> str:
    """What an input one token longer than the context does: informative, not pass/fail."""
    if spec.context_from != "model":
        return ("not tried: the model has no fixed context" if spec.context_from == "default"
                else "not tried: max_seq_len was given")
    with preserved_state(model), torch.no_grad():
        model.eval()
        try:
            task_logits(model, torch.zeros(1, spec.max_seq_len + 1, dtype=torch.long, device=spec.device), info, calling)
        except Exception as e:  # raising is the good outcome here
            return f"refused ({type(e).__name__})"
    return "accepted (the model does not enforce its context length)"
