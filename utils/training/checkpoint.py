"""Checkpoints that survive a stopped Colab session: atomic writes, strict reads."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path

import torch

FORMAT = "amp-transformer-checkpoint/1"
REQUIRED = ("format", "model", "optimizer", "scheduler", "scaler", "rng", "position", "global_step")
LATEST, BEST = "latest.pt", "best.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint_path(resume_from) -> Path:
    """A checkpoint file, or a run folder (→ its ``checkpoints/latest.pt``)."""
    path = Path(resume_from)
    if path.is_dir():
        candidate = path / "checkpoints" / LATEST
        if not candidate.is_file():
            raise FileNotFoundError(f"resume_from={str(resume_from)!r} is a folder with no checkpoints/{LATEST} in it.")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"resume_from={str(resume_from)!r} does not exist.")
    return path


def load_checkpoint(resume_from) -> tuple[Path, dict]:
    """Read and check a checkpoint; every problem is a ``ValueError`` naming the file.

    Raises:
        FileNotFoundError: no such file, or a run folder without a checkpoint.
        ValueError: the file is truncated, corrupt, or not one of our checkpoints.
    """
    path = resolve_checkpoint_path(resume_from)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise ValueError(f"Checkpoint {str(path)!r} cannot be read; it is truncated or corrupt ({e}).") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"Checkpoint {str(path)!r} is not a checkpoint written by utils.training.train "
                         f"(expected format {FORMAT!r}).")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"Checkpoint {str(path)!r} is incomplete: missing {missing}.")
    return path, ckpt
