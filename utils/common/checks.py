"""Checking an argument's value, one way: an integer (never a bool) in a range, a number in a range, one
of a few choices. Each check returns the value or raises a ``ValueError`` that names the argument, the
value and what is allowed.

Example::

    >>> check_int("batch_size", 16, minimum=1)
    16
    >>> check_int("batch_size", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: batch_size=0 is not allowed: it must be an integer >= 1.
    >>> check_int("steps", 0, minimum=1, message="benchmark_amp({name}={value!r}): {name} must be {rule}.")
    Traceback (most recent call last):
    ...
    ValueError: benchmark_amp(steps=0): steps must be an integer >= 1.

Each module words its errors in its own voice: ``message`` is a ``str.format`` template with the fields
``name``, ``value``, ``rule`` (what is allowed, e.g. ``an integer >= 1``) and any other keyword given
(``call=``). The default is :data:`NOT_ALLOWED`.
"""

from __future__ import annotations

import math

NOT_ALLOWED = "{name}={value!r} is not allowed: it must be {rule}."


def is_int(value, minimum: int | None = None, maximum: int | None = None) -> bool:
    """Whether ``value`` is an ``int`` (``True`` is not one) within ``[minimum, maximum]`` (None: unbounded)."""
    return (not isinstance(value, bool) and isinstance(value, int)
            and (minimum is None or value >= minimum) and (maximum is None or value <= maximum))


def is_number(value, minimum: float | None = None, *, above: float | None = None, below: float | None = None) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (not a bool, not NaN) with ``value >= minimum``,
    ``value > above`` and ``value < below`` (each None: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return ((minimum is None or value >= minimum) and (above is None or value > above)
            and (below is None or value < below))


def int_rule(minimum: int | None = None, maximum: int | None = None, optional: bool = False) -> str:
    """What :func:`check_int` allows, in words: ``an integer >= 1``, ``an integer in 0..9``, ``None or ...``."""
    if minimum is not None and maximum is not None:
        rule = f"an integer in {minimum}..{maximum}"
    elif minimum is not None:
        rule = f"an integer >= {minimum}"
    elif maximum is not None:
        rule = f"an integer <= {maximum}"
    else:
        rule = "an integer"
    return f"None or {rule}" if optional else rule


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None, optional: bool = False,
              rule: str | None = None, message: str = NOT_ALLOWED, **fields):
    """``value`` when it is an ``int`` (not a bool) in ``[minimum, maximum]``, or None when ``optional``.

    Args:
        name: the argument's name, as the caller's caller typed it.
        minimum, maximum: the bounds, inclusive (default None: none).
        optional: None is allowed too (default False).
        rule: what is allowed, in words (default: :func:`int_rule`'s).
        message: the error's template (default :data:`NOT_ALLOWED`); ``fields`` fill its other fields.

    Raises:
        ValueError: ``message`` filled in.
    """
    if (optional and value is None) or is_int(value, minimum, maximum):
        return value
    raise ValueError(message.format(name=name, value=value, rule=rule or int_rule(minimum, maximum, optional),
                                    **fields))


def check_number(name: str, value, *, minimum: float | None = None, above: float | None = None,
                 optional: bool = False, rule: str, message: str = NOT_ALLOWED, **fields):
    """``value`` when it is a number (:func:`is_number`) ``>= minimum`` and ``> above``, or None when
    ``optional``; else ``message`` filled in (``rule`` says what is allowed, e.g. ``a number > 0``).

    Raises:
        ValueError: ``message`` filled in.
    """
    if (optional and value is None) or is_number(value, minimum, above=above):
        return value
    raise ValueError(message.format(name=name, value=value, rule=rule, **fields))


def check_choice(name: str, value, choices, *, rule: str | None = None, message: str = NOT_ALLOWED, **fields):
    """``value`` when it is one of ``choices``; else ``message`` filled in (``rule`` default:
    ``one of 'a', 'b'``).

    Example::

        >>> check_choice("mode", "cloud", ("online", "offline"))
        Traceback (most recent call last):
        ...
        ValueError: mode='cloud' is not allowed: it must be one of 'online', 'offline'.

    Raises:
        ValueError: ``message`` filled in.
    """
    if value in choices:
        return value
    rule = rule or f"one of {', '.join(map(repr, choices))}"
    raise ValueError(message.format(name=name, value=value, rule=rule, **fields))
