"""Several processes from a notebook: :func:`launch` forks them, sets what ``torchrun`` would set, and
hands rank 0's return value back to the kernel.

Example::

    >>> from utils.training.parallel.launch import launch
    >>> result = launch(train, model, ids, num_processes=2, max_steps=20, run_dir="runs/ddp")  # doctest: +SKIP
    >>> result.final_loss, result.checkpoint_path                                    # doctest: +SKIP
    (4.71, 'runs/ddp/checkpoints/latest.pt')

Why fork: a function or model defined in a notebook cell cannot be pickled for ``spawn`` (the child
would re-import ``__main__``, which a kernel does not have as a file), and forked children share
the kernel's memory, so the model and data are not copied by hand. Accelerate's
``notebook_launcher`` makes the same choice. Fork is unsafe once CUDA is initialised in the parent
(the children inherit a driver state they cannot use), so :func:`launch` refuses then.

Each child gets ``MASTER_ADDR``/``MASTER_PORT`` (a free local port), ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``, and one CPU thread (as ``torchrun`` gives), so ``train()`` in it joins a process group exactly as under
``torchrun`` (nccl on GPUs, gloo on a CPU). Rank 0's progress bar is drawn once, by the kernel.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait

import torch

from utils.common.checks import check_int

GRACE_S = 10.0  # after a failure or an interrupt: how long the other ranks get to stop on their own
_relay = None  # in a launched child: the pipe rank 0 sends progress through
_weights: dict | None = None  # in a launched child: the trained weights, when the model no longer holds them


class WorkerError(RuntimeError):
    """A launched process failed; the message holds its rank and its traceback."""

    def __init__(self, rank: int, text: str):
        super().__init__(text)
        self.rank = rank


@dataclass(frozen=True)
class _Failed:
    rank: int
    traceback: str


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_launch(num_processes, call: str = "launch", argument: str = "num_processes") -> None:
    """Bad input, before any process starts.

    Raises:
        ValueError: ``num_processes`` not an integer >= 1, more processes than GPUs on a CUDA
            machine, or (on a CPU) more than its cores; CUDA already initialised in this process;
            already inside a launched or torchrun process.
    """
    check_int(argument, num_processes, minimum=1, call=call,
              message="{call}({name}={value!r}) is not allowed: it must be {rule}.")
    if torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        raise ValueError(f"{call}({argument}={num_processes}) is not allowed: this machine has "
                         f"{torch.cuda.device_count()} GPU(s); use at most that many, one process per GPU.")
    if not torch.cuda.is_available() and num_processes > (os.cpu_count() or 1):
        raise ValueError(f"{call}({argument}={num_processes}) is not allowed: this machine has no GPU and "
                         f"{os.cpu_count()} CPU core(s); use at most that many gloo processes.")
    if torch.cuda.is_initialized():
        raise ValueError(f"{call}({argument}={num_processes}) is not allowed after CUDA was initialised in "
                         f"this kernel: forked processes cannot use it. Restart the kernel and run the launch "
                         f"before any cell that touches the GPU (moving a model or tensor to 'cuda' does).")
    if "RANK" in os.environ:
        raise ValueError(f"{call}({argument}={num_processes}) is not allowed in a process that is already "
                         f"one of several (RANK={os.environ['RANK']!r}): call the function directly there.")
    if "fork" not in mp.get_all_start_methods():
        raise ValueError(f"{call}({argument}={num_processes}) needs the 'fork' start method, which this platform lacks: use torchrun "
                         f"from a shell (see utils.training.parallel.distributed.torchrun_command).")


def launch(fn, *args, num_processes: int = 2, **kwargs):
    """Run ``fn(*args, **kwargs)`` in ``num_processes`` forked processes, one rank each; return rank 0's result.

    Example::

        >>> result = launch(train, model, ids, num_processes=2, device="cpu", max_steps=8)  # doctest: +SKIP

    Args:
        fn: any callable, a function defined in a notebook cell included (fork copies it, no pickling).
        num_processes: processes (ranks) to start; on a GPU machine at most one per GPU (default 2).
        *args, **kwargs: passed to ``fn`` in every process.

    Returns:
        What ``fn`` returned in rank 0 (it must pickle: it travels back through a pipe).

    Raises:
        ValueError: see :func:`check_launch`; raised before any process starts.
        WorkerError: a process raised (its rank and traceback in the message) or died; the others
            are stopped.
        KeyboardInterrupt: the cell was interrupted; every process is stopped first.

    .. note:: No process is left behind: on a failure or an interrupt the others get ``GRACE_S``
        seconds (SIGTERM: a training run saves its checkpoint and stops), then are killed.
    """
    check_launch(num_processes)
    ctx = mp.get_context("fork")
    port = free_port()
    pipes, procs = [], []
    try:
        for rank in range(num_processes):
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(rank, num_processes, port, send, fn, args, kwargs),
                               name=f"launch-rank{rank}", daemon=True)
            proc.start()
            send.close()
            pipes.append(receive)
            procs.append(proc)
        return _collect(pipes, procs)
    except KeyboardInterrupt:  # the kernel's interrupt reached the children too: let them save and stop
        _stop(procs, patience=GRACE_S)
        raise
    except BaseException:
        _stop(procs)
        raise
    finally:
        for p in pipes:
            p.close()


def _child(rank, world_size, port, conn, fn, args, kwargs) -> None:
    global _relay, _weights
    _weights = None
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), UTILS_TRAINING_LAUNCHED="1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the kernel's interrupt is the parent's to handle
    # GNU OpenMP's thread pool does not survive a fork: a parallel region with the parent's team
    # waits forever for threads the child does not have. One intra-op thread per rank (torchrun's
    # default too); on a GPU the work is not on these threads anyway.
    torch.set_num_threads(1)
    _relay = conn if rank == 0 else None
    try:
        out = fn(*args, **kwargs)
        _send(conn, ("result", out if rank == 0 else None))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, with its traceback
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        _send(conn, ("failed", _Failed(rank, text)))
    finally:
        conn.close()


def _collect(pipes, procs):
    """Read every rank's message; draw rank 0's progress; raise the first failure."""
    pending, result, bar = dict(enumerate(pipes)), None, None
    sentinels = {p.sentinel: rank for rank, p in enumerate(procs)}
    try:
        while pending:
            for ready in wait([*pending.values(), *(s for s, r in sentinels.items() if r in pending)]):
                rank = sentinels.get(ready)
                if rank is not None:  # a process ended: anything it sent is read first
                    if rank in pending and not pending[rank].poll():
                        procs[rank].join()
                        code = procs[rank].exitcode
                        raise WorkerError(rank, f"rank {rank} exited with code {code} without a result "
                                                f"(killed, out of memory, or os._exit).")
                    continue
                rank = next(r for r, c in pending.items() if c is ready)
                kind, value = _receive(ready, rank, procs)
                if kind == "progress":
                    bar = _draw(bar, value)
                    continue
                del pending[rank]
                if kind == "failed":
                    raise WorkerError(value.rank, f"rank {value.rank} failed:\n{value.traceback}")
                if rank == 0:
                    result = value
    finally:
        if bar is not None:
            bar.close()
    for p in procs:
        p.join()
    return result


def _send(conn, message) -> None:
    # Plain pickle: tensors travel by value. The pipe's own pickler would pass them as file
    # descriptors of shared memory, which vanish when the sending process exits.
    conn.send_bytes(pickle.dumps(message))


def _receive(conn, rank, procs):
    try:
        return pickle.loads(conn.recv_bytes())
    except EOFError as e:
        procs[rank].join(GRACE_S)
        raise WorkerError(rank, f"rank {rank} exited with code {procs[rank].exitcode} without a result.") from e


def _stop(procs, patience: float = 0.0) -> None:
    """Wait ``patience`` seconds, SIGTERM the living processes, wait ``GRACE_S``, then SIGKILL what is
    left; reap all."""
    for p in procs:
        p.join(patience / len(procs))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(GRACE_S)
        if p.is_alive():
            p.kill()
            p.join()


def train_on(devices: int, train_fn, model, train_data, **kwargs):
    """``train_fn(model, train_data, **kwargs)`` in ``devices`` launched processes (see :func:`launch`);
    ``model`` in this process receives the trained weights, and rank 0's result is returned.
    ``train(..., devices=N)`` calls it."""
    check_launch(devices, "train", "devices")

    def each_rank():
        result = train_fn(model, train_data, **kwargs)  # under FSDP the model is left sharded: its
        weights = _weights if _weights is not None else {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return result, weights  # weights were gathered before the group closed (hand_back_weights)

    result, state = launch(each_rank, num_processes=devices)
    model.load_state_dict(state)
    return result


def in_launched_child() -> bool:
    """True in a process :func:`launch` started."""
    return os.environ.get("UTILS_TRAINING_LAUNCHED") == "1"


def hand_back_weights(state: dict) -> None:
    """Called by the FSDP run in a launched child while its group is alive: the full weights that
    :func:`train_on` sends back (the model itself stays sharded)."""
    global _weights
    _weights = state


# ---- progress: rank 0's bar, drawn by the kernel --------------------------------------------------
class _RelayBar:
    """Rank 0's stand-in for a tqdm bar in a launched child: sends what it is told to the parent."""

    def __init__(self, conn, **kwargs):
        self.conn = conn
        _send(self.conn, ("progress", ("open", kwargs)))

    def update(self, n=1):
        _send(self.conn, ("progress", ("update", n)))

    def set_postfix(self, **kwargs):
        _send(self.conn, ("progress", ("postfix", kwargs)))

    def close(self):
        _send(self.conn, ("progress", ("close", None)))


def _draw(bar, message):
    from tqdm.auto import tqdm

    what, value = message
    if what == "open":
        return tqdm(**value)
    if bar is None:
        return None
    if what == "update":
        bar.update(value)
    elif what == "postfix":
        bar.set_postfix(**value)
    else:
        bar.close()
    return bar


def progress_bar(*, disable: bool, **kwargs):
    """A ``tqdm.auto`` bar; in rank 0 of a :func:`launch`, one the kernel draws instead (widgets
    cannot be drawn from a forked process)."""
    if _relay is not None and not disable:
        return _RelayBar(_relay, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(disable=disable, **kwargs)


def devices_here() -> int:
    """How many processes ``train(devices=...)`` can use here: one per GPU, else 2 gloo processes on
    a CPU with at least 2 cores (1 otherwise). Asks CUDA nothing that initialises it."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return min(2, os.cpu_count() or 1)
