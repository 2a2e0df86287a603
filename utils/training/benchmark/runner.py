"""Should AMP be on for this model, on this machine? Speed, memory and accuracy of each precision,
measured the same way, through the same ``train()`` users run.

Example::

    >>> from utils.training import benchmark_amp
    >>> bench = benchmark_amp(lambda: example_model("gpt-tiny"), ids,
    ...                       precisions=("32-true", "bf16-mixed"))        # doctest: +SKIP
    >>> print(bench.to_markdown())                                        # doctest: +SKIP
    >>> bench.row("bf16-mixed").speedup, bench.row("bf16-mixed").activation_ratio   # doctest: +SKIP
    (1.41, 0.64)
"""

from __future__ import annotations

import gc
import math
import warnings

import torch
from torch import nn

from utils.training.batches import TensorBatches, as_batches, prepare_batch
from utils.training.benchmark.measure import (
    StepClock,
    matmul_peak_flops,
    model_flops_per_step,
    saved_tensor_bytes,
    state_bytes,
    state_checksum,
)
from utils.training.benchmark.overflow_scan import Fp16Scan, scan_fp16_overflow
from utils.training.benchmark.results import BASELINE, AmpBenchmark, AmpRow, compare_to_baseline
from utils.training.loop import evaluate, train
from utils.training.precision import PrecisionPlan, PrecisionWarning, canonical_precision, resolve_precision

DEFAULT_PRECISIONS = ("32-true", "auto")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"benchmark_amp({name}={value!r}): {name} must be an integer >= {low}.")


def _as_factory(model_factory):
    """A callable building a fresh model. A module passed instead is reused, never deep-copied (a copy
    of a module holding a closure over its own layers, like minGPT's ``mlpf`` lambda, would run the
    original's layers): each run loads the initial state_dict into it, and the loop makes a fresh
    optimizer and GradScaler."""
    if isinstance(model_factory, nn.Module):
        return model_factory.float  # back to float32 after a "-true" run, before the initial weights load
    if not callable(model_factory):
        raise ValueError(f"benchmark_amp(model_factory={model_factory!r}): pass a callable returning a "
                         f"fresh torch.nn.Module (e.g. lambda: example_model('gpt-tiny')), or a module.")

    def build() -> nn.Module:
        model = model_factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"benchmark_amp: model_factory() returned {type(model).__name__}, not a torch.nn.Module.")
        return model

    return build


def _step_size(batch) -> tuple[int, str, tuple[int, int] | None]:
    """(items per step, throughput unit, (tokens, sequence length) for FLOPs or None)."""
    prepared = prepare_batch(batch)
    ids = prepared.input_ids
    if ids is not None and ids.dim() >= 2:
        return prepared.count, "tokens/s", (ids.numel(), ids.shape[-1])
    return prepared.count, "samples/s", None


def _compute_dtype(plan: PrecisionPlan) -> torch.dtype:
    return plan.autocast_dtype or plan.param_dtype


class BenchmarkSession:
    """One benchmark's state: the initial weights, a plan per precision, and what the runs measured.

    :func:`benchmark_amp` drives it; a script that times something of its own between runs
    (``benchmarks/amp_speedup.py``) can call :meth:`run` itself and keep the interleaving.
    Arguments are those of :func:`benchmark_amp`.
    """

    def __init__(self, model_factory, data, *, precisions=DEFAULT_PRECISIONS, steps=20, warmup=5,
                 batch_size=16, device=None, lr=3e-4, loss_fn=None, eval_data=None, loss_tolerance=0.05):
        for name, value, low in (("steps", steps, 1), ("warmup", warmup, 0), ("batch_size", batch_size, 1)):
            _check_int(name, value, low)
        self.steps, self.warmup, self.batch_size, self.lr = steps, warmup, batch_size, lr
        self.data, self.eval_data, self.loss_fn, self.loss_tolerance = data, eval_data, loss_fn, loss_tolerance
        self.factory = _as_factory(model_factory)
        batches = as_batches(data, batch_size, 0, "data")
        self.first_batch = next(iter(batches.epoch(0) if isinstance(batches, TensorBatches) else batches))
        self.notes: list[str] = []
        self.rows: dict[str, AmpRow] = {}
        self.plans: dict[str, PrecisionPlan | None] = {}
        self.device = self._plan(precisions, device)
        template = self.factory()
        # The one copy every run loads: on the CPU, so it does not count in a GPU run's peak memory.
        self.initial = {k: v.detach().to("cpu", copy=True) for k, v in template.state_dict().items()}
        self.checksum = state_checksum(self.initial)
        try:
            self.items_per_step, self.unit, tokens = _step_size(self.first_batch)
        except TypeError:  # a batch only the loss_fn understands: no throughput or MFU to report
            if loss_fn is None:
                raise
            self.items_per_step, self.unit, tokens = None, "samples/s", None
        self.flops_per_step = model_flops_per_step(template, *tokens) if tokens else None
        self.fp16_scan: Fp16Scan | None = None
        if "16-mixed" in self.plans:
            self.fp16_scan = scan_fp16_overflow(template.to(self.device), self.first_batch, loss_fn=loss_fn)
        del template
        self.peaks = {dtype: matmul_peak_flops(self.device, dtype) for dtype in
                      {_compute_dtype(p) for p in self.plans.values() if p is not None}}
        self.times: dict[str, list[float]] = {name: [] for name in self.rows}
        self.runs: dict[str, int] = {name: 0 for name in self.rows}

    @property
    def precisions(self) -> list[str]:
        """The canonical precisions to run, in the order requested, duplicates collapsed."""
        return list(self.rows)

    def _plan(self, precisions, device) -> torch.device:
        precisions = [precisions] if isinstance(precisions, (str, int)) else list(precisions)
        if not precisions:
            raise ValueError("benchmark_amp(precisions=()): name at least one precision, e.g. ('32-true', 'auto').")
        for p in precisions:
            canonical_precision(p)  # an unknown spelling is the caller's error: raise, listing what is accepted
        # The device first: an explicit one makes resolve_precision honour what was asked (fp16 on a CPU).
        dev = resolve_precision("32-true", device).device
        for p in precisions:
            try:
                with warnings.catch_warnings(record=True) as caught:  # into the notes, not onto stderr
                    warnings.simplefilter("always", PrecisionWarning)
                    plan, error = resolve_precision(p, dev), None
                self.notes += [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]
            except ValueError as e:  # the device cannot run it (bf16 on an old GPU): that row says so
                plan, error = None, str(e)
            name = plan.name if plan else canonical_precision(p)
            if name in self.rows:
                self.rows[name].requested.append(str(p))
                self.notes.append(f"{p!r} resolves to {name!r} on {dev}"
                                  f"{f' ({plan.reason})' if plan else ''}; it is measured once, in the {name} row.")
                continue
            self.rows[name] = AmpRow(name, [str(p)], reason=plan.reason if plan else "", error=error)
            self.plans[name] = plan
        return dev

    def run(self, precision: str) -> None:
        """One repeat of one precision: a fresh model loaded with the initial weights, trained by
        ``train()`` for ``warmup + steps`` steps; the first repeat also measures memory and accuracy.
        A failure is written into the row, and the row runs no more."""
        row, plan = self.rows[precision], self.plans[precision]
        if row.error is not None:
            return
        model = self.factory()
        model.load_state_dict(self.initial)
        checksum = state_checksum(model.state_dict())
        if checksum != self.checksum:
            raise ValueError(f"benchmark_amp: after load_state_dict, model_factory()'s model holds weights "
                             f"{checksum}, not the initial {self.checksum}; its parameters must be float32 "
                             f"and its state_dict complete, so every run starts from the same weights.")
        row.init_checksum = checksum
        clock = StepClock(plan.device)
        if plan.device.type == "cuda":
            gc.collect()  # the previous run's tensors, so this run's peak is its own
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(plan.device)
        try:
            result = train(model, self.data, precision=plan, max_steps=self.warmup + self.steps,
                           batch_size=self.batch_size, lr=self.lr, loss_fn=self.loss_fn, callbacks=[clock],
                           log_every=1, progress=False, seed=0)
            self.times[precision] += clock.step_times()[self.warmup:]
            if plan.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(plan.device)
                row.peak_memory_bytes = max(row.peak_memory_bytes or 0, peak)
            if self.runs[precision] == 0:
                self._measure_once(row, plan, model, clock.optimizer, result)
        except (RuntimeError, FloatingPointError) as e:  # out of memory is a RuntimeError too
            row.error = f"{type(e).__name__}: {e}"
        self.runs[precision] += 1

    def _measure_once(self, row: AmpRow, plan: PrecisionPlan, model: nn.Module, optimizer, result) -> None:
        row.final_loss, row.skipped_steps = result.final_loss, result.skipped_steps
        row.param_bytes, row.optimizer_bytes = state_bytes(model, optimizer)
        row.activation_bytes, row.weight_copy_bytes = saved_tensor_bytes(model, self.first_batch, plan, self.loss_fn)
        if self.eval_data is not None:
            scores = evaluate(model, self.eval_data, plan, batch_size=self.batch_size, loss_fn=self.loss_fn)
            row.eval_loss, row.eval_accuracy = scores["val_loss"], scores["val_accuracy"]
        total = self.warmup + self.steps
        if not math.isfinite(result.final_loss) or 2 * result.skipped_steps > total:
            scan = " See the fp16 scan." if self.fp16_scan is not None and not self.fp16_scan.ok else ""
            row.error = (f"{result.skipped_steps} of {total} steps were skipped by the GradScaler (non-finite "
                         f"gradients) and the final loss is {result.final_loss:.4g}: this model overflows "
                         f"{row.precision}.{scan}")

    def result(self) -> AmpBenchmark:
        """The rows so far, with medians, spreads, throughput, MFU and the comparison with fp32."""
        for name, row in self.rows.items():
            row.set_step_times(self.times[name], self.items_per_step)
            plan = self.plans[name]
            if row.step_time_s and self.flops_per_step and plan is not None:
                row.model_flops_per_s = self.flops_per_step / row.step_time_s
                row.peak_flops = self.peaks[_compute_dtype(plan)]
                row.mfu = row.model_flops_per_s / row.peak_flops
            row.throughput_unit = self.unit
        rows = list(self.rows.values())
        compare_to_baseline(rows, self.loss_tolerance)
        notes = list(self.notes)
        if any(r.mfu and r.mfu > 1 for r in rows):
            notes.append("MFU above 100%: the ceiling (one square matmul per dtype) understates what this device "
                         "does on the model's shapes, as when other work shared it during that measurement or "
                         "the dtype is emulated (bf16 on a CPU without AVX512-BF16); read MFU as rough there.")
        if BASELINE not in self.rows:
            notes.append(f"No {BASELINE!r} row: speedups, memory ratios and loss deltas compare with it, so "
                         f"they are left empty. Add {BASELINE!r} to precisions to get them.")
        settings = {"steps": self.steps, "warmup": self.warmup, "repeats": max(self.runs.values()),
                    "batch_size": self.batch_size, "lr": self.lr, "loss_tolerance": self.loss_tolerance,
                    "items_per_step": self.items_per_step, "flops_per_step": self.flops_per_step,
                    "initial_checksum": self.checksum}
        return AmpBenchmark(rows, str(self.device), settings, notes, self.fp16_scan)


def benchmark_amp(model_factory, data, *, precisions=DEFAULT_PRECISIONS, steps=20, warmup=5, repeats=3,
                  batch_size=16, device=None, lr=3e-4, loss_fn=None, eval_data=None, log_to_wandb=False,
                  loss_tolerance=0.05) -> AmpBenchmark:
    """Train the same model from the same weights on the same batches in each precision; compare.

    Example::

        >>> bench = benchmark_amp(lambda: example_model("gpt-micro"), torch.randint(0, 256, (64, 33)),
        ...                       precisions=("32-true", "bf16-mixed"), steps=4, warmup=1, repeats=2)
        >>> [r.precision for r in bench.rows]
        ['32-true', 'bf16-mixed']

    Args:
        model_factory: a callable returning a fresh ``nn.Module``, or a module: then that same
            module runs every precision, its initial ``state_dict`` loaded again before each run and
            after the last. The first model's ``state_dict`` is loaded into every run.
        data: what ``train()`` takes (a LongTensor (N, T), a DataLoader, a list of batches); each run
            sees the same batches in the same order (``seed=0``).
        precisions: anything ``resolve_precision`` accepts; default ``("32-true", "auto")``. Spellings
            that resolve to the same precision are measured once (``notes`` says so). Speedups and
            deltas compare with the ``"32-true"`` row, so include it to get them.
        steps: timed optimizer steps per run (default 20), after ``warmup`` untimed ones (default 5).
        repeats: runs per precision (default 3), interleaved A B A B so drift hits all alike.
        batch_size, lr, loss_fn: passed to ``train()``.
        device: None (best available) or as for ``resolve_precision``; an explicit request such as
            ``"16-mixed"`` on a CPU is honoured (with its slowness warning), not replaced.
        eval_data: held-out data for ``evaluate()`` after the first run of each precision.
        log_to_wandb: also log a W&B Table and summary metrics (:meth:`AmpBenchmark.log_to_wandb`).
        loss_tolerance: the largest |loss difference| from fp32 not flagged (default 0.05).

    Returns:
        :class:`AmpBenchmark` with one :class:`AmpRow` per precision.

    Raises:
        ValueError: an unknown precision spelling, a bad count, unusable data or factory, or a
            factory whose models do not take the initial weights exactly. A precision that fails
            while running (out of memory, a non-finite loss, unsupported here) does not raise: its
            row's ``error`` says why and the other rows still run.

    .. note::
        Each step's end is observed through a callback with ``log_every=1``, which reads the loss
        (a host sync, as on CUDA timing needs anyway). Throughput assumes equal-sized batches.
        When ``16-mixed`` is requested, :func:`scan_fp16_overflow` runs first on one batch.
    """
    _check_int("repeats", repeats, 1)
    session = BenchmarkSession(model_factory, data, precisions=precisions, steps=steps, warmup=warmup,
                               batch_size=batch_size, device=device, lr=lr, loss_fn=loss_fn,
                               eval_data=eval_data, loss_tolerance=loss_tolerance)
    for _ in range(repeats):
        for precision in session.precisions:  # A B A B: drift hits every precision alike
            session.run(precision)
    if isinstance(model_factory, nn.Module):  # the user's module leaves with the weights it came with
        model_factory.load_state_dict(session.initial)
    bench = session.result()
    if log_to_wandb:
        bench.log_to_wandb()
    return bench
