"""Figures for reports and notebooks, drawn without pyplot.

matplotlib is imported when a figure is made, so ``utils`` imports without it.
"""

from __future__ import annotations


def new_figure(width: float = 6.4, height: float = 3.6):
    """A ``matplotlib.figure.Figure`` outside pyplot: nothing is shown, nothing global is kept open.

    Example::

        >>> fig = new_figure(9, 4)                                # doctest: +SKIP
        >>> ax = fig.subplots()                                   # doctest: +SKIP

    Args:
        width, height: inches (default 6.4 x 3.6, matplotlib's own).
    """
    from matplotlib.figure import Figure  # deferred: matplotlib is optional

    return Figure(figsize=(width, height), layout="constrained")
