"""Run chosen modules in fp32 inside an autocast region, and undo it afterwards.

A module kept in fp32 runs with autocast off and its floating inputs cast to fp32; its outputs stay
fp32 (autocast casts them down again where the next op wants half precision). This is what
Hugging Face's ``_keep_in_fp32_modules`` does with weights, done here with activations, so an
fp16-hostile layer (one whose outputs exceed ±65504) stops turning a run's gradients into inf.

Example::

    >>> names = select_modules(model, ["lm_head", "*.ln_f", nn.LayerNorm])          # doctest: +SKIP
    >>> with KeptModules(model, names, "cuda"):
    ...     with torch.autocast("cuda", dtype=torch.float16):
    ...         logits = model(ids)                                                 # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import functools
import warnings
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from utils.training.amp.overflow_scan import scan_fp16_overflow
from utils.training.amp.precision import PrecisionPlan, PrecisionWarning

_GLOB = set("*?[")


def _names_hint(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, _ in model.named_modules() if n]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _matches(spec, name: str, module: nn.Module) -> bool:
    if isinstance(spec, type):
        return isinstance(module, spec)
    if _GLOB & set(spec):
        return fnmatch.fnmatchcase(name, spec)
    return name == spec


def _check_spec(spec) -> None:
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return
    if isinstance(spec, str) and spec:
        return
    raise ValueError(f"keep_fp32 entry {spec!r} is not allowed: use a module name ('lm_head'), a glob "
                     f"pattern ('*.ln_f') or an nn.Module subclass (nn.LayerNorm).")


def outermost(names: list[str]) -> list[str]:
    """Drop names that sit inside another name of the list (their parent already runs in fp32)."""
    return [n for n in names if not any(o != n and (o == "" or n.startswith(o + ".")) for o in names)]


def select_modules(model: nn.Module, keep_fp32) -> list[str]:
    """The names of the submodules ``keep_fp32`` selects, outermost only, in ``named_modules()`` order.

    Example::

        >>> select_modules(example_model("gpt-micro"), ["lm_head", "*.ln_f"])
        ['transformer.ln_f', 'lm_head']

    Args:
        keep_fp32: a name, a glob pattern (``fnmatch``, matched against full dotted names), an
            ``nn.Module`` subclass, or a list of these. The model itself is never selected.

    Raises:
        ValueError: an entry of the wrong kind, or one that matches no submodule; the message lists
            some of the model's module names.
    """
    specs = list(keep_fp32) if isinstance(keep_fp32, (list, tuple, set, frozenset)) else [keep_fp32]
    modules = [(n, m) for n, m in model.named_modules() if n]
    chosen: list[str] = []
    for spec in specs:
        _check_spec(spec)
        hits = [n for n, m in modules if _matches(spec, n, m)]
        if not hits:
            shown = spec.__name__ if isinstance(spec, type) else repr(spec)
            raise ValueError(f"keep_fp32 entry {shown} matches no module of {type(model).__name__}. "
                             f"Its modules: {_names_hint(model)}.")
        chosen += [n for n in hits if n not in chosen]
    order = {n: i for i, (n, _) in enumerate(modules)}
    return outermost(sorted(chosen, key=order.__getitem__))


def units_to_keep(model: nn.Module, flagged: list[str]) -> list[str]:
    """Which modules to keep in fp32 for overflowing outputs ``flagged`` (names, in call order).

    A flagged leaf (a Linear inside an MLP) is kept with its parent, so the ops after it in that
    block (activation, projection) also see fp32; a flagged leaf directly under the model is kept
    alone. A flagged container is kept only when no module was flagged before it: then the
    overflow starts in its own code. Otherwise it holds the source (its submodules return before
    it does) or passes an earlier overflow on, as a residual stream does. The model itself is
    never kept.

    .. note:: A second overflow that starts in a container's own code, after an earlier one, is
        not found; the run's :class:`ScaleHealth` warning then still says the scale collapses.
    """
    modules = dict(model.named_modules())
    flagged = [n for n in flagged if n]
    units: list[str] = []
    for i, name in enumerate(flagged):
        if next(modules[name].children(), None) is None:  # a leaf
            parent = name.rpartition(".")[0]
            unit = parent if parent else name
        elif i:
            continue
        else:
            unit = name
        if unit not in units:
            units.append(unit)
    order = {n: i for i, n in enumerate(modules)}
    return outermost(sorted(units, key=order.__getitem__))


def _to_fp32(value):
    """Floating half-precision tensors (also inside tuples, lists and dicts) cast to fp32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, Mapping):
        return {k: _to_fp32(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _fp32_forward(forward, device_type: str, *args, **kwargs):
    with torch.autocast(device_type, enabled=False):
        return forward(*_to_fp32(args), **_to_fp32(kwargs))


class KeptModules:
    """Named submodules run in fp32 (autocast off, inputs cast up) until :meth:`remove`.

    Each module's ``forward`` is wrapped through an instance attribute; :meth:`remove` deletes
    it (or puts back one the module had), so the model is left as it was. Also a context manager.

    Args:
        model: the model holding the modules.
        names: names from ``model.named_modules()`` (see :func:`select_modules`).
        device_type: the autocast device type to switch off (``"cuda"``, ``"cpu"``, ...).
    """

    def __init__(self, model: nn.Module, names: list[str], device_type: str):
        self.names = list(names)
        modules = dict(model.named_modules())
        self._saved = []
        for name in self.names:
            module = modules[name]
            own = module.__dict__.get("forward")  # an instance-level forward the user set, if any
            self._saved.append((module, own))
            module.forward = functools.partial(_fp32_forward, own or module.forward, device_type)

    def remove(self) -> None:
        """Restore every wrapped module's ``forward``; calling it again does nothing."""
        for module, own in self._saved:
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        self._saved = []

    def __enter__(self) -> KeptModules:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def plan_keep_fp32(model: nn.Module, keep_fp32, plan: PrecisionPlan, first_batch, loss_fn=None
                   ) -> tuple[list[str], PrecisionPlan]:
    """The modules ``train(keep_fp32=...)`` keeps, and the plan with a ``reason`` that says so.

    Args:
        keep_fp32: what :func:`select_modules` takes, or ``"auto"``: under ``16-mixed``,
            :func:`scan_fp16_overflow` runs on the first batch and :func:`units_to_keep` picks the
            modules for what it flags (other precisions have fp32's range: nothing is kept).
        first_batch: a callable returning the first training batch (called for ``"auto"`` only).

    Raises:
        ValueError: an entry that matches no module (see :func:`select_modules`).

    .. note:: A list given with a plan that autocasts nothing (``32-true``, ``*-true``) is
        checked, then ignored with a :class:`PrecisionWarning`.
    """
    if isinstance(keep_fp32, str) and keep_fp32 == "auto":
        if plan.name != "16-mixed":
            return [], plan
        scan = scan_fp16_overflow(model, first_batch(), loss_fn=loss_fn)
        names = units_to_keep(model, [m.name for m in scan.overflowing])
        how = "keep_fp32='auto': the fp16 scan of the first batch"
        if not names:
            return [], replace(plan, reason=f"{plan.reason} {how} flagged no module, so none is kept in fp32.")
        return names, replace(plan, reason=f"{plan.reason} Kept in fp32 ({how} flagged them): {', '.join(names)}.")
    names = select_modules(model, keep_fp32)
    if plan.autocast_dtype is None:
        warnings.warn(f"keep_fp32={keep_fp32!r} has no effect under {plan.name}: nothing is autocast, so every "
                      f"module already runs in its weights' dtype. Use a '-mixed' precision to keep modules in fp32.",
                      PrecisionWarning, stacklevel=3)
        return [], plan
    return names, replace(plan, reason=f"{plan.reason} Kept in fp32: {', '.join(names)}.")
