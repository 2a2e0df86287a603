"""The bottom layer: helpers every other part may import, which import nothing of ``utils``.

- :mod:`~utils.common.lazy`: packages whose names load their module on first use (PEP 562);
- :mod:`~utils.common.strict_json`: JSON without NaN/inf (a non-finite float becomes ``null``);
- :mod:`~utils.common.checks`: one check of an integer, a number or a choice, its error in the caller's words;
- :mod:`~utils.common.figures`: a matplotlib figure outside pyplot (matplotlib loaded on first use).
"""
