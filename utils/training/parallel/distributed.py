"""Past one device: the same loop in every process ``torchrun`` starts, under DistributedDataParallel.

``train()`` asks :meth:`World.detect` who it is. In a plain process that is rank 0 of 1 and nothing
here does anything. Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) :meth:`World.fit`
joins the process group (nccl on CUDA, gloo on CPU) unless one exists, wraps the model in
``DistributedDataParallel``, trains, and tears down what it set up.

Example::

    $ torchrun --standalone --nproc_per_node=2 -m utils.training train --model example:gpt-micro --batch-size 8 \\
          --max-steps 100 --run-dir runs/ddp

    >>> world = World.detect()                 # rank and world size from torchrun's environment
    >>> world.rank, world.world_size, world.is_rank_zero      # doctest: +SKIP
    (0, 2, True)

``batch_size`` is per process: a step's global batch is ``batch_size × world_size`` samples, and
for tensor data it holds exactly the samples one process would draw with that batch size
(:class:`ShardedTensorBatches`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from utils.training.batches import TensorBatches
from utils.training.parallel import launch
from utils.training.settings import check_strategy_name

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class ShardedTensorBatches(TensorBatches):
    """One rank's share of each global batch of a (N, T) tensor.

    The global batch ``i`` of an epoch is batch ``i`` of ``TensorBatches(data, batch_size × world_size)``
    (the same permutation from (seed, epoch)); rank ``r`` takes its rows ``[r·B, (r+1)·B)``. So the
    ranks together see, step for step, what one process sees with the doubled (×world_size) batch,
    and ``epoch(e, start)`` counts ``start`` in global batches.

    Example::

        >>> full = TensorBatches(torch.arange(16).view(8, 2), batch_size=4, seed=0)
        >>> shards = [ShardedTensorBatches(TensorBatches(full.data, 2, 0), r, 2) for r in (0, 1)]
        >>> torch.equal(torch.cat([next(s.epoch(0)) for s in shards]), next(full.epoch(0)))
        True

    Raises:
        ValueError: fewer samples than one global batch.
    """

    def __init__(self, batches: TensorBatches, rank: int, world_size: int):
        n, per_rank = batches.data.shape[0], batches.batch_size
        if n < per_rank * world_size:
            raise ValueError(
                f"train_data has {n} samples, fewer than one global batch of batch_size={per_rank} per "
                f"process × {world_size} processes = {per_rank * world_size}. Pass a smaller batch_size "
                f"or more data."
            )
        super().__init__(batches.data, per_rank * world_size, batches.seed, batches.shuffle, drop_last=True,
                         labels=batches.labels)
        self.rank, self.world_size, self.per_rank = rank, world_size, per_rank

    def epoch(self, epoch: int, start: int = 0):
        lo = self.rank * self.per_rank
        for batch in super().epoch(epoch, start):  # (B × world_size, T), or with labels (B × world_size,)
            if isinstance(batch, tuple):
                yield tuple(t[lo:lo + self.per_rank] for t in batch)
            else:
                yield batch[lo:lo + self.per_rank]  # (B, T)


@dataclass(frozen=True)
class World:
    """The processes of one run: this one's ``rank``, how many there are, and its GPU (``local_rank``).

    ``World()`` is a single process; :meth:`detect` reads torchrun's environment (or a process group
    the caller already initialized).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"  # "fsdp": the model is sharded (fully_shard) by train(), even in one process

    @classmethod
    def detect(cls) -> World:
        """This process's place: from an initialized process group, torchrun's variables, or alone.

        Raises:
            ValueError: some but not all of RANK, WORLD_SIZE, LOCAL_RANK are set, or they are not
                integers with ``0 <= RANK < WORLD_SIZE``.
        """
        local = os.environ.get("LOCAL_RANK", "0")
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(local) if local.isdigit() else 0)
        present = [k for k in TORCHRUN_ENV if k in os.environ]
        if not present:
            return cls()
        values = {k: os.environ.get(k, "") for k in TORCHRUN_ENV}
        ok = len(present) == 3 and all(v.isdigit() for v in values.values())
        if not ok or not int(values["RANK"]) < int(values["WORLD_SIZE"]):
            shown = ", ".join(f"{k}={os.environ[k]!r}" for k in present)
            raise ValueError(
                f"This process has {shown}: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, as integers "
                f"with 0 <= RANK < WORLD_SIZE. Launch with torchrun, or unset them to train in one process."
            )
        return cls(int(values["RANK"]), int(values["WORLD_SIZE"]), int(values["LOCAL_RANK"]))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def needs_group(self) -> bool:
        """A process group is needed: several processes, or FSDP (which shards over a group of one too)."""
        return self.is_distributed or self.strategy == "fsdp"

    @property
    def is_rank_zero(self) -> bool:
        """Only rank 0 logs, writes files and shows progress."""
        return self.rank == 0

    def default_device(self, device):
        """``cuda:LOCAL_RANK`` where one process per GPU is meant (``None`` or a bare ``"cuda"``)."""
        if not self.is_distributed or not torch.cuda.is_available():
            return device
        try:
            bare_cuda = device is not None and torch.device(device) == torch.device("cuda")
        except (RuntimeError, TypeError):  # not a device: resolve_precision names the problem
            return device
        return torch.device("cuda", self.local_rank) if device is None or bare_cuda else device

    def shard(self, batches):
        """Rank's share of tensor data; other data passes through (warning without a DistributedSampler)."""
        if not self.is_distributed:
            return batches
        if isinstance(batches, TensorBatches):
            return ShardedTensorBatches(batches, self.rank, self.world_size)
        sampler = getattr(batches, "sampler", None)
        if not isinstance(sampler, torch.utils.data.DistributedSampler):
            warnings.warn(
                f"train_data is a {type(batches).__name__} without a DistributedSampler: each of the "
                f"{self.world_size} processes trains on the same batches. Pass "
                f"DataLoader(dataset, sampler=DistributedSampler(dataset)), or a tensor of token ids, "
                f"which is sharded for you.",
                stacklevel=3,
            )
        return batches

    # ---- collectives: every rank calls them at the same points; no-ops in one process ----------
    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over ranks (a scalar tensor on the run's device)."""
        if not self.is_distributed:
            return value
        total = value.detach().double().clone()
        dist.all_reduce(total)
        return (total / self.world_size).to(value.dtype)

    def sum(self, value: int) -> int:
        if not self.is_distributed:
            return value
        total = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
        dist.all_reduce(total)
        return int(total.item())

    def max(self, value: torch.Tensor) -> torch.Tensor:
        if not self.is_distributed:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def no_sync(self, net: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync()`` for micro-batches before the last of an accumulation."""
        if skip and isinstance(net, DistributedDataParallel):
            return net.no_sync()
        return contextlib.nullcontext()  # FSDP reduce-scatters every micro-batch into the sharded grads

    def average_gradients(self, params) -> None:
        """All-reduce gradients accumulated under ``no_sync`` (an epoch's short last accumulation)."""
        if not self.is_distributed or self.strategy == "fsdp":  # FSDP's gradients are reduced already
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)

    # ---- the run -------------------------------------------------------------------------------
    def fit(self, trainer, owned: bool = False):
        """``trainer.fit()`` under DDP or FSDP: join the group, wrap ``trainer.net`` (DDP; FSDP's model
        was sharded by ``train()``), then unwind safely.

        A group this call (or, with ``owned=True``, ``train()`` before it) initialized is destroyed at
        the end: the DDP wrapper is dropped and collected first, and the ranks meet at a barrier
        (destroying a gloo group while a DDP wrapper lives can abort the process). A group the
        caller initialized is left as it was.
        """
        if not self.needs_group:
            return trainer.fit()
        device = trainer.precision.device
        owned = init_process_group(self, device) or owned
        finished = False
        try:
            if self.strategy == "ddp":
                trainer.net = wrap(trainer.model, device)
            result = trainer.fit()
            if self.strategy == "fsdp" and launch.in_launched_child():  # the kernel gets the weights
                launch.hand_back_weights(full_state_dict(trainer.model))
            finished = True
            return result
        finally:
            trainer.net = unwrap(trainer.net)  # the wrapper must be gone before teardown
            teardown(owned, device, barrier=finished)


def torchrun_command(args: list[str], nproc: int) -> list[str]:
    """The argv of ``torchrun --standalone --nproc_per_node=nproc`` with this interpreter, e.g. from a
    notebook. ``--standalone`` makes torchrun pick a free local rendezvous port itself.

    Example::

        >>> import subprocess
        >>> cmd = torchrun_command(["-m", "utils.training", "train", "--model", "example:gpt-micro",
        ...                         "--max-steps", "20", "--run-dir", "runs/ddp"], nproc=2)
        >>> subprocess.run(cmd, check=True)             # doctest: +SKIP

    Args:
        args: what follows torchrun's own options: a script and its arguments, or ``-m module ...``.
        nproc: processes to start (one per GPU; any number on a CPU).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def set_sampler_epoch(batches, epoch: int) -> None:
    """Call ``sampler.set_epoch(epoch)`` on a DataLoader's ``DistributedSampler``, or it reshuffles
    every epoch the same way."""
    sampler = getattr(batches, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        sampler.set_epoch(epoch)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(world: World, device: torch.device) -> bool:
    """Join torchrun's group (nccl for CUDA, gloo otherwise); False when one already exists."""
    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world.world_size == 1 and "MASTER_ADDR" not in os.environ:  # FSDP in one plain process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return True
    store, _, _ = next(dist.rendezvous("env://", world.rank, world.world_size))
    # torch names every new default group alike, and a torchrun job's store outlives the group: a
    # second train() in the same job would read the first group's stale addresses. Fresh keys each time,
    # counted by the store itself: every rank adds 1, so the k-th group's adds all return ((k-1)W, kW].
    group = (store.add("utils.training/groups", 1) - 1) // world.world_size
    store = dist.PrefixStore(f"utils.training/group{group + 1}", store)
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.world_size)
    return True


def teardown(owned: bool, device: torch.device, *, barrier: bool = True) -> None:
    """Destroy a group we initialized, once no DDP wrapper is alive (see :meth:`World.fit`)."""
    gc.collect()
    if not owned:
        return
    if barrier:  # after a failure another rank may never arrive: skip it then
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
    dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``DistributedDataParallel`` around ``model`` (rank 0's weights are broadcast to all ranks)."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (what checkpoints hold); any other model as it is."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---- FSDP2 ---------------------------------------------------------------------------------------
def check_strategy(strategy, model: nn.Module | None = None, call: str = "train") -> None:
    """``strategy`` is one of :data:`STRATEGIES`; FSDP needs submodules to shard.

    Raises:
        ValueError: naming the value and what is allowed.
    """
    check_strategy_name(strategy, call)
    if strategy == "fsdp" and model is not None and not fsdp_units(model):
        raise ValueError(f"{call}(strategy='fsdp') is not allowed for {type(model).__name__}: it has no submodule "
                         f"with parameters to shard one by one (FSDP gathers one unit's weights at a time). "
                         f"Use strategy='ddp', or build the model from submodules (e.g. an nn.ModuleList of blocks).")


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """What is sharded as one unit: each module of an ``nn.ModuleList`` (a transformer's blocks), or,
    without one, each direct child holding parameters. The root is sharded last, over the rest."""
    blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst
              if any(True for _ in m.parameters())]
    if blocks:
        return blocks
    return [m for m in model.children() if any(True for _ in m.parameters())]


def mixed_precision_policy(plan) -> MixedPrecisionPolicy | None:
    """FSDP's policy for the plan: parameters gathered in the autocast dtype, gradients reduced in
    fp32; None (no casting) for 32-true and the ``-true`` halves (their weights are stored in it)."""
    if plan.autocast_dtype is None or plan.param_dtype != torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=plan.autocast_dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, plan, keep_fp32=()) -> nn.Module:
    """``fully_shard`` the modules kept in fp32 (with an fp32 policy), each unit, then the root.

    A kept module that shares a parameter with another one (tied embeddings) cannot be a unit of its
    own: the root, which holds the shared parameter, then gathers its weights in fp32.
    The process group must be initialized. The model is changed in place (its parameters become
    ``DTensor`` shards); build the optimizer afterwards.
    """
    policy = mixed_precision_policy(plan)
    fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    modules, shared = dict(model.named_modules()), _shared_outside(model, keep_fp32)
    for name in keep_fp32:  # inner modules first: an outer unit then leaves them alone
        if name not in shared and any(True for _ in modules[name].parameters()):
            fully_shard(modules[name], mp_policy=fp32)
    for unit in fsdp_units(model):
        fully_shard(unit, **({} if policy is None else {"mp_policy": policy}))
    root = fp32 if shared or policy is None else policy
    fully_shard(model, mp_policy=root)
    return model


def _shared_outside(model: nn.Module, names) -> set[str]:
    """The names among ``names`` whose module shares a parameter with a module outside it."""
    owners: dict[int, list[str]] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(full)
    return {name for name in names for fulls in owners.values()
            if any(f.startswith(name + ".") for f in fulls) and not all(f.startswith(name + ".") for f in fulls)}


def full_tensor(value):
    """A ``DTensor`` (a clipped norm, a shard) as the whole tensor; anything else as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's weights on the CPU: gathered from the shards under FSDP (a collective: every
    rank calls it; rank 0 receives them, the others an empty dict), the plain ``state_dict`` otherwise."""
    if not isinstance(model, FSDPModule):
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def weights_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    r"""``(model state, optimizer state)``: each process's shards (``DTensor``) under FSDP, as
    ``torch.distributed.checkpoint`` saves and loads them; the plain ``state_dict()``\ s otherwise."""
    if sharded:
        return get_state_dict(model, optimizer)
    return model.state_dict(), optimizer.state_dict()


def load_weights_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict,
                       sharded: bool) -> None:
    """The inverse of :func:`weights_state`.

    Raises:
        ValueError: the weights do not fit the model, or the optimizer state the optimizer.
    """
    if sharded:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        return
    try:
        model.load_state_dict(model_state)
    except RuntimeError as e:
        raise ValueError(f"does not fit this model: {e}") from e
    try:
        optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError) as e:
        raise ValueError(f"has optimizer state that does not fit: {e}") from e
