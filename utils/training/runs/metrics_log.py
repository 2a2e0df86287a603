"""Where a run's records go: ``metrics.jsonl`` (one JSON object a line) and the callbacks.

Example::

    >>> log = MetricsLog("runs/demo", callbacks=[], rank_zero=True)    # doctest: +SKIP
    >>> log.open(keep=None)                                            # doctest: +SKIP
    >>> log.write({"type": "step", "step": 10, "loss": 2.3})           # doctest: +SKIP
    >>> log.call("on_step_end", trainer, metrics)                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

from utils.training.runs.checkpoint import METRICS, write_error


def repair(path: Path, keep: int | None = None) -> int:
    """Cut a torn last line (a kill or a full disk mid-write) and, on resume, the records written
    after the checkpoint (``keep``: how many it knows); the resumed run writes those again.

    Returns:
        How many bytes were cut.
    """
    if not path.is_file():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # after the last complete record (0: none)
    if end < len(data) and _is_record(data[end:]):  # whole, only its newline missing: keep it
        with path.open("ab") as f:
            f.write(b"\n")
        data += b"\n"
        end = len(data)
    if end < len(data):
        warnings.warn(f"{path}: its last line was incomplete (a run stopped mid-write); it was removed.",
                      RuntimeWarning, stacklevel=3)
    if keep is not None:
        lines = data[:end].splitlines(keepends=True)
        end = sum(len(line) for line in lines[:keep])
    if end < len(data):
        os.truncate(path, end)
    return len(data) - end


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return False


class MetricsLog:
    """The JSONL writer and the callback dispatch of a run (rank 0 alone writes and calls back).

    Args:
        run_dir: the run folder (None: no file).
        callbacks: objects with any of the hooks ``train()`` documents.
        rank_zero: False on the other processes of a distributed run: they write and call nothing.
    """

    def __init__(self, run_dir, callbacks, rank_zero: bool = True):
        self.path = Path(run_dir) / METRICS if run_dir is not None and rank_zero else None
        self.callbacks = list(callbacks) if rank_zero else []
        self._file = None

    def open(self, keep: int | None = None) -> None:
        """Open for appending, after :func:`repair`. ``keep``: records the resumed checkpoint holds."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair(self.path, keep)
            self._file = open(self.path, "ab")
        except OSError as e:
            raise write_error(self.path, e, "metrics file") from e

    def write(self, record: dict) -> None:
        """Append one record; a failed write leaves the file as it was before it.

        Raises:
            CheckpointWriteError: the disk is full or the file not writable (the message names it).
        """
        if self._file is None:
            return
        # Strict JSON (jq, pandas): a non-finite number is written as null.
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        line = (json.dumps(clean) + "\n").encode()
        start = self._file.tell()
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as e:
            self._drop_after(start)
            raise write_error(self.path, e, "metrics file") from e

    def _drop_after(self, start: int) -> None:
        file, self._file = self._file, None
        try:
            file.close()
        except OSError:
            pass  # the buffered part of the failed line is what could not be written
        try:
            os.truncate(self.path, start)
        except OSError as e:  # the next open() cuts the torn line instead
            warnings.warn(f"{self.path}: could not remove a partial line ({e}).", RuntimeWarning, stacklevel=3)

    def call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if callable(fn):
                fn(*args)

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
