"""Will this model's activations fit in fp16? One fp32 forward with hooks answers before training.

Example::

    >>> scan = scan_fp16_overflow(model, ids[:8])
    >>> scan.ok, [m.name for m in scan.overflowing]          # doctest: +SKIP
    (False, ['transformer.h.1.mlp.c_fc'])
    >>> print(scan.recommendation)                            # doctest: +SKIP
    1 module(s) produce activations beyond fp16's ±65504 ...
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from utils.common.strict_json import json_safe
from utils.models.sizes import model_device
from utils.training.batches import move_to, run_model
from utils.training.objectives import objective_for

FP16_MAX = 65504.0  # the largest finite fp16; anything bigger becomes inf
FP16_TINY = 2.0**-24  # the smallest fp16 subnormal (~6e-8); smaller magnitudes flush to zero


@dataclass
class ModuleRange:
    """The magnitudes one module's floating-point outputs reached in the fp32 forward."""

    name: str  # as in ``model.named_modules()``; "" is the model itself
    kind: str  # the module's class name
    max_abs: float  # inf when the fp32 forward itself overflowed
    min_nonzero_abs: float | None
    underflow_fraction: float  # share of non-zero values below FP16_TINY
    overflow: bool
    underflow: bool


@dataclass
class Fp16Scan:
    """What :func:`scan_fp16_overflow` found: every module's range, in call order, and what to do."""

    modules: list[ModuleRange] = field(default_factory=list)
    recommendation: str = ""

    @property
    def overflowing(self) -> list[ModuleRange]:
        return [m for m in self.modules if m.overflow]

    @property
    def underflowing(self) -> list[ModuleRange]:
        return [m for m in self.modules if m.underflow]

    @property
    def ok(self) -> bool:
        """True when no module leaves the fp16 range."""
        return not (self.overflowing or self.underflowing)

    def to_dict(self) -> dict:
        """JSON-safe: an infinite ``max_abs`` becomes None (the module is flagged ``overflow``)."""
        rows = [json_safe(asdict(m)) for m in self.modules]
        return {"modules": rows, "recommendation": self.recommendation}

    @classmethod
    def from_dict(cls, data: dict) -> Fp16Scan:
        modules = [ModuleRange(**{**m, "max_abs": math.inf if m["max_abs"] is None else m["max_abs"]})
                   for m in data["modules"]]
        return cls(modules, data["recommendation"])


def float_tensors(output):
    """The floating-point tensors in a module's output (a tensor, a tuple/list, a dict or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in float_tensors(item)]
    return []


def _record(stats: dict, key: tuple[str, str], module, args, output) -> None:
    """A forward hook (bound to ``stats`` and the module's key): merge this call's output ranges."""
    for t in float_tensors(output):
        a = t.detach().abs().float()
        nonzero = a[a > 0]
        entry = stats.setdefault(key, [0.0, math.inf, 0, 0])  # max, min non-zero, tiny count, non-zero count
        entry[0] = max(entry[0], float(a.max())) if a.numel() else entry[0]
        if nonzero.numel():
            entry[1] = min(entry[1], float(nonzero.min()))
        entry[2] += int((nonzero < FP16_TINY).sum())
        entry[3] += nonzero.numel()


def scan_fp16_overflow(model: nn.Module, batch, *, loss_fn=None, underflow_fraction: float = 0.01) -> Fp16Scan:
    """Run one fp32 forward with hooks and list the modules whose outputs leave fp16's range.

    Example::

        >>> scan = scan_fp16_overflow(example_model("gpt-micro"), torch.randint(0, 256, (2, 17)))
        >>> scan.ok
        True

    Args:
        model: the model, on its device; it is not changed (no gradients, autocast off).
        batch: one batch as ``train()`` takes it (token ids ``(B, T)``, a pair or a dict).
        loss_fn: ``loss_fn(model, batch)``, as for ``train()``, when the model needs its own call.
        underflow_fraction: flag a module when at least this share (default 0.01) of its non-zero
            outputs is below fp16's smallest subnormal (~6e-8), where fp16 rounds them to zero.

    Returns:
        :class:`Fp16Scan`: a :class:`ModuleRange` per module that produced a floating tensor,
        flagged ``overflow`` when ``|x| > 65504`` (or already non-finite), and a recommendation.

    .. note:: Reads each module's range back to the host: one sync per module (a one-off check).
    """
    stats: dict[tuple[str, str], list] = {}
    batch = move_to(batch, model_device(model))
    device_type = model_device(model).type
    # The task's objective (masked LM, seq2seq ...), found before the hooks see any forward pass.
    prepared = None if loss_fn is not None else objective_for(model).prepare(
        batch, generator=torch.Generator().manual_seed(0), argument="batch")
    handles = [module.register_forward_hook(functools.partial(_record, stats, (name, type(module).__name__)))
               for name, module in model.named_modules()]
    try:
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            if loss_fn is not None:
                loss_fn(model, batch)
            else:
                run_model(model, prepared)  # with the targets when forward takes them
    finally:
        for handle in handles:
            handle.remove()
    modules = []
    for (name, kind), (max_abs, min_nz, tiny, nonzero) in stats.items():
        share = tiny / nonzero if nonzero else 0.0
        modules.append(ModuleRange(name, kind, max_abs, None if math.isinf(min_nz) else min_nz, share,
                                   overflow=not max_abs <= FP16_MAX, underflow=share >= underflow_fraction))
    scan = Fp16Scan(modules)
    scan.recommendation = _recommend(scan)
    return scan


def _label(m: ModuleRange) -> str:
    return f"{m.name or '<model>'} ({m.kind})"


def _recommend(scan: Fp16Scan) -> str:
    lines = []
    if scan.overflowing:
        first = scan.overflowing[0]
        factor = 2 ** math.ceil(math.log2(first.max_abs / FP16_MAX)) if math.isfinite(first.max_abs) else None
        by = f"by at least {factor}x" if factor else "(its fp32 output is already non-finite)"
        lines.append(
            f"{len(scan.overflowing)} module(s) produce activations beyond fp16's ±65504, first "
            f"{_label(first)} with max |x| = {first.max_abs:.3g}; under 16-mixed they become inf and every "
            f"step is skipped. Use precision='bf16-mixed' (fp32's range) where the hardware has bf16. "
            f"Otherwise rescale: shrink {first.name or 'the model'}'s output {by} (smaller weight init, a "
            f"normalization before it), or run it in fp32 inside torch.autocast(device_type, enabled=False)."
        )
    if scan.underflowing:
        first = scan.underflowing[0]
        lines.append(
            f"{len(scan.underflowing)} module(s) produce values that flush to zero in fp16 (below ~6e-8), "
            f"first {_label(first)}: {first.underflow_fraction:.1%} of its non-zero outputs. The GradScaler "
            f"rescales gradients, not activations: use precision='bf16-mixed', or scale "
            f"{first.name or 'the model'}'s output up."
        )
    if not lines:
        top = max(scan.modules, key=lambda m: m.max_abs, default=None)
        peak = f" (largest |x| = {top.max_abs:.3g}, in {_label(top)})" if top else ""
        lines.append(f"All activations fit fp16{peak}: 16-mixed is safe for this forward pass; the "
                     f"GradScaler takes care of small gradients.")
    return "\n".join(lines)
