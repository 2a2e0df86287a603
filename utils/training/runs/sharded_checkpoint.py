"""FSDP checkpoints: each process writes its own shards with ``torch.distributed.checkpoint`` (DCP), so
no process ever holds the whole model; rank 0 writes the small rest as the usual ``latest.pt``.

A run folder then holds::

    checkpoints/latest.pt            the head: step, data position, RNG, scaler, records, and
                                     "sharded": the folder below (its "model" and "optimizer" are empty)
    checkpoints/shards-000008-2/     DCP's files: .metadata and one __<rank>_0.distcp per writer

The guarantees of a ``.pt`` checkpoint hold: the shards are written into ``.partial-...`` and
renamed once every rank is done, then the head is replaced atomically (a reader sees the old
checkpoint or the new one); nothing non-finite is written (every rank checks its shards, and they
agree); a folder is never written twice (its name counts the saves); on load the head is
CRC-checked and the shards read by DCP, which reshards them for any number of processes, or for
one plain process (2 → 1, 1 → 2).

Example::

    >>> save_shards(trainer.state_dict(), Path("runs/fsdp/checkpoints"), "shards-000008-2", True)  # doctest: +SKIP
    >>> load_shards(Path("runs/fsdp/checkpoints/latest.pt"), head, into=weights)   # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

PARTIAL = ".partial-"


def shard_folder_name(step: int, count: int) -> str:
    """A name no earlier save of the run used: the step and the number of saves so far."""
    return f"shards-{step:06d}-{count}"


def local_tensors(tensors) -> list[torch.Tensor]:
    """This process's part of each tensor (a ``DTensor``'s local shard)."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_shards(state: dict, folder: Path, name: str, is_rank_zero: bool) -> Path:
    """Every rank writes its shards of ``state["model"]`` and ``state["optimizer"]`` (as
    :func:`~utils.training.parallel.distributed.weights_state` gives them) into ``folder/name`` (a collective).

    Raises:
        OSError: a rank could not write; the partial folder is left for the next :func:`prune` and
            no head points at it.
    """
    partial, final = folder / f"{PARTIAL}{name}", folder / name
    if is_rank_zero:
        folder.mkdir(parents=True, exist_ok=True)
    _barrier()  # the folder exists before any rank writes into it
    dcp.save({"model": state["model"], "optimizer": state["optimizer"]}, checkpoint_id=partial)
    _barrier()  # every rank's files are complete
    if is_rank_zero:
        partial.rename(final)
    return final


def load_shards(head_path: Path, head: dict, into: dict) -> dict:
    """Read the shards a head names into ``into["model"]`` and ``into["optimizer"]`` (this run's
    sharded state, which DCP fills in place, resharded for this run); returns the two as
    ``{"model": ..., "optimizer": ...}``.

    Raises:
        ValueError: the shard folder is missing or its files do not fit this model.
    """
    shards = head_path.parent / head["sharded"]
    if not (shards / ".metadata").is_file():
        raise ValueError(f"Checkpoint {str(head_path)!r} is damaged: its shards {str(shards)!r} are missing "
                         f"or incomplete (no .metadata). Resume from an earlier run folder or start afresh.")
    state = {"model": into["model"], "optimizer": into["optimizer"]}
    try:
        dcp.load(state, checkpoint_id=shards)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise ValueError(f"Checkpoint {str(head_path)!r}: its shards {str(shards)!r} do not fit this model "
                         f"and optimizer, or are corrupt ({type(e).__name__}: {str(e)[:300]}).") from e
    return state


def prune(folder: Path, keep: set[str], heads=()) -> None:
    """Remove shard folders that neither ``keep`` nor any of the ``heads`` (head files, e.g. best.pt)
    names any more, and partial ones a stopped save left (rank 0). The heads are read only when
    there is a shard folder to judge: a run without FSDP reads nothing."""
    if not folder.is_dir():
        return
    candidates = [path for path in folder.iterdir() if path.is_dir() and path.name.startswith((PARTIAL, "shards-"))]
    if not candidates:
        return
    keep = keep | {name for head in heads for name in _shards_named_by(head)}
    for path in candidates:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _shards_named_by(head: Path) -> list[str]:
    """The shard folder a head file names (none for a missing or unsharded head)."""
    if not head.is_file():
        return []
    name = torch.load(head, map_location="cpu", weights_only=True).get("sharded")
    return [name] if name else []
