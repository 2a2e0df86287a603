"""What fits where: training memory per precision, predicted for the GPUs people rent, from one
measurement on any device (a laptop CPU will do).

Example::

    >>> plan = plan_memory(example_model("gpt-tiny"), ids[:8])           # doctest: +SKIP
    >>> plan.max_batch_size("bf16-mixed", "T4"), plan.max_batch_size("16-mixed", "T4")   # doctest: +SKIP
    (None, 212)
    >>> print(plan.to_markdown())                                         # doctest: +SKIP

A step's peak is predicted as weights + gradients + optimizer state + autocast's weight copies +
``batch_size`` × (the activations one sample saves for backward, measured with
:func:`~utils.training.amp.measure.saved_tensor_bytes` at the batch's sequence length, + the
model output's gradient, counted twice in fp32: the largest transient of backward for a language model).

.. note::
    The prediction does not count the CUDA context (~0.3–0.5 GiB outside PyTorch's allocator),
    allocator fragmentation and cached blocks, cuBLAS/cuDNN workspaces, or transient tensors of
    the backward pass (the logits' gradient, attention scratch). :data:`DEFAULT_MARGIN` of each
    GPU's memory is held back for them; ``benchmarks/gpu_check.sh`` compares the prediction with
    ``torch.cuda.max_memory_allocated`` on a real GPU. Autocast's op lists differ a little between
    CPU and CUDA, so activations measured on a CPU are close to, not equal to, a GPU's.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from utils.common.checks import check_int, is_int
from utils.common.figures import new_figure
from utils.training.amp.measure import saved_tensor_bytes, tensor_bytes
from utils.training.amp.overflow_scan import float_tensors
from utils.training.amp.precision import (
    PrecisionPlan,
    PrecisionWarning,
    canonical_precision,
    resolve_precision,
)
from utils.training.batches import prepare_batch
from utils.training.loop.train import train
from utils.training.objectives import objective_loss_fn
from utils.training.parallel.distributed import fsdp_units
from utils.training.settings import TrainSettings

log = logging.getLogger(__name__)

GIB = 2**30
_MIB = 2**20
DEFAULT_MARGIN = 0.10  # share of a GPU's memory held back for what the prediction does not count
DEFAULT_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")


@dataclass(frozen=True)
class Gpu:
    """A GPU as ``nvidia-smi`` reports it: total memory, and whether it has bf16 (compute capability >= 8.0)."""

    name: str
    memory_bytes: int
    bf16: bool


GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("T4", 15360 * _MIB, bf16=False),  # Turing, sm_75: fp16 tensor cores only
    Gpu("L4", 23034 * _MIB, bf16=True),
    Gpu("A100-40GB", 40960 * _MIB, bf16=True),
    Gpu("A100-80GB", 81920 * _MIB, bf16=True),
    Gpu("H100-80GB", 81559 * _MIB, bf16=True),
)}


@dataclass
class MemoryRow:
    """One precision's memory, in bytes. ``fixed_bytes`` does not grow with the batch; activations do."""

    precision: str
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    weight_copy_bytes: int  # autocast's half-precision copies of the weights, saved for backward
    activation_bytes_per_sample: float  # saved for backward, at the measured sequence length
    output_grad_bytes_per_sample: float = 0.0  # backward's transient: the output's gradient, twice, in fp32
    reason: str = ""

    @property
    def bytes_per_sample(self) -> float:
        return self.activation_bytes_per_sample + self.output_grad_bytes_per_sample

    @property
    def fixed_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.weight_copy_bytes


def _gpu(gpu, call: str) -> tuple[int, Gpu | None]:
    if is_int(gpu, minimum=1):
        return gpu, None
    if isinstance(gpu, str) and gpu in GPUS:
        return GPUS[gpu].memory_bytes, GPUS[gpu]
    raise ValueError(f"{call}(gpu={gpu!r}): unknown GPU. Use one of {', '.join(GPUS)}, or a memory size in bytes.")


@dataclass
class MemoryPlan:
    """Per-precision memory rows and what they predict. Made by :func:`plan_memory`."""

    rows: list[MemoryRow]
    gpus: tuple[str, ...] = tuple(GPUS)
    margin: float = DEFAULT_MARGIN
    sequence_length: int | None = None
    measured_on: str = "cpu"
    notes: list[str] = field(default_factory=list)
    unit_fraction: float = 1.0  # the largest FSDP unit's share of the trainable weights (what one gather holds)

    def row(self, precision: str) -> MemoryRow:
        """The row of ``precision`` (any spelling ``resolve_precision`` accepts)."""
        name = canonical_precision(precision)
        for row in self.rows:
            if row.precision == name:
                return row
        raise ValueError(f"row(precision={precision!r}): not in this plan. Planned: "
                         f"{', '.join(r.precision for r in self.rows)}.")

    def peak_bytes(self, precision: str, batch_size: int) -> int:
        """Predicted peak of a training step at ``batch_size`` (what the module note leaves out excepted)."""
        check_int("batch_size", batch_size, minimum=1, message="peak_bytes({name}={value!r}): {name} must be {rule}.")
        row = self.row(precision)
        return row.fixed_bytes + math.ceil(batch_size * row.bytes_per_sample)

    def max_batch_size(self, precision: str, gpu) -> int | None:
        """The largest batch whose predicted peak fits ``gpu`` less the margin; 0 when not even one
        sample fits; None when the GPU cannot run the precision (bf16 on a T4).

        Args:
            precision: a planned precision.
            gpu: a name in :data:`GPUS` or a memory size in bytes.
        """
        capacity, spec = _gpu(gpu, "max_batch_size")
        row = self.row(precision)
        if spec is not None and row.precision.startswith("bf16") and not spec.bf16:
            return None
        room = capacity * (1 - self.margin) - row.fixed_bytes
        if room < row.bytes_per_sample:
            return 0
        return int(room // row.bytes_per_sample)

    def per_gpu_fixed_bytes(self, precision: str, strategy: str, gpus: int) -> int:
        """What does not grow with the batch, per GPU: one GPU and DDP hold everything (DDP adds its
        gradient buckets, one more copy of the gradients); FSDP over ``gpus`` holds 1/``gpus`` of the
        weights, gradients and optimizer state, plus two gathered units (the one computing and the
        one prefetched) and one unit's unsharded gradients, in the gathered dtype."""
        row = self.row(precision)
        if strategy == "one GPU":
            return row.fixed_bytes
        if strategy == "DDP":
            return row.fixed_bytes + row.gradient_bytes
        sharded = (row.weight_bytes + row.gradient_bytes + row.optimizer_bytes) / gpus
        gathered_itemsize = 2 if row.weight_copy_bytes or not row.precision.startswith("32") else 4
        unit = self.unit_fraction * row.gradient_bytes * gathered_itemsize / max(_itemsize(row), 1)
        return math.ceil(sharded + 3 * unit)

    def strategies(self, precision: str, gpu, counts=(2, 4, 8)) -> list[dict]:
        """The largest batch per GPU for one GPU, DDP and FSDP over each of ``counts`` GPUs.

        Returns:
            dicts ``{"strategy", "gpus", "fixed_bytes" (per GPU), "batch_per_gpu" (0: not even one
            sample; None: the GPU cannot run the precision), "global_batch"}``.
        """
        capacity, spec = _gpu(gpu, "strategies")
        row = self.row(precision)
        out = []
        for strategy, n in [("one GPU", 1)] + [(s, n) for n in counts for s in ("DDP", "FSDP")]:
            fixed = self.per_gpu_fixed_bytes(precision, strategy, n)
            if spec is not None and row.precision.startswith("bf16") and not spec.bf16:
                batch = None
            else:
                room = capacity * (1 - self.margin) - fixed
                batch = 0 if room < row.bytes_per_sample else int(room // row.bytes_per_sample)
            out.append({"strategy": strategy, "gpus": n, "fixed_bytes": fixed, "batch_per_gpu": batch,
                        "global_batch": None if batch is None else batch * n})
        return out

    def recommend(self, precision: str, gpu, counts=(2, 4, 8)) -> str:
        """One line: one GPU when it fits, else FSDP over the fewest GPUs that fit (DDP never helps a
        model that does not fit one GPU: each holds all of it), else that it does not fit even sharded."""
        rows = self.strategies(precision, gpu, counts)
        name = gpu if isinstance(gpu, str) else f"{gpu / GIB:.1f} GiB"
        if rows[0]["batch_per_gpu"] is None:
            return f"{precision} does not run on a {name} (no bf16)."
        if rows[0]["batch_per_gpu"]:
            return (f"{precision} on one {name}: batch up to {rows[0]['batch_per_gpu']}; DDP over N GPUs "
                    f"multiplies the global batch by N.")
        for r in rows:
            if r["strategy"] == "FSDP" and r["batch_per_gpu"]:
                return (f"{precision}: does not fit one {name}, nor DDP (a full copy per GPU); FSDP over "
                        f"{r['gpus']} x {name} fits a batch of {r['batch_per_gpu']} per GPU.")
        return f"{precision}: does not fit even sharded over {max(counts)} x {name} (FSDP)."

    def strategies_markdown(self, precision: str, gpu, counts=(2, 4, 8)) -> str:
        """The :meth:`strategies` table and the :meth:`recommend` line."""
        lines = ["| strategy | GPUs | fixed per GPU MiB | largest batch per GPU | global batch |",
                 "|---|---|---|---|---|"]
        for r in self.strategies(precision, gpu, counts):
            batch = "no bf16" if r["batch_per_gpu"] is None else str(r["batch_per_gpu"])
            lines.append(f"| {r['strategy']} | {r['gpus']} | {r['fixed_bytes'] / _MIB:.1f} | {batch} | "
                         f"{r['global_batch'] if r['global_batch'] is not None else '-'} |")
        return "\n".join(lines + ["", self.recommend(precision, gpu, counts)])

    def to_markdown(self) -> str:
        """One line per precision: the parts in MiB, then the largest batch per GPU."""
        head = ("| precision | weights MiB | gradients MiB | optimizer MiB | autocast copies MiB "
                "| activations MiB / sample | output grads MiB / sample | " + " | ".join(self.gpus) + " |")
        lines = [head, "|" + "---|" * (7 + len(self.gpus))]
        for r in self.rows:
            fits = []
            for gpu in self.gpus:
                n = self.max_batch_size(r.precision, gpu)
                fits.append("no bf16" if n is None else str(n))
            parts = [r.weight_bytes, r.gradient_bytes, r.optimizer_bytes, r.weight_copy_bytes]
            lines.append("| " + " | ".join([r.precision] + [f"{b / _MIB:.1f}" for b in parts]
                                           + [f"{r.activation_bytes_per_sample / _MIB:.2f}",
                                              f"{r.output_grad_bytes_per_sample / _MIB:.2f}"] + fits) + " |")
        seq = f" at sequence length {self.sequence_length}" if self.sequence_length else ""
        lines.append(f"\nLargest batch size{seq} whose predicted peak fits in each GPU with {self.margin:.0%} "
                     f"held back (the CUDA context, allocator fragmentation, kernel workspaces and backward "
                     f"temporaries other than the output gradient are not predicted). Measured on "
                     f"{self.measured_on}.")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def plot(self):
        """A matplotlib ``Figure``: the largest batch size per GPU, one bar group per precision."""
        fig = new_figure(9, 4)
        ax = fig.subplots()
        width = 0.8 / max(len(self.rows), 1)
        for i, r in enumerate(self.rows):
            sizes = [self.max_batch_size(r.precision, g) or 0 for g in self.gpus]
            ax.bar([j + (i - (len(self.rows) - 1) / 2) * width for j in range(len(self.gpus))], sizes, width,
                   label=r.precision)
        ax.set_xticks(range(len(self.gpus)), self.gpus)
        ax.set(title=f"Largest batch that fits ({self.margin:.0%} margin)", ylabel="batch size")
        ax.legend()
        return fig


def _itemsize(row: MemoryRow) -> int:
    """Bytes per stored weight element of a row: 4, or 2 for the ``-true`` halves."""
    return 2 if row.precision in ("bf16-true", "16-true") else 4


def _unit_fraction(model: nn.Module) -> float:
    """The largest FSDP unit's share of the weights; the root's own weights (embeddings) count as one."""
    total = sum(p.numel() for p in model.parameters()) or 1
    units = fsdp_units(model)
    inside = {id(p) for u in units for p in u.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return max([root] + [sum(p.numel() for p in u.parameters()) for u in units]) / total


def _measure_plan(precision, device) -> PrecisionPlan:
    if canonical_precision(precision) == "auto":
        raise ValueError("plan_memory(precisions=(..., 'auto')): 'auto' depends on the GPU; name precisions, "
                         f"e.g. {DEFAULT_PRECISIONS}.")
    with warnings.catch_warnings():  # bf16/fp16 on a CPU are slow, but one forward is all this needs
        warnings.simplefilter("ignore", PrecisionWarning)
        return resolve_precision(precision, device)


def _row(model: nn.Module, batch, plan: PrecisionPlan, optimizer_states: int, samples: int, loss_fn) -> MemoryRow:
    itemsize = torch.empty((), dtype=plan.param_dtype).element_size()
    weights = tensor_bytes(model.parameters()) * itemsize // 4
    trainable = tensor_bytes(p for p in model.parameters() if p.requires_grad) * itemsize // 4
    measured = model
    if plan.param_dtype != torch.float32:  # "-true": weights in half precision, measured on a copy
        measured = copy.deepcopy(model).to(plan.param_dtype)
    outputs: list[int] = []
    hook = measured.register_forward_hook(lambda m, a, out: outputs.extend(t.numel() for t in float_tensors(out)))
    try:
        saved = saved_tensor_bytes(measured, batch, plan, loss_fn=loss_fn)
    finally:
        hook.remove()
    # Backward holds the output's gradient (the loss works in fp32) and the gradient of the loss's
    # fp32 copy at once: 2 x 4 bytes per output element, beyond what the forward saved.
    output_grads = 2 * 4 * sum(outputs)
    return MemoryRow(plan.name, weights, trainable, optimizer_states * trainable, saved.weight_copies,
                     saved.activations / samples, output_grads / samples, plan.reason)


def plan_memory(model: nn.Module, batch, *, precisions=DEFAULT_PRECISIONS, gpus=tuple(GPUS), device=None,
                optimizer_states: int = 2, margin: float = DEFAULT_MARGIN) -> MemoryPlan:
    """Predict a training step's memory per precision, and the largest batch per GPU.

    Example::

        >>> plan = plan_memory(example_model("gpt-micro"), torch.randint(0, 256, (4, 33)))
        >>> plan.peak_bytes("32-true", 8) < plan.peak_bytes("32-true", 16)
        True

    Args:
        model: a float32 ``nn.Module``; it is moved to ``device`` and left in training mode as it was.
        batch: one batch as ``train()`` takes it; activations per sample are its saved bytes divided
            by its sample count, at its sequence length.
        precisions: canonical names or aliases (not ``"auto"``); default 32-true, 16-mixed, bf16-mixed.
        gpus: names from :data:`GPUS` shown by :meth:`MemoryPlan.to_markdown`.
        device: where to measure (default: the best available; any device gives the same bytes up
            to autocast's per-device op lists). Every precision is measured there as asked, even
            fp16 on a CPU (one forward; slow but honoured).
        optimizer_states: tensors of parameter size the optimizer keeps (AdamW: 2, SGD with
            momentum: 1, SGD: 0); in the parameters' dtype.
        margin: share of each GPU's memory held back (default :data:`DEFAULT_MARGIN`).

    Raises:
        ValueError: ``"auto"`` or an unknown precision, an unknown GPU name, a margin outside
            [0, 1), or a model whose parameters are not float32.
    """
    for gpu in gpus:
        _gpu(gpu, "plan_memory")
    if not 0 <= margin < 1:
        raise ValueError(f"plan_memory(margin={margin!r}): margin must be in [0, 1).")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"plan_memory: the model's parameters are {sorted(map(str, dtypes))}; pass it in "
                         f"float32 (as train() receives it), and name '-true' precisions to plan half weights.")
    prepared = prepare_batch(batch)
    ids = prepared.input_ids
    samples = ids.shape[0] if ids is not None and ids.dim() >= 2 else prepared.count  # count is tokens for ids
    device = resolve_precision("32-true", device).device  # explicit, so fp16 on a CPU is measured as fp16
    plans = [_measure_plan(p, device) for p in precisions]
    model.to(plans[0].device)
    loss_fn = objective_loss_fn(model)  # the task's objective, found before any hook counts outputs
    rows = [_row(model, batch, plan, optimizer_states, samples, loss_fn) for plan in plans]
    return MemoryPlan(rows, tuple(gpus), margin, ids.shape[-1] if ids is not None and ids.dim() >= 2 else None,
                      str(plans[0].device), unit_fraction=_unit_fraction(model))


def is_out_of_memory(error: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and the RuntimeErrors other backends raise when memory runs out."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def find_batch_size(step, start: int, *, min_size: int = 1) -> int:
    """The largest batch size, from ``start`` halving on out-of-memory, at which ``step`` runs.

    As Lightning's ``BatchSizeFinder`` does on the way down: try ``start``; on an out-of-memory
    error free the cache and try half; stop at the first size that runs.

    Example::

        >>> find_batch_size(training_step(model, ids, "bf16-mixed", "cuda"), start=plan.max_batch_size(
        ...     "bf16-mixed", torch.cuda.mem_get_info()[1]))                            # doctest: +SKIP
        96

    Args:
        step: ``step(batch_size)`` runs one trial (see :func:`training_step`); any device.
        start: the first size tried, e.g. the plan's :meth:`MemoryPlan.max_batch_size`.
        min_size: the smallest size worth trying (default 1).

    Raises:
        ValueError: ``start`` or ``min_size`` is not an integer >= 1, or ``start < min_size``.
        RuntimeError: even ``min_size`` runs out of memory (the last error is its cause).
    """
    for name, value in (("start", start), ("min_size", min_size)):
        check_int(name, value, minimum=1, message="find_batch_size({name}={value!r}): {name} must be {rule}.")
    if start < min_size:
        raise ValueError(f"find_batch_size(start={start}, min_size={min_size}): start must be >= min_size.")
    size = start
    while True:
        try:
            step(size)
            return size
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            log.info("batch_size=%d ran out of memory; trying %d", size, size // 2)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if size // 2 < min_size:
                raise RuntimeError(f"find_batch_size(start={start}): even batch_size={size} runs out of "
                                   f"memory.") from e
            size //= 2


def training_step(model: nn.Module, data: torch.Tensor, precision, device=None):
    """A ``step(batch_size)`` for :func:`find_batch_size`: two ``train()`` steps at that size (the
    second has the optimizer state too), then the model's initial weights are restored.

    Args:
        model: a float32 model; data: a LongTensor (N, T) of token ids with N >= 2 × the sizes tried.
    """
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def step(batch_size: int) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PrecisionWarning)
                train(model, data[: 2 * batch_size], precision=precision, device=device,
                      settings=TrainSettings(max_steps=2, batch_size=batch_size, progress=False, log_every=1))
        finally:
            model.to("cpu").float().load_state_dict(initial)

    return step


def measured_peak_bytes(model: nn.Module, data: torch.Tensor, precision, batch_size: int, device="cuda") -> int:
    """``torch.cuda.max_memory_allocated`` over two training steps at ``batch_size``: what a
    :class:`MemoryPlan` predicts, measured. CUDA only.

    Raises:
        ValueError: ``device`` is not a CUDA device (only CUDA reports a peak).
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measured_peak_bytes(device={str(device)!r}): only CUDA reports a peak; plan_memory() "
                         f"predicts it on any device.")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    training_step(model, data, precision, device)(batch_size)
    return torch.cuda.max_memory_allocated(device)
