"""What Tier 1 and Tier 2 return: a :class:`Report` of named :class:`Check` results, with figures.

Example::

    >>> report = run_tier1(example_model("gpt-micro"))     # doctest: +SKIP
    >>> report.passed, [c.name for c in report.failed]      # doctest: +SKIP
    (True, [])
    >>> report["gradient_flow"].figure                      # a matplotlib Figure  # doctest: +SKIP
    >>> print(report.to_markdown())                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

_MAX_ITEMS = 8  # list items shown in markdown before "... (N in all)"


@dataclass
class Check:
    """One check's result.

    Attributes:
        name: what was checked, e.g. ``"gradient_flow"``.
        passed: False when the model has the problem this check looks for.
        summary: one or two sentences for people, naming what failed.
        details: the numbers behind the summary (plain Python values).
        figure: a ``matplotlib.figure.Figure``, or None; never shown, only returned.
        skipped: True when there was nothing to check (e.g. no attention); counts as passed.
    """

    name: str
    passed: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    figure: Any = None
    skipped: bool = False

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else ("PASS" if self.passed else "FAIL")

    def to_markdown(self) -> str:
        lines = [f"### {self.status} `{self.name}`", "", self.summary, ""]
        lines += [f"- **{key}**: {_format(value)}" for key, value in self.details.items()]
        return "\n".join(lines).rstrip() + "\n"


@dataclass
class Report:
    """The checks of one tier on one model.

    Attributes:
        title: e.g. ``"Tier 1: GPT"``.
        checks: the :class:`Check` results, in the order they ran.
        info: what was run on (model class, parameters, vocabulary, context, device, precision).
    """

    title: str
    checks: list[Check]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    @property
    def skipped(self) -> list[Check]:
        """The checks that found nothing to check (no attention, say): they pass, but did not run."""
        return [check for check in self.checks if check.skipped]

    @property
    def verdict(self) -> str:
        """The headline, counting what did not run: ``"PASSED"``, ``"PASSED (1 of 4 checks skipped:
        attention_patterns)"``, ``"FAILED (1 of 3 checks: gradient_flow)"``; never a bare PASSED over a skipped check."""
        n, skipped = len(self.checks), self.skipped
        names = ", ".join(c.name for c in skipped)
        if self.passed:
            return f"PASSED ({len(skipped)} of {n} checks skipped: {names})" if skipped else "PASSED"
        skip = f"; {len(skipped)} skipped: {names}" if skipped else ""
        return f"FAILED ({len(self.failed)} of {n} checks: {', '.join(c.name for c in self.failed)}{skip})"

    @property
    def figures(self) -> dict[str, Any]:
        """``{check name: Figure}`` for the checks that drew one."""
        return {check.name: check.figure for check in self.checks if check.figure is not None}

    def __getitem__(self, name: str) -> Check:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"report[{name!r}]: no such check. Checks: {', '.join(c.name for c in self.checks)}.")

    def to_markdown(self) -> str:
        """A summary table, then each check's summary and details."""
        lines = [f"## {self.title}: {self.verdict}", ""]
        lines += [f"- {key}: {_format(value)}" for key, value in self.info.items()]
        lines += ["", "| check | status | summary |", "|---|---|---|"]
        lines += [f"| `{c.name}` | {c.status} | {c.summary.replace('|', '/')} |" for c in self.checks]
        lines += [""] + [check.to_markdown() for check in self.checks]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:  # Jupyter shows the report as markdown
        return self.to_markdown()


def run_check(name: str, fn: Callable[[], Check]) -> Check:
    """Run one check; if the model raises, the check fails and says so, instead of the tier crashing.

    The error and the last frames of its traceback go in ``details["error"]`` and the log.
    """
    try:
        return fn()
    except Exception as e:  # the user's model may raise anything; the report must still come back
        log.warning("Check %s raised %s: %s", name, type(e).__name__, e)
        first_line = (str(e).strip().splitlines() or [""])[0]
        return Check(
            name=name, passed=False,
            summary=f"{name} could not run: {type(e).__name__}: {first_line}",
            details={"error": "".join(traceback.format_exception(e, limit=-3)).strip()},
        )


def run_checks(title: str, checks: list[tuple[str, Callable[[], Check]]], progress: bool = True) -> list[Check]:
    """Run named checks in order through :func:`run_check`, with a ``tqdm.auto`` progress bar
    (``title: check name``) when ``progress`` is True: a long check shows which one is running.

    Example::

        >>> [c.name for c in run_checks("Tier 1", [("noop", lambda: Check("noop", True, "ok"))], progress=False)]
        ['noop']
    """
    results = []
    with tqdm(total=len(checks), desc=title, unit="check", disable=not progress, leave=False) as bar:
        for name, fn in checks:
            bar.set_description(f"{title}: {name}")
            results.append(run_check(name, fn))
            bar.update(1)
    return results


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        items = [f"{k}: {_format(v)}" for k, v in list(value.items())[:_MAX_ITEMS]]
        more = f", ... ({len(value)} in all)" if len(value) > _MAX_ITEMS else ""
        return "{" + ", ".join(items) + more + "}"
    if isinstance(value, (list, tuple)):
        items = [_format(v) for v in value[:_MAX_ITEMS]]
        more = f", ... ({len(value)} in all)" if len(value) > _MAX_ITEMS else ""
        return "[" + ", ".join(items) + more + "]"
    text = str(value)
    return text if len(text) <= 300 else text[:300] + "..."
