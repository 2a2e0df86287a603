"""Checkpoints that survive a stopped Colab session: the file format (written atomically, read back
with its CRC and structure checked), when one is written, and whether it may resume this run. Every
resume compatibility check lives here. What goes in one is the trainer's business
(``Trainer.state_dict()``): this module receives and returns dicts.

Example::

    >>> ckpt = Checkpointer("runs/demo", World(), every_minutes=10)          # doctest: +SKIP
    >>> ckpt.prepare(overwrite=False)       # refuses a folder that holds a run   # doctest: +SKIP
    >>> ckpt.save(trainer.state_dict())     # atomic                             # doctest: +SKIP
    >>> path, state = load_checkpoint("runs/demo")   # CRC and structure checked  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch

from utils.common.checks import is_int
from utils.training.amp.precision import PrecisionWarning, precision_facts
from utils.training.runs.sharded_checkpoint import prune, save_shards, shard_folder_name
from utils.training.settings import TrainSettings

FORMAT = "amp-transformer-checkpoint/1"
REQUIRED = ("format", "model", "optimizer", "scheduler", "scaler", "rng", "position", "global_step")
LATEST, BEST = "latest.pt", "best.pt"
METRICS = "metrics.jsonl"
DEFAULT_EVERY_MINUTES = TrainSettings.checkpoint_minutes  # defined, and explained, in settings.py
_NONE = type(None)
# What a checkpoint holds, nested: a type, a tuple of types, or a dict of what its keys hold.
SCHEMA = {
    "format": str, "model": dict, "optimizer": {"state": dict, "param_groups": list}, "scheduler": dict,
    "scaler": dict, "rng": {"torch": torch.Tensor, "python": tuple}, "epoch_rng": (dict, _NONE),
    "position": {"epoch": int, "batch": int}, "world_size": int, "global_step": int,
    "skipped_steps": int, "precision": str, "best_val_loss": (float, _NONE), "args": dict,
    "history": list, "epochs": list, "sharded": (str, _NONE),
}


class CheckpointWriteError(OSError):
    """A checkpoint or metrics file could not be written (full disk, read-only folder); the previous
    checkpoint is intact and no partial file is left."""


# ---- writing -----------------------------------------------------------------------------------
def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (torch wraps a failed write in a RuntimeError 'unexpected pos')."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_error(path: Path, e: OSError, what: str = "checkpoint") -> CheckpointWriteError:
    """One message naming the file and the cause (ENOSPC, EACCES, ...)."""
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    cause = f"{e.strerror or e} ({name})" if name else f"{e.strerror or e}"
    return CheckpointWriteError(e.errno, f"Cannot write the {what} {str(path)!r}: {cause}. Free space or "
                                         f"pick a writable run_dir; the previous checkpoint is intact.")


def save_atomic(obj: dict, path: Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a reader never sees half a file.

    Raises:
        CheckpointWriteError: the folder is full or not writable; ``path`` is left as it was and the
            temporary file removed.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error(e) if isinstance(e, (OSError, RuntimeError)) else None
        if cause is not None:
            raise write_error(path, cause) from e
        raise
    return path


def sweep_temp_files(folder: Path) -> list[Path]:
    """Remove ``.latest.pt.*`` / ``.best.pt.*`` left by saves that a ``kill -9`` cut short."""
    if not folder.is_dir():
        return []
    stale = [p for name in (LATEST, BEST) for p in folder.glob(f".{name}.*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ---- reading -----------------------------------------------------------------------------------
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


def _schema_problems(value, schema, where: str) -> list[str]:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where} is a {type(value).__name__}, expected a dict"]
        return [p for key, sub in schema.items() if key in value
                for p in _schema_problems(value[key], sub, f"{where}.{key}" if where else key)]
    if schema is float and is_int(value):
        return []
    if not isinstance(value, schema) or (schema is int and isinstance(value, bool)):
        names = "/".join(t.__name__ for t in (schema if isinstance(schema, tuple) else (schema,)))
        return [f"{where} is a {type(value).__name__}, expected {names}"]
    return []


def check_structure(path: Path, ckpt) -> None:
    """Nested keys and types (``SCHEMA``), the RNG state's dtype, tensors as the model's values."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"Checkpoint {str(path)!r} is not a checkpoint written by utils.training.train "
                         f"(expected format {FORMAT!r}).")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"Checkpoint {str(path)!r} is incomplete: missing {missing}.")
    problems = _schema_problems(ckpt, SCHEMA, "")
    position = ckpt["position"] if isinstance(ckpt["position"], dict) else {}
    missing = [f"position.{k} is missing" for k in ("epoch", "batch") if k not in position]
    rng = ckpt["rng"].get("torch") if isinstance(ckpt["rng"], dict) else None
    if isinstance(rng, torch.Tensor) and rng.dtype != torch.uint8:
        problems.append(f"rng.torch is a {rng.dtype} tensor, expected torch.uint8")
    if isinstance(ckpt["model"], dict):
        problems += [f"model[{k!r}] is a {type(v).__name__}, expected a tensor"
                     for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)][:3]
    if missing or problems:
        raise ValueError(f"Checkpoint {str(path)!r} is damaged: {'; '.join(missing + problems)}.")


def check_crc(path: Path) -> None:
    """``torch.save`` writes a zip: its CRCs catch flipped bytes in tensor data that unpickling does not."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"Checkpoint {str(path)!r} cannot be read; it is truncated or corrupt ({e}).") from e
    if bad is not None:
        raise ValueError(f"Checkpoint {str(path)!r} cannot be read; it is truncated or corrupt "
                         f"(CRC mismatch in {bad!r}).")


def load_checkpoint(resume_from) -> tuple[Path, dict]:
    """Read and check a checkpoint (zip CRC, then structure); every problem is a ``ValueError``
    naming the file.

    Raises:
        FileNotFoundError: no such file, or a run folder without a checkpoint.
        ValueError: the file is truncated, corrupt, damaged, or not one of our checkpoints.

    .. note:: The CRC check reads the file once more (about 30 ms for 40 MB on one CPU core).
    """
    path = resolve_checkpoint_path(resume_from)
    check_crc(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise ValueError(f"Checkpoint {str(path)!r} cannot be read; it is truncated or corrupt ({e}).") from e
    check_structure(path, ckpt)
    return path, ckpt


# ---- may this checkpoint resume this run? ------------------------------------------------------
def check_world(path, state: dict, batch_size: int, world_size: int, tensor_data: bool) -> None:
    """A checkpoint resumes on any world size whose global batch (``batch_size × world_size``) is
    the one it was trained with: its data position counts global batches.

    Raises:
        ValueError: the global batch differs, or non-tensor data on another world size.
    """
    saved = state.get("args", {}).get("batch_size")
    saved_world = state.get("world_size", 1)
    then, now = (saved or 0) * saved_world, batch_size * world_size
    if saved is not None and then != now and saved_world == world_size == 1:
        raise ValueError(
            f"Checkpoint {str(path)!r} was trained with batch_size={saved!r}, but this call has "
            f"batch_size={batch_size!r}; the data position would not match. Pass batch_size={saved!r}."
        )
    if saved is not None and then != now:
        fix = (f"Pass batch_size={then // world_size}" if then % world_size == 0 else
               f"Use a number of processes that divides {then}")
        raise ValueError(
            f"Checkpoint {str(path)!r} was trained with a global batch of {then} (batch_size={saved} × "
            f"{saved_world} process(es)), but this run's is {now} (batch_size={batch_size} × "
            f"{world_size} process(es)); the data position would not match. {fix}."
        )
    if saved_world != world_size and not tensor_data:
        raise ValueError(
            f"Checkpoint {str(path)!r} was trained by {saved_world} process(es), this run has "
            f"{world_size}: only tensor data is resharded exactly. Resume with {saved_world} process(es)."
        )


def check_args(path, state: dict, settings: TrainSettings) -> None:
    """Settings that fix the data position must match (batch_size: :func:`check_world`)."""
    saved = state.get("args", {})
    for name in ("grad_accum_steps", "seed"):
        if name in saved and saved[name] != getattr(settings, name):
            raise ValueError(
                f"Checkpoint {str(path)!r} was trained with {name}={saved[name]!r}, but this call has "
                f"{name}={getattr(settings, name)!r}; the data position would not match. Pass {name}={saved[name]!r}."
            )


def check_steps(path, state: dict, max_steps: int | None) -> None:
    """A resume must have steps left: ``max_steps`` above the checkpoint's step (equal only while the
    run still owes its final validation).

    Raises:
        ValueError: ``max_steps`` at or below the step already done.
    """
    done = state["global_step"]
    finished = any(e.get("step") == done for e in state.get("epochs", []))
    if max_steps is not None and (max_steps < done or (max_steps == done and finished)):
        raise ValueError(
            f"max_steps={max_steps!r} is not allowed: checkpoint {str(path)!r} is already at step {done}, "
            f"so there is nothing to train. Pass max_steps > {done} (the steps of the whole run, those "
            f"already done included)."
        )


def check_resume(path, state: dict, settings: TrainSettings, *, world_size: int, tensor_data: bool, plan) -> None:
    """Every check of a run against the checkpoint it resumes, before anything is loaded or written:
    the global batch (:func:`check_world`), the data position (:func:`check_args`), the steps left
    (:func:`check_steps`), the strategy (:func:`check_sharding`) and the precision (:func:`check_precision`,
    which warns when it changes soundly).

    Args:
        settings: the run's settings; ``world_size``: its processes; ``tensor_data``: its data is a
            tensor (resharded exactly on another world size); ``plan``: its ``PrecisionPlan``.

    Raises:
        ValueError: naming the setting, its value and the one the checkpoint needs.
    """
    check_world(path, state, settings.batch_size, world_size, tensor_data)
    check_args(path, state, settings)
    check_steps(path, state, settings.max_steps)
    check_sharding(path, state, settings.strategy)
    check_precision(path, state, plan)


def check_precision(path, state: dict, plan) -> None:
    """Resuming in another precision is sound while the weights keep their dtype (32-true and the
    ``-mixed`` precisions all hold fp32 weights): it warns, and says what happens to the scaler state
    (a saved one is loaded only where this run has a GradScaler).

    Raises:
        ValueError: the weights would change dtype (a ``-true`` half precision on one side).
    """
    saved = state.get("precision")
    if saved is None or saved == plan.name:
        return
    then = precision_facts(saved).param_dtype  # "-true" halves hold the weights in half, the rest fp32
    if then != plan.param_dtype:
        raise ValueError(
            f"Checkpoint {str(path)!r} was trained in precision={saved!r} (weights in {then}), "
            f"this run asks for {plan.name!r} (weights in {plan.param_dtype}): resuming would change the "
            f"weights' dtype. Pass precision={saved!r}."
        )
    scaler = ("its GradScaler state is dropped" if state.get("scaler") and not plan.use_scaler else
              "a fresh GradScaler starts at the default scale" if plan.use_scaler and not state.get("scaler") else
              "the GradScaler state carries over")
    warnings.warn(f"Checkpoint {str(path)!r} was trained in precision={saved!r}; resuming in {plan.name!r}: "
                  f"{scaler}. The weights and optimizer state carry over unchanged.", PrecisionWarning,
                  stacklevel=4)


# ---- the run folder ----------------------------------------------------------------------------
def holds_run(run_dir: Path) -> bool:
    """A run was written here: a checkpoint, or a non-empty metrics.jsonl."""
    metrics = run_dir / METRICS
    return (run_dir / "checkpoints" / LATEST).is_file() or (metrics.is_file() and metrics.stat().st_size > 0)


def claim_run_dir(run_dir, overwrite: bool, argument: str = "run_dir") -> Path | None:
    """Refuse a fresh run into a folder that holds one; ``overwrite=True`` moves the old run aside.

    Returns:
        The folder the old run was moved to, or None.

    Raises:
        ValueError: the folder holds a run and ``overwrite`` is False.
    """
    run_dir = Path(run_dir)
    if not holds_run(run_dir):
        return None
    if not overwrite:
        raise ValueError(
            f"{argument}={str(run_dir)!r} already holds a run (checkpoints/{LATEST} or {METRICS}). Continue it "
            f"with resume_from={str(run_dir)!r} (CLI: --resume), pick a new folder, or pass overwrite=True "
            f"(CLI: --overwrite) to move the old run aside."
        )
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    while (run_dir / f"replaced-{stamp}{f'-{n}' if n else ''}").exists():
        n += 1
    archive = run_dir / f"replaced-{stamp}{f'-{n}' if n else ''}"
    archive.mkdir()
    for name in ("checkpoints", METRICS, "command.json"):  # wandb/ keeps one folder per W&B run
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(archive / name))
    return archive


class Checkpointer:
    """Where and when a run's checkpoints are written, and which is the last good one.

    Example::

        >>> ckpt = Checkpointer("runs/demo", World(), every_minutes=10)        # doctest: +SKIP
        >>> ckpt.due(global_step=120)   # every_steps, or every_minutes passed   # doctest: +SKIP

    Args:
        run_dir: the run folder (``None``: nothing is written).
        world: the run's processes; rank 0 alone writes.
        every_steps: also save every N optimizer steps (None: off).
        every_minutes: also save when this much wall time passed since the last save (None: off;
            default 10): checked at log steps only, so ranks agree without an extra collective.
    """

    def __init__(self, run_dir, world, every_steps: int | None = None,
                 every_minutes: float | None = DEFAULT_EVERY_MINUTES):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.folder = self.run_dir / "checkpoints" if self.run_dir is not None else None
        self.world, self.every_steps, self.every_minutes = world, every_steps, every_minutes
        self.path: str | None = None  # the last checkpoint saved or restored: the last good one
        self.step: int | None = None
        self.saving = False  # an interrupt during a save waits for it (see interrupts.StopSignals)
        self.saves = 0  # saves so far: names each save's shard folder under FSDP
        self._last_save = time.monotonic()

    def prepare(self, overwrite: bool) -> None:
        """Before anything is written: refuse (or move aside) another run than the one resumed,
        and sweep stale temp files."""
        if self.run_dir is None or not self.world.is_rank_zero:
            return
        resumed_here = self.path is not None and Path(self.path).resolve().parent == self.folder.resolve()
        if not resumed_here:
            claim_run_dir(self.run_dir, overwrite)
        sweep_temp_files(self.folder)

    def due(self, global_step: int, log_step: bool) -> bool:
        if self.folder is None:
            return False
        if self.every_steps and global_step % self.every_steps == 0:
            return True
        minutes = self.every_minutes
        return bool(log_step and minutes and time.monotonic() - self._last_save >= 60 * minutes)

    def last_good(self) -> str:
        return (f"The last good checkpoint is {self.path} (step {self.step})." if self.path else
                "No checkpoint was saved before it.")

    def resumed_from(self, path, step: int) -> None:
        """The run continues the checkpoint ``path`` of step ``step``: the last good one so far."""
        self.path, self.step = str(path), step

    def save(self, state: dict, best: bool = False) -> None:
        """Write ``state`` (what ``Trainer.state_dict()`` returns) to ``latest.pt`` (and ``best.pt``),
        atomically; under FSDP every rank first writes its shards of the model and optimizer into a
        folder of their own, which the head names. The caller checks first that ``state`` is finite.

        Raises:
            CheckpointWriteError: the disk is full or the folder read-only; the previous file is intact.
        """
        if self.folder is None:
            return
        self._last_save = time.monotonic()
        self.saving = True
        try:
            shards = self._save_shards(state) if self.world.strategy == "fsdp" else None
            if self.world.is_rank_zero:  # rank 0 writes; the others only note where
                head = {"format": FORMAT, **state, "sharded": shards}
                if shards is not None:  # the model and optimizer live in the shard folder
                    head.update(model={}, optimizer={"state": {}, "param_groups": []})
                save_atomic(head, self.folder / LATEST)
                if best:
                    save_atomic(head, self.folder / BEST)
                prune(self.folder, keep={shards}, heads=[self.folder / BEST])  # what no head names
        finally:
            self.saving = False
        self.resumed_from(self.folder / LATEST, state["global_step"])

    def _save_shards(self, state: dict) -> str:
        """Every rank writes its shards into a folder no earlier save of the run used; its name."""
        self.saves += 1
        while (self.folder / shard_folder_name(state["global_step"], self.saves)).exists():
            self.saves += 1  # a resumed run saving again at its checkpoint's step
        name = shard_folder_name(state["global_step"], self.saves)
        try:
            return save_shards(state, self.folder, name, self.world.is_rank_zero).name
        except OSError as e:
            raise write_error(self.folder / name, e) from e


def check_sharding(path, state: dict, strategy: str) -> None:
    """A sharded (FSDP) checkpoint resumes under any strategy and number of processes; a full one
    (DDP, one process) resumes under DDP or in one process only.

    Raises:
        ValueError: a full checkpoint resumed with ``strategy="fsdp"``.
    """
    if strategy == "fsdp" and not state.get("sharded"):
        raise ValueError(
            f"Checkpoint {str(path)!r} holds a full, unsharded state (written with strategy='ddp' or by one "
            f"process); resuming it with strategy='fsdp' is not supported. Resume it with strategy='ddp', or "
            f"start the FSDP run afresh. (A sharded checkpoint resumes with either strategy.)"
        )
