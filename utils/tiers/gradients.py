"""Tier 1's gradient check: does every parameter get a finite gradient of a sane size, and does
every parameter change the output?
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.common.figures import new_figure
from utils.models.calls import ModelCall, preserved_state
from utils.models.profile import ModelProfile
from utils.models.tasks import task_logits
from utils.tiers.inputs import MAX_NAMED, checked_inputs
from utils.tiers.report import Check


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
    profile: ModelProfile | None = None,
) -> Check:
    """One forward and backward in train mode; name parameters whose gradient is missing, zero,
    vanishing (norm below ``vanishing_below``), exploding (above ``exploding_above``) or not finite.

    The loss is cross-entropy against random targets over the output's last dimension, so every
    parameter that shapes the logits should get a gradient. Frozen parameters are listed, not failed.

    Example::

        >>> check_gradient_flow(example_model("gpt-micro")).passed
        True
    """
    spec, info, calling = checked_inputs(model, profile, task, vocab_size, max_seq_len, f"check_gradient_flow({type(model).__name__})")
    gen = torch.Generator().manual_seed(seed)
    ids = spec.random_ids(batch_size, min(seq_len or 32, spec.max_seq_len), gen)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    with preserved_state(model):
        model.train()
        for _, p in params:
            p.grad = None
        logits = task_logits(model, ids, info, calling)
        if not logits.requires_grad:
            return Check("gradient_flow", False,
                         "The output does not depend on any trainable parameter: no gradient reaches the model.",
                         {"trainable_parameters": len(params), "frozen": frozen[:MAX_NAMED]})
        _surrogate_loss(logits, gen).backward()
        norms = {n: (None if p.grad is None else float(p.grad.detach().float().norm())) for n, p in params}
    groups = _classify_grad_norms(norms, vanishing_below, exploding_above)
    inert = _inert_parameters(model, ids, info, calling, dict(params), norms, groups, vanishing_below, gen)
    bad = {k: v for k, v in groups.items() if v}
    details = {"grad_norms": norms, "frozen": frozen[:MAX_NAMED], "inert_by_design": inert,
               **{k: v[:MAX_NAMED] for k, v in bad.items()}}
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


def _inert_parameters(model, ids, info, calling: ModelCall, params: dict, norms: dict, groups: dict, vanishing_below: float,
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
            moved = _output_change(model, ids, info, calling, params[name], gen)
            if moved < _INERT_RTOL:
                groups[group].remove(name)
                inert[name] = (f"gradient norm {norms[name]:.1e}; perturbing it by N(0, {_INERT_NOISE_STD:g}²) "
                               f"moved the output by {moved:.1e} relative")
    return inert


def _output_change(model, ids, info, calling: ModelCall, param: nn.Parameter, gen: torch.Generator) -> float:
    """Relative change of the eval-mode output when ``param`` gets N(0, 5²) noise (then restored)."""
    noise = _INERT_NOISE_STD * torch.randn(param.shape, generator=gen).to(param.device, param.dtype)
    with preserved_state(model), torch.no_grad():
        model.eval()
        y = task_logits(model, ids, info, calling).float()
        param.add_(noise)
        try:
            y2 = task_logits(model, ids, info, calling).float()
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
