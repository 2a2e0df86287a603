"""Packages whose names load their module on first use (PEP 562), so importing one part is cheap.

Example::

    >>> __getattr__, __dir__ = lazy_exports(__name__, {"train": "utils.training.loop.trainer"})   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``package.NAME`` imports ``exports[NAME]`` the first
    time it is read and keeps it in the package, so later reads cost nothing.

    Args:
        package: the package's ``__name__``.
        exports: each public name and the module that defines it.
    """

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
