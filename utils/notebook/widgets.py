"""The AMP toggle: four buttons and a line that says what the resolver will do on this runtime.

Example::

    >>> toggle = amp_toggle(precision)     # in a notebook: shows the buttons   # doctest: +SKIP
    >>> toggle.plan.name                   # what train() will use             # doctest: +SKIP
    'bf16-mixed'

Without ipywidgets (or in a headless run) the ``precision`` parameter is used as is.
"""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass, field

from utils.training.amp.precision import PrecisionPlan, canonical_precision, resolve_precision

# Button label → the request the resolver receives. The labels are the resolver's own names, the
# ones the notebooks' Settings form offers: one vocabulary (the legacy fp32/bf16/fp16 are accepted too).
CHOICES = {"auto": "auto", "32-true": "32-true", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}


def label_for(precision) -> str:
    """The button that stands for ``precision`` (any accepted spelling); ``16-true`` shows as 16-mixed."""
    name = canonical_precision(precision)
    for label, request in CHOICES.items():
        if request == name or (label != "auto" and name.startswith(request.split("-")[0] + "-")):
            return label
    return "auto"


def _runtime(plan_device_type: str) -> str:
    return {"cuda": "GPU", "cpu": "CPU", "mps": "Apple MPS"}.get(plan_device_type, plan_device_type)


def explain(precision, device=None, *, caps=None) -> tuple[PrecisionPlan | None, str]:
    """Resolve ``precision`` and say in one line what happens and why.

    Returns:
        ``(plan, line)``; ``plan`` is None when the request cannot be honoured (the line says why).

    Example::

        >>> explain("fp16")[1]           # on a CPU-only runtime with native bf16   # doctest: +SKIP
        '16-mixed on a CPU runtime → bf16-mixed, because fp16 was requested on a CPU-only runtime, ...'
    """
    label = label_for(precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan's reason already says what a warning would
        try:
            plan = resolve_precision(precision, device, caps=caps)
        except ValueError as e:
            return None, f"{label}: not possible here: {e}"
    runtime = _runtime(plan.device_type)
    reason = plan.reason[0].lower() + plan.reason[1:]
    line = f"{label} on a {runtime} runtime → {plan.name}, because {reason}"
    if plan.use_scaler:
        line += " A GradScaler guards fp16 gradients."
    return plan, line


@dataclass
class AmpToggle:
    """The toggle's state: the request, the plan it resolves to, and the explanation line."""

    request: str
    plan: PrecisionPlan | None
    line: str
    device: object = None
    widget: object = field(default=None, repr=False)

    def set(self, label_or_precision) -> None:
        """Select a button (``"auto"``, ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``) or any precision
        spelling the resolver accepts (``"fp16"`` too)."""
        request = CHOICES.get(label_or_precision, label_or_precision)
        plan, self.line = explain(request, self.device)
        if plan is not None:  # an impossible choice keeps the last good plan; the line says why
            self.request, self.plan = request, plan
        if self.widget is not None:
            self._line.value = _line_html(self.line, ok=plan is not None)


def _line_html(line: str, ok: bool) -> str:
    colour = "#1b5e20" if ok else "#b71c1c"
    return f'<span style="color:{colour}">{html.escape(line)}</span>'


def amp_toggle(precision="auto", device=None, *, display: bool = True) -> AmpToggle:
    """Build the toggle with ``precision`` selected; show it when ipywidgets is there.

    Args:
        precision: the notebook's ``precision`` parameter (any spelling the resolver accepts).
        device: passed to the resolver (None: the best device available).
        display: show the widget with ``IPython.display`` (default True).

    Raises:
        ValueError: ``precision`` is unknown, or cannot be honoured here (the resolver's message).
    """
    request = CHOICES.get(precision, precision)
    plan, line = explain(request, device)
    if plan is None:
        raise ValueError(line)
    toggle = AmpToggle(request=request, plan=plan, line=line, device=device)
    try:
        import ipywidgets as w
    except ImportError:
        return toggle
    buttons = w.ToggleButtons(options=list(CHOICES), value=label_for(request), description="AMP:",
                              tooltips=[f"precision={v!r}" for v in CHOICES.values()])
    line_w = w.HTML(_line_html(line, ok=plan is not None))
    buttons.observe(lambda change: toggle.set(change["new"]), names="value")
    toggle.widget, toggle._buttons, toggle._line = w.VBox([buttons, line_w]), buttons, line_w
    if display:
        from IPython.display import display as show

        show(toggle_bundle(toggle), raw=True)
    return toggle


def toggle_bundle(toggle: AmpToggle) -> dict:
    """What the toggle displays: the widget for a frontend that renders widgets, and as plain text
    the line saying what the resolver will do, for one that cannot (papermill, nbclient, a saved
    notebook on GitHub), instead of ``VBox(children=(ToggleButtons(...``."""
    return {**toggle.widget._repr_mimebundle_(), "text/plain": f"AMP: {toggle.line}"}
