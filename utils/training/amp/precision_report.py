"""Where does mixed precision change a model's numbers? One fp32 pass against one under the plan.

Example::

    >>> report = compare_precisions(example_model("gpt-micro"), torch.randint(0, 256, (4, 33)))
    >>> report.rows[0].module, report.keep_fp32                           # doctest: +SKIP
    ('lm_head', [])
    >>> print(report.to_markdown(top=5))                                  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from utils.models.sizes import model_device
from utils.training.amp.keep_fp32 import units_to_keep
from utils.training.amp.overflow_scan import float_tensors, scan_fp16_overflow
from utils.training.amp.precision import PrecisionPlan, PrecisionWarning, resolve_precision
from utils.training.batches import move_to
from utils.training.objectives import objective_loss_fn

FP16_LOSS_SCALE = 2.0**10  # a scale a GradScaler often settles near; the fp16 backward sees it too


@dataclass
class ModuleError:
    """How far one module's numbers moved from fp32 under the plan."""

    module: str  # as in ``named_modules()``; "" is the model itself
    kind: str  # the class name
    rel_error: float  # ||y - y32|| / ||y32|| over its outputs (inf when they became non-finite)
    grad_rel_error: float | None  # the same for its own parameters' gradients; None without any
    max_abs: float  # the largest |output| in fp32
    range_frac: float  # max_abs / the dtype's largest finite value: above 1 overflows
    underflow_frac: float  # share of its non-zero fp32 outputs that came out as exactly 0
    order: int = 0  # its place in call order (hooks fire when a module returns)

    @property
    def overflow(self) -> bool:
        """Its fp32 output exceeds the dtype's range (a module fed an earlier inf is not flagged)."""
        return self.range_frac > 1


@dataclass
class PrecisionReport:
    """What :func:`compare_precisions` found: ``rows`` worst first, and the modules worth keeping in fp32."""

    precision: str
    dtype: str
    rows: list[ModuleError] = field(default_factory=list)
    keep_fp32: list[str] = field(default_factory=list)
    loss_fp32: float | None = None
    loss: float | None = None  # under the plan
    loss_scale: float = 1.0

    def to_markdown(self, top: int | None = 15) -> str:
        """A Markdown table of the ``top`` worst modules (all when None), then what to keep in fp32."""
        head = ("| module | kind | rel. error | grad rel. error | max abs | of range | underflow |\n"
                "|---|---|---:|---:|---:|---:|---:|")
        lines = [head] + [
            f"| {r.module or '<model>'} | {r.kind} | {r.rel_error:.3g} | "
            f"{'' if r.grad_rel_error is None else f'{r.grad_rel_error:.3g}'} | {r.max_abs:.3g} | "
            f"{r.range_frac:.2%} | {r.underflow_frac:.2%} |" for r in self.rows[:top]]
        keep = (f"Keep in fp32: {', '.join(self.keep_fp32)} (train(..., keep_fp32={self.keep_fp32!r}))."
                if self.keep_fp32 else f"No module leaves {self.dtype}'s range: nothing needs keeping in fp32.")
        loss = f"Loss: {self.loss_fp32:.6g} in fp32, {self.loss:.6g} in {self.precision}."
        return "\n".join(lines + ["", loss, keep])

    def plot(self, top: int = 15, ax=None):
        """A bar chart of the ``top`` worst modules' relative output error (log scale); returns the figure."""
        import matplotlib.pyplot as plt

        rows = self.rows[:top][::-1]  # worst at the top
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
        finite = [r.rel_error for r in rows if math.isfinite(r.rel_error) and r.rel_error > 0]
        ceiling = max(finite, default=1.0) * 10  # where non-finite errors are drawn, in red
        values = [r.rel_error if math.isfinite(r.rel_error) else ceiling for r in rows]
        colors = ["tab:red" if r.overflow or not math.isfinite(r.rel_error) else "tab:blue" for r in rows]
        ax.barh([r.module or "<model>" for r in rows], [max(v, 1e-12) for v in values], color=colors)
        ax.set_xscale("log")
        ax.set_xlabel("relative error of the output vs fp32")
        ax.set_title(f"{self.precision} against fp32 (red: out of range or non-finite)", fontsize=10)
        ax.figure.tight_layout()
        return ax.figure


def _resolve(precision, device: torch.device) -> PrecisionPlan:
    plan = precision if isinstance(precision, PrecisionPlan) else None
    if plan is None:
        with warnings.catch_warnings():  # "fp16/bf16 is slow here": speed does not matter to a comparison
            warnings.simplefilter("ignore", PrecisionWarning)
            plan = resolve_precision(precision, device)
    if plan.autocast_dtype is None:
        raise ValueError(f"compare_precisions(precision={precision!r}): it resolves to {plan.name!r}, which autocasts "
                         f"nothing to compare with fp32. Use '16-mixed' or 'bf16-mixed'.")
    return plan


def _record(store: dict, name: str, module, args, output) -> None:
    """A forward hook: append this call's floating outputs, flattened to fp32, under ``name``."""
    flat = [t.detach().float().reshape(-1) for t in float_tensors(output)]
    if flat:
        store.setdefault(name, []).extend(flat)


def _one_pass(model, batch, autocast, loss_fn, loss_scale) -> tuple[dict, dict, float]:
    """Forward + backward with hooks: {module: output}, {param: grad}, loss. Gradients cleared after."""
    outputs: dict[str, list] = {}
    handles = [m.register_forward_hook(functools.partial(_record, outputs, n)) for n, m in model.named_modules()]
    try:
        with autocast:
            loss = loss_fn(model, batch)
        (loss.float() * loss_scale).backward()
    finally:
        for h in handles:
            h.remove()
    grads = {n: (p.grad.float() / loss_scale) for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {n: torch.cat(ts) for n, ts in outputs.items()}, grads, float(loss.detach())


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _grad_error(module: nn.Module, name: str, grads: dict, ref: dict) -> float | None:
    keys = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
    keys = [k for k in keys if k in ref and k in grads]
    if not keys:
        return None
    return _rel(torch.cat([grads[k].reshape(-1) for k in keys]), torch.cat([ref[k].reshape(-1) for k in keys]))


def compare_precisions(model: nn.Module, batch, precision="16-mixed", *, loss_fn=None,
                       loss_scale: float | None = None) -> PrecisionReport:
    """Run one forward and backward in fp32 and one under ``precision``; compare every module.

    Example::

        >>> report = compare_precisions(example_model("gpt-micro"), torch.randint(0, 256, (2, 17)))
        >>> report.precision, report.dtype
        ('16-mixed', 'float16')

    Args:
        model: an fp32 model on its device. Its weights, gradients and train/eval mode are left as
            they were; both passes run in eval mode (no dropout), on the same weights and batch.
        batch: one batch as ``train()`` takes it (token ids ``(B, T)``, a pair or a dict).
        precision: a mixed precision ``resolve_precision`` accepts (default ``"16-mixed"``), or a
            plan; on the model's device, where the "slow on this CPU" notes are silenced.
        loss_fn: ``loss_fn(model, batch) -> scalar``, as for ``train()``.
        loss_scale: what the fp16 loss is multiplied by before its backward (as a GradScaler does)
            and the gradients divided by after. Default: 1024 for fp16, 1 for bf16.

    Returns:
        :class:`PrecisionReport`: a :class:`ModuleError` per module with a floating output, worst
        first (largest relative error; among non-finite ones, the first to go non-finite first),
        and ``keep_fp32``: the modules to keep in fp32 for those that left the dtype's range.

    Raises:
        ValueError: a precision that autocasts nothing, or a model whose weights are not fp32.

    .. note:: Keeps every module's output of both passes in memory and reads each back to the host:
        use one small batch. fp16 and bf16 run on a CPU, slowly.
    """
    device = model_device(model)
    plan = _resolve(precision, device)
    wrong = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if wrong:
        raise ValueError(f"compare_precisions: the model holds {', '.join(wrong)} weights; it needs float32 ones "
                         f"(the reference pass is fp32). Pass the model before .half()/.to(torch.bfloat16).")
    scale = loss_scale if loss_scale is not None else (FP16_LOSS_SCALE if plan.use_scaler else 1.0)
    batch = move_to(batch, device)
    loss_fn = loss_fn or objective_loss_fn(model)  # the task's objective (masked LM, seq2seq ...)
    saved = {p: p.grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        model.zero_grad(set_to_none=True)
        ref_out, ref_grads, loss32 = _one_pass(model, batch, torch.autocast(device.type, enabled=False), loss_fn, 1.0)
        out, grads, loss = _one_pass(model, batch, plan.autocast(), loss_fn, scale)
    finally:
        model.train(was_training)
        for p, g in saved.items():
            p.grad = g
    report = PrecisionReport(plan.name, str(plan.autocast_dtype).removeprefix("torch."), loss_fp32=loss32,
                             loss=loss, loss_scale=scale)
    report.rows = _rows(model, ref_out, out, ref_grads, grads, torch.finfo(plan.autocast_dtype).max)
    flagged = sorted((r for r in report.rows if r.overflow), key=lambda r: r.order)
    report.keep_fp32 = units_to_keep(model, [r.module for r in flagged])
    return report


def _rows(model, ref_out, out, ref_grads, grads, dtype_max: float) -> list[ModuleError]:
    modules = dict(model.named_modules())
    rows = []
    for order, (name, ref) in enumerate(ref_out.items()):  # dicts keep the hooks' call order
        got = out.get(name)
        if got is None or got.shape != ref.shape:
            continue  # a module that ran differently under autocast: nothing to line up
        nonzero = ref != 0
        max_abs = float(ref.abs().max()) if ref.numel() else 0.0
        rows.append(ModuleError(
            module=name, kind=type(modules[name]).__name__, rel_error=_rel(got, ref),
            grad_rel_error=_grad_error(modules[name], name, grads, ref_grads), max_abs=max_abs,
            range_frac=max_abs / dtype_max,
            underflow_frac=float((nonzero & (got == 0)).sum()) / max(int(nonzero.sum()), 1), order=order))
    return sorted(rows, key=lambda r: (-(r.rel_error if not math.isnan(r.rel_error) else math.inf), r.order))


def make_fp16_hostile(model: nn.Module, batch, module: str | None = None, *, peak: float = 4 * 65504.0) -> str:
    """Scale one Linear's weights and bias so its largest output on ``batch`` is ``peak`` (default
    4x fp16's 65504): a model that is fine in fp32 and overflows under ``16-mixed``, to demonstrate
    the scan, :func:`compare_precisions` and ``keep_fp32`` on. Changes ``model`` in place.

    Example::

        >>> model = example_model("gpt-micro")
        >>> make_fp16_hostile(model, torch.randint(0, 256, (2, 17)))
        'transformer.h.0.mlp.c_fc'

    Args:
        module: the Linear's name; default: the first Linear with ``mlp`` or ``fc`` in its name,
            else the first Linear.

    Returns:
        The name of the Linear it scaled.

    Raises:
        ValueError: ``module`` is not a Linear of the model, or one its forward pass never calls (an
            ``nn.MultiheadAttention``'s ``out_proj``), or the model has none.
    """
    scan = scan_fp16_overflow(model, batch)
    seen = {m.name: m.max_abs for m in scan.modules}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    called = [n for n in linears if n in seen]  # an nn.MultiheadAttention's out_proj is never called itself
    if module is None:
        module = next((n for n in called if "mlp" in n or "fc" in n), called[0] if called else None)
    if module not in linears:
        raise ValueError(f"make_fp16_hostile(module={module!r}): not an nn.Linear of {type(model).__name__}. "
                         f"Its Linears: {', '.join(linears) or 'none'}.")
    if module not in seen:
        raise ValueError(f"make_fp16_hostile(module={module!r}): {type(model).__name__}'s forward pass never calls "
                         f"it (an nn.MultiheadAttention uses its out_proj's weights directly). The Linears it "
                         f"calls: {', '.join(called) or 'none'}.")
    current = seen[module]
    linear = dict(model.named_modules())[module]
    with torch.no_grad():
        for p in (linear.weight, linear.bias):
            if p is not None:
                p.mul_(peak / current)
    return module
