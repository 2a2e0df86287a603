"""The bottom layer: helpers every other part may import, which import nothing of ``utils``.

- :mod:`~utils.common.lazy`: packages whose names load their module on first use (PEP 562);
- :mod:`~utils.common.strict_json`: JSON without NaN/inf (a non-finite float becomes ``null``).
"""
