"""`python -m utils.training`: see :mod:`utils.training.cli`."""

from utils.training.cli import main

raise SystemExit(main())
