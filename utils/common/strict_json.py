"""Strict JSON for the files runs write (``metrics.jsonl``, ``benchmark.json``): jq and pandas read
them, and JSON has no NaN or infinity, so a non-finite number is written as ``null``.

Example::

    >>> json_safe({"loss": float("nan"), "steps": [1.0, float("inf")]})
    {'loss': None, 'steps': [1.0, None]}
"""

from __future__ import annotations

import math


def json_safe(value):
    """``value`` with every non-finite float (in lists, tuples and dicts too) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, tuple):
        return tuple(json_safe(v) for v in value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value
