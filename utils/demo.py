"""`make demo`: show the precision plan this machine gets, then (once built) run the notebooks.

Run as ``python -m utils.demo``.
"""

from __future__ import annotations

import sys
import warnings

from utils.training import resolve_precision


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = resolve_precision("auto")
    sys.stdout.write(f"Precision plan for this machine: {plan.describe()}\n")
    for w in caught:
        sys.stdout.write(f"  note: {w.message}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
