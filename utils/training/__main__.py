"""`python -m utils.training`: see :mod:`utils.training.cli`."""

import signal

from utils.training.cli import main

status = main()
# The run is over and its message printed: a late Ctrl-C (the second of a double press) must not end
# the interpreter's shutdown with a KeyboardInterrupt traceback.
signal.signal(signal.SIGINT, signal.SIG_IGN)
raise SystemExit(status)
