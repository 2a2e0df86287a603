"""Checkpoints that survive a stopped Colab session: what goes in one, when it is written, how it is
checked when read back, and whether it may resume this run. Every resume compatibility check lives here.

Example::

    >>> ckpt = Checkpointer("runs/demo", World(), every_minutes=10)          # doctest: +SKIP
    >>> ckpt.prepare(fresh=True, overwrite=False)  # refuses a folder that holds a run  # doctest: +SKIP
    >>> ckpt.save(trainer)                          # finite state only, atomic          # doctest: +SKIP
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch

from utils.training.settings import TrainSettings
from utils.training.runs.sharded_checkpoint import (
    load_shards,
    local_tensors,
    prune,
    save_shards,
    shard_folder_name,
)

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


# ---- RNG ---------------------------------------------------------------------------------------
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


def epoch_batches(batches, epoch: int, start: int, resume_rng, epoch_rng):
    """This epoch's batches from batch ``start`` on, the RNG replayed so that a resumed DataLoader
    reshuffles as the uninterrupted run did. Returns ``(iterator, RNG state at the epoch's start)``."""
    from utils.training.batches import TensorBatches
    from utils.training.parallel.distributed import set_sampler_epoch

    if isinstance(batches, TensorBatches):  # its order depends on (seed, epoch) alone
        if resume_rng is not None:
            set_rng_state(resume_rng)
        return batches.epoch(epoch, start), epoch_rng
    set_sampler_epoch(batches, epoch)
    if resume_rng is not None and start > 0 and epoch_rng is not None:
        set_rng_state(epoch_rng)
        it = iter(batches)
        for _ in range(start):  # a sampler draws its seed at the first next(): replay, don't jump
            next(it)
        set_rng_state(resume_rng)
        return it, epoch_rng
    if resume_rng is not None:
        set_rng_state(resume_rng)
    at_start = rng_state()  # before iter(): a DataLoader draws its seed there
    return iter(batches), at_start


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


def all_finite(tensors) -> bool:
    """True when every float tensor is finite: one max-abs per device group, then ONE host sync.

    .. note:: Called before each save only; the steps themselves never sync for it.
    """
    groups: dict = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    flags = []
    for ts in groups.values():
        norms = torch._foreach_norm(ts, float("inf"))  # max |x|: NaN or inf propagates, no overflow
        flags.append(torch.isfinite(torch.stack(norms)).all().cpu())
    return bool(torch.stack(flags).all()) if flags else True


def _optimizer_tensors(optimizer) -> list:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


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
    if schema is float and isinstance(value, int) and not isinstance(value, bool):
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


def check_args(path, state: dict, args) -> None:
    """Settings that fix the data position must match (batch_size: :func:`check_world`)."""
    saved = state.get("args", {})
    for name in ("grad_accum_steps", "seed"):
        if name in saved and saved[name] != getattr(args, name):
            raise ValueError(
                f"Checkpoint {str(path)!r} was trained with {name}={saved[name]!r}, but this call has "
                f"{name}={getattr(args, name)!r}; the data position would not match. Pass {name}={saved[name]!r}."
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


def check_resume(path, state: dict, args, world_size: int, tensor_data: bool) -> None:
    """Every check of the run's settings against a checkpoint, before anything is loaded or written:
    the global batch (:func:`check_world`), the data position (:func:`check_args`) and the steps left
    (:func:`check_steps`).

    Raises:
        ValueError: naming the setting, its value and the one the checkpoint needs.
    """
    check_world(path, state, args.batch_size, world_size, tensor_data)
    check_args(path, state, args)
    check_steps(path, state, args.max_steps)


def check_precision(path, state: dict, plan) -> bool:
    """Resuming in another precision is sound while the weights keep their dtype (32-true and the
    ``-mixed`` precisions all hold fp32 weights): it warns, and says what happens to the scaler state.
    Returns whether the saved scaler state is to be loaded.

    Raises:
        ValueError: the weights would change dtype (a ``-true`` half precision on one side).
    """
    from utils.training.amp.precision import PrecisionWarning, precision_facts

    saved = state.get("precision")
    if saved is None or saved == plan.name:
        return True
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
    return bool(state.get("scaler")) and plan.use_scaler


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
    """Where and when a run's checkpoints are written, and how one is restored.

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

    def save(self, trainer, best: bool = False) -> None:
        """Save ``trainer``'s state to ``latest.pt`` (and ``best.pt``) if every weight and optimizer
        value is finite.

        Raises:
            FloatingPointError: a non-finite step not logged yet, or non-finite weights or optimizer
                state; nothing is written.
            ValueError: a bad batch not logged yet (see :class:`StepChecks`); nothing is written.
            CheckpointWriteError: the disk is full or the folder read-only; the previous file is intact.
        """
        if self.folder is None:
            return
        trainer.checks.verify(None, self.last_good(), trainer.args.lr)  # a bad step not yet logged
        if not _finite_everywhere(trainer):
            raise FloatingPointError(
                f"The weights or optimizer state are not finite at step {trainer.global_step} in "
                f"{trainer.precision.name}: not saved. {self.last_good()} Likely causes: a learning rate too "
                f"high (lr={trainer.args.lr}) or activations that overflow; try a lower lr or max_grad_norm=1.0."
            )
        self._last_save = time.monotonic()
        shards = None
        self.saving = True
        try:
            if self.world.strategy == "fsdp":  # every rank writes its shards, then rank 0 the head
                self.saves += 1
                while (self.folder / shard_folder_name(trainer.global_step, self.saves)).exists():
                    self.saves += 1  # a resumed run saving again at its checkpoint's step
                name = shard_folder_name(trainer.global_step, self.saves)
                try:
                    shards = save_shards(trainer, self.folder, name).name
                except OSError as e:
                    raise write_error(self.folder / name, e) from e
            if self.world.is_rank_zero:  # rank 0 writes; the others only note where
                state = state_of(trainer, shards)
                save_atomic(state, self.folder / LATEST)
                if best:
                    save_atomic(state, self.folder / BEST)
                prune(self.folder, keep={shards}, heads=[self.folder / BEST])  # what no head names
        finally:
            self.saving = False
        self.path, self.step = str(self.folder / LATEST), trainer.global_step

    def restore(self, trainer, resume_from) -> None:
        """Load a checkpoint into ``trainer`` after every compatibility check.

        Raises:
            ValueError: the file is damaged, or does not fit this model, data position or precision.
        """
        path, state = load_checkpoint(resume_from)
        check_resume(path, state, trainer.args, trainer.world.world_size, trainer.tensor_data)
        check_sharding(path, state, trainer.world.strategy)
        load_scaler = check_precision(path, state, trainer.precision)
        if state.get("sharded"):
            load_shards(trainer, path, state)
        else:
            _load_full(trainer, path, state)
        trainer.scheduler.load_state_dict(state["scheduler"])
        if load_scaler and trainer.scaler.is_enabled():
            trainer.scaler.load_state_dict(state["scaler"])
        _load_position(trainer, state)
        self.path, self.step = str(path), state["global_step"]


def _load_full(trainer, path: Path, state: dict) -> None:
    try:
        trainer.model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"Checkpoint {str(path)!r} does not fit this model: {e}") from e
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise ValueError(f"Checkpoint {str(path)!r} has optimizer state that does not fit: {e}") from e


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


def _finite_everywhere(trainer) -> bool:
    """Every weight and optimizer value finite; under FSDP each rank checks its shards and all agree."""
    tensors = local_tensors([*trainer.model.parameters(), *_optimizer_tensors(trainer.optimizer)])
    ok = all_finite(tensors)
    if trainer.world.strategy != "fsdp" or not trainer.world.is_distributed:
        return ok
    bad = trainer.world.max(torch.tensor(float(not ok), device=trainer.precision.device))
    return not bool(bad)


def _load_position(trainer, state: dict) -> None:
    """The counters, the data position and the records of a checkpoint, back into the trainer."""
    if trainer.scaler.is_enabled():
        trainer.scale = trainer.scaler.get_scale()
    trainer.global_step, trainer.skipped_steps = state["global_step"], state.get("skipped_steps", 0)
    trainer.current_epoch, trainer.batch_in_epoch = state["position"]["epoch"], state["position"]["batch"]
    trainer.best_val_loss = state.get("best_val_loss")
    trainer.history, trainer.epoch_records = list(state.get("history", [])), list(state.get("epochs", []))
    trainer.epoch_rng, trainer.resume_rng = state.get("epoch_rng"), state["rng"]
    trainer.resumed = True


def state_of(trainer, shards: str | None = None) -> dict:
    """Everything a resume needs, in the ``SCHEMA`` layout; with ``shards`` (FSDP) the model and
    optimizer live in that folder of DCP shards, and the head holds the rest."""
    sharded = shards is not None
    return {
        "format": FORMAT, "model": {} if sharded else trainer.model.state_dict(), "sharded": shards,
        "optimizer": {"state": {}, "param_groups": []} if sharded else trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(), "rng": rng_state(), "epoch_rng": trainer.epoch_rng,
        "position": {"epoch": trainer.current_epoch, "batch": trainer.batch_in_epoch},  # global batches
        "world_size": trainer.world.world_size,
        "global_step": trainer.global_step, "skipped_steps": trainer.skipped_steps,
        "precision": trainer.precision.name, "best_val_loss": trainer.best_val_loss,
        "args": {k: v for k, v in vars(trainer.args).items() if k != "progress"},
        "history": trainer.history, "epochs": trainer.epoch_records,
    }
