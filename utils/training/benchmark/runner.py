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
import time
import warnings

import torch
from torch import nn

from utils.common.checks import check_int, check_number
from utils.training.amp.acceleration import cpu_allocator_state, tf32_decision, uncompile
from utils.training.amp.keep_fp32 import KeptModules, select_modules, units_to_keep
from utils.training.amp.measure import (
    StepClock,
    linear_shapes,
    matmul_peak_flops,
    model_flops_per_step,
    runs_natively,
    saved_tensor_bytes,
    shapes_peak_flops,
    state_bytes,
    state_checksum,
)
from utils.training.amp.overflow_scan import Fp16Scan, scan_fp16_overflow
from utils.training.amp.precision import (
    PrecisionPlan,
    PrecisionWarning,
    canonical_precision,
    resolve_precision,
)
from utils.training.batches import TensorBatches, as_batches, prepare_batch
from utils.training.benchmark.results import (
    BASELINE,
    MIN_RUNS,
    NOISE_BOUND,
    AmpBenchmark,
    AmpRow,
    compare_to_baseline,
)
from utils.training.loop.evaluate import evaluate
from utils.training.loop.train import train
from utils.training.objectives import objective_for, objective_loss_fn
from utils.training.settings import TrainSettings

DEFAULT_PRECISIONS = ("32-true", "auto")
COMPILED = "+compile"  # suffix of a row run under torch.compile: "bf16-mixed+compile"


def _check_int(name: str, value, low: int) -> None:
    check_int(name, value, minimum=low, message="benchmark_amp({name}={value!r}): {name} must be {rule}.")


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


def _compile_axis(compile) -> tuple[bool, ...]:
    axis = (compile,) if isinstance(compile, bool) else tuple(compile)
    if not axis or any(not isinstance(c, bool) for c in axis):
        raise ValueError(f"benchmark_amp(compile={compile!r}): compile must be a bool or a tuple of bools, "
                         f"e.g. (False, True) for rows with and without torch.compile.")
    return tuple(dict.fromkeys(axis))


class BenchmarkSession:
    """One benchmark's state: the initial weights, a plan per precision, and what the runs measured.

    :func:`benchmark_amp` drives it; a script that times something of its own between runs
    (``benchmarks/amp_speedup.py``) can call :meth:`run` itself and keep the interleaving.
    Arguments are those of :func:`benchmark_amp`.
    """

    def __init__(self, model_factory, data, *, precisions=DEFAULT_PRECISIONS, steps=20, warmup=5,
                 batch_size=TrainSettings.batch_size, device=None, lr=TrainSettings.lr, loss_fn=None,
                 eval_data=None, loss_tolerance=0.05, keep_fp32=None, compile=False, compile_options=None, tf32=False):
        for name, value, low in (("steps", steps, 1), ("warmup", warmup, 0), ("batch_size", batch_size, 1)):
            _check_int(name, value, low)
        self.compile_axis = _compile_axis(compile)
        if True in self.compile_axis and warmup < 1:
            raise ValueError(f"benchmark_amp(compile={compile!r}, warmup={warmup!r}): torch.compile compiles in "
                             f"the first step, so use warmup >= 1 to keep compiling out of the timed steps.")
        self.compile_options = compile_options if compile_options is not None else True
        self.tf32 = tf32
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
        self.tokens_per_step = tokens[0] if tokens else None
        self.matmul_shapes = linear_shapes(template)
        self.fp16_scan: Fp16Scan | None = None
        if "16-mixed" in self.plans:
            self.fp16_scan = scan_fp16_overflow(template.to(self.device), self.first_batch, loss_fn=loss_fn)
        self.keep: dict[str, list[str]] = {}  # row -> modules it runs in fp32
        if keep_fp32 is not None:
            self._add_keep_row(template, keep_fp32)
        del template
        dtypes = {_compute_dtype(p) for p in self.plans.values() if p is not None}
        self.native = {dtype: runs_natively(self.device, dtype) for dtype in dtypes}
        # A ceiling only where the dtype runs natively: an emulated one has no MFU to report.
        self.peaks = {dtype: matmul_peak_flops(self.device, dtype) for dtype in dtypes if self.native[dtype]}
        self.shape_peaks: dict[torch.dtype, float] = {}
        self.times: dict[str, list[list[float]]] = {name: [] for name in self.rows}  # per run, timed steps
        self.first_step: dict[str, float] = {}
        self.runs: dict[str, int] = {name: 0 for name in self.rows}

    def _add_keep_row(self, template: nn.Module, keep_fp32) -> None:
        """A ``16-mixed+fp32[...]`` row beside ``16-mixed``: the same run with those modules in fp32."""
        plan = self.plans.get("16-mixed")
        if plan is None:
            self.notes.append(f"keep_fp32={keep_fp32!r} applies to 16-mixed, which is not measured here (not asked for, or not possible on this device): no extra row.")
            return
        auto = isinstance(keep_fp32, str) and keep_fp32 == "auto"
        names = (units_to_keep(template, [m.name for m in self.fp16_scan.overflowing]) if auto
                 else select_modules(template, keep_fp32))
        if not names:
            self.notes.append("keep_fp32='auto': the fp16 scan flagged no module, so there is no 16-mixed+fp32 row.")
            return
        name = f"16-mixed+fp32[{','.join(names)}]"
        self.rows[name] = AmpRow(name, [f"16-mixed, keep_fp32={keep_fp32!r}"],
                                 reason=f"16-mixed with {', '.join(names)} kept in fp32.")
        self.plans[name], self.keep[name] = plan, names

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
        self._add_compile_rows()
        self._note_tf32(dev)
        return dev

    def _add_compile_rows(self) -> None:
        """One row per precision and compile setting, in that order: "32-true", "32-true+compile", ..."""
        rows, plans = {}, {}
        for name, row in self.rows.items():
            for compiled in self.compile_axis:
                key = name + COMPILED if compiled else name
                rows[key] = row if not compiled else AmpRow(
                    key, [q + COMPILED for q in row.requested], reason=row.reason, error=row.error, compile=True)
                plans[key] = self.plans[name]
        self.rows, self.plans = rows, plans

    def _note_tf32(self, dev: torch.device) -> None:
        """The fp32 rows say whether their matmuls ran in TF32 (only when it was asked for)."""
        if not self.tf32:
            return
        _, reason = tf32_decision(dev, True)
        for name, plan in self.plans.items():
            if plan is not None and _compute_dtype(plan) == torch.float32:
                self.rows[name].reason = f"{self.rows[name].reason} {reason}".strip()

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
            with warnings.catch_warnings():  # tf32 where it cannot apply: the row's reason says so
                warnings.simplefilter("ignore", PrecisionWarning)
                settings = TrainSettings(max_steps=self.warmup + self.steps, batch_size=self.batch_size, lr=self.lr,
                                         log_every=1, progress=False, seed=0)
                result = train(model, self.data, settings=settings, precision=plan, loss_fn=self.loss_fn,
                               callbacks=[clock], tf32=self.tf32, keep_fp32=self.keep.get(precision),
                               compile=self.compile_options if row.compile else False)
            uncompile(model)  # the same module may serve the next row, which may not compile
            times = clock.step_times()
            self.first_step.setdefault(precision, times[0])
            self.times[precision].append(times[self.warmup:])
            if plan.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(plan.device)
                row.peak_memory_bytes = max(row.peak_memory_bytes or 0, peak)
            if self.runs[precision] == 0:
                self._measure_once(row, plan, model, clock.optimizer, result)
        except (RuntimeError, FloatingPointError) as e:  # out of memory, a failed compile: RuntimeErrors too
            hint = ("torch.compile failed (inductor needs a C++ compiler on a CPU; compile_options="
                    "{'backend': 'eager'} runs anywhere): " if row.compile and not isinstance(e, FloatingPointError)
                    else "")
            row.error = f"{hint}{type(e).__name__}: {e}"
        self.runs[precision] += 1

    def _measure_once(self, row: AmpRow, plan: PrecisionPlan, model: nn.Module, optimizer, result) -> None:
        row.final_loss, row.skipped_steps = result.final_loss, result.skipped_steps
        row.param_bytes, row.optimizer_bytes = state_bytes(model, optimizer)
        objective = None if self.loss_fn is not None else objective_for(model)  # one look for both measurements
        loss_fn = self.loss_fn or objective_loss_fn(model, objective)
        with KeptModules(model, self.keep.get(row.precision, []), plan.device_type):
            row.activation_bytes, row.weight_copy_bytes = saved_tensor_bytes(model, self.first_batch, plan, loss_fn)
            if self.eval_data is not None:
                scores = evaluate(model, self.eval_data, plan, batch_size=self.batch_size, loss_fn=self.loss_fn,
                                  task=objective)
                row.eval_loss, row.eval_accuracy = scores["val_loss"], scores["val_accuracy"]
        total = self.warmup + self.steps
        if not math.isfinite(result.final_loss) or 2 * result.skipped_steps > total:
            scan = " See the fp16 scan." if self.fp16_scan is not None and not self.fp16_scan.ok else ""
            row.error = (f"{result.skipped_steps} of {total} steps were skipped by the GradScaler (non-finite "
                         f"gradients) and the final loss is {result.final_loss:.4g}: this model overflows "
                         f"{row.precision}.{scan}")

    def rows_to_repeat(self) -> list[str]:
        """Rows still running whose noise is unknown (fewer than ``MIN_RUNS`` runs) or above ``NOISE_BOUND``."""
        again = []
        for name, row in self.rows.items():
            if row.error is None and self.times[name]:
                row.set_step_times(self.times[name], self.items_per_step)
                again += [name] if row.noisy or row.noise is None else []
        return again

    def _set_mfu(self, row: AmpRow, plan: PrecisionPlan) -> None:
        """MFU against a measured ceiling, only for a dtype this device runs natively; never above 1."""
        dtype = _compute_dtype(plan)
        row.model_flops_per_s = self.flops_per_step / row.step_time_s
        if not self.native[dtype]:
            row.mfu, row.peak_flops, row.mfu_note = None, None, "n/a (emulated)"
            return
        row.peak_flops, row.mfu_note = self.peaks[dtype], "square matmul"
        if row.model_flops_per_s > row.peak_flops and self.matmul_shapes and self.tokens_per_step:
            if dtype not in self.shape_peaks:  # measured once per dtype, when first needed
                self.shape_peaks[dtype] = shapes_peak_flops(self.device, dtype, self.matmul_shapes,
                                                            self.tokens_per_step)
            row.peak_flops = max(row.peak_flops, self.shape_peaks[dtype])
            row.mfu_note = "model's matmul shapes"
        row.mfu = min(1.0, row.model_flops_per_s / row.peak_flops)
        if row.model_flops_per_s > row.peak_flops:
            row.mfu_note += ", capped at 100%: the step beat the measured ceiling"

    def result(self) -> AmpBenchmark:
        """The rows so far, with medians, spreads, throughput, MFU and the comparison with fp32."""
        for name, row in self.rows.items():
            row.set_step_times(self.times[name], self.items_per_step)
            plan = self.plans[name]
            if row.step_time_s and self.flops_per_step and plan is not None:
                self._set_mfu(row, plan)
            if row.compile and row.step_time_s and name in self.first_step:
                row.compile_time_s = max(0.0, self.first_step[name] - row.step_time_s)
            row.throughput_unit = self.unit
        rows = list(self.rows.values())
        compare_to_baseline(rows, self.loss_tolerance)
        notes = list(self.notes)
        ceilings = sorted({f"{r.precision}: {r.mfu_note}" for r in rows if r.mfu_note})
        if ceilings:
            notes.append("MFU is model FLOP/s over a matmul ceiling measured here for the row's compute dtype "
                         "(a square matmul, or the model's own matmul shapes where the step beat it); an "
                         "emulated dtype has no meaningful ceiling. Per row: " + "; ".join(ceilings) + ".")
        notes.append(f"Each run is one measurement: its mean step time over {self.steps} timed steps. A row's "
                     f"step time is the median of its runs, its noise their IQR / median (bound "
                     f"{NOISE_BOUND:.0%}, judged from {MIN_RUNS} runs on).")
        if any(r.noisy for r in rows):
            notes.append(f"Noisy rows (IQR / median above {NOISE_BOUND:.0%}) even after "
                         f"{max(self.runs.values())} repeats: the machine was busy; their speed is not compared.")
        if BASELINE not in self.rows:
            notes.append(f"No {BASELINE!r} row: speedups, memory ratios and loss deltas compare with it, so "
                         f"they are left empty. Add {BASELINE!r} to precisions to get them.")
        settings = {"steps": self.steps, "warmup": self.warmup, "repeats": max(self.runs.values()),
                    "noise_bound": NOISE_BOUND, "min_runs": MIN_RUNS, "compile": list(self.compile_axis), "tf32": self.tf32,
                    "batch_size": self.batch_size, "lr": self.lr, "loss_tolerance": self.loss_tolerance,
                    "items_per_step": self.items_per_step, "flops_per_step": self.flops_per_step,
                    "initial_checksum": self.checksum}
        if self.device.type == "cpu":
            settings["cpu_allocator"] = cpu_allocator_state()
        return AmpBenchmark(rows, str(self.device), settings, notes, self.fp16_scan)


def benchmark_amp(model_factory, data, *, precisions=DEFAULT_PRECISIONS, steps=20, warmup=5, repeats=3,
                  batch_size=TrainSettings.batch_size, device=None, lr=TrainSettings.lr, loss_fn=None,
                  eval_data=None, log_to_wandb=False, loss_tolerance=0.05, keep_fp32=None, max_seconds=60.0, compile=False, compile_options=None,
                  tf32=False, progress=False) -> AmpBenchmark:
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
        max_seconds: time budget (default 60) for extra interleaved repeats after the first
            ``repeats``: another round starts while any row has fewer than ``MIN_RUNS`` (3) runs or
            its runs' mean step times have an IQR / median above ``NOISE_BOUND`` (10%), and the
            extra rounds have taken less than ``max_seconds``. A row still above the bound is marked
            ``noisy``, and one with fewer runs has ``noise=None``: :meth:`AmpBenchmark.recommendation`
            then recommends nothing on speed. ``0`` runs exactly ``repeats``.
        compile: ``False`` (default), ``True``, or ``(False, True)``: rows with ``torch.compile``
            are named ``"<precision>+compile"`` and report ``compile_time_s`` (the first step's
            extra time) apart from the step time; compiling needs ``warmup >= 1``.
        compile_options: ``torch.compile`` keyword arguments for those rows (default: its defaults),
            e.g. ``{"backend": "eager"}`` where inductor has no C++ compiler.
        tf32: ask for TF32 fp32 matmuls (CUDA, compute capability >= 8.0); the fp32 rows' ``reason``
            says whether it was on.
        batch_size, lr, loss_fn: passed to ``train()``.
        device: None (best available) or as for ``resolve_precision``; an explicit request such as
            ``"16-mixed"`` on a CPU is honoured (with its slowness warning), not replaced.
        eval_data: held-out data for ``evaluate()`` after the first run of each precision.
        log_to_wandb: also log a W&B Table and summary metrics (:meth:`AmpBenchmark.log_to_wandb`).
        loss_tolerance: the largest |loss difference| from fp32 not flagged (default 0.05).
        progress: a ``tqdm.auto`` bar over the runs (default False), naming the precision each
            finished run measured.
        keep_fp32: when ``16-mixed`` is measured, also a row ``16-mixed+fp32[names]`` that keeps those
            modules in fp32 (as ``train(keep_fp32=...)``; ``"auto"``: what the fp16 scan flags).

    Returns:
        :class:`AmpBenchmark` with one :class:`AmpRow` per precision.

    Raises:
        ValueError: an unknown precision spelling, a bad count, unusable data or factory, or a
            factory whose models do not take the initial weights exactly. A precision that fails
            while running (out of memory, a non-finite loss, unsupported here) does not raise: its
            row's ``error`` says why and the other rows still run.

    .. note::
        Each step's end is observed through a callback with ``log_every=1``, which reads the loss
        (a host sync, as on CUDA timing needs anyway); CUDA steps are timed with CUDA events.
        Each run is one measurement (its mean step time, as a block in ``torch.utils.benchmark``);
        rows report the median and IQR of their runs; MFU only for a dtype the device runs
        natively, against a measured matmul ceiling, at most 100%. Throughput assumes equal-sized batches.
        When ``16-mixed`` is requested, :func:`scan_fp16_overflow` runs first on one batch.
    """
    _check_int("repeats", repeats, 1)
    check_number("max_seconds", max_seconds, minimum=0, rule="a number >= 0",
                 message="benchmark_amp({name}={value!r}): {name} must be {rule}.")
    session = BenchmarkSession(model_factory, data, precisions=precisions, steps=steps, warmup=warmup,
                               batch_size=batch_size, device=device, lr=lr, loss_fn=loss_fn,
                               eval_data=eval_data, loss_tolerance=loss_tolerance, compile=compile,
                               compile_options=compile_options, tf32=tf32, keep_fp32=keep_fp32)
    from tqdm.auto import tqdm

    with tqdm(total=repeats * len(session.precisions), desc="bench", unit="run", disable=not progress) as bar:
        def run(precision):
            session.run(precision)
            bar.set_postfix_str(f"{precision} done", refresh=False)
            bar.update()

        for _ in range(repeats):
            for precision in session.precisions:  # A B A B: drift hits every precision alike
                run(precision)
        start = time.perf_counter()
        while time.perf_counter() - start < max_seconds and session.rows_to_repeat():
            bar.total += len(session.precisions)  # an extra round while a row is noisy or has too few runs
            for precision in session.precisions:  # extra rounds stay interleaved
                run(precision)
    if isinstance(model_factory, nn.Module):  # the user's module leaves with the weights it came with
        model_factory.load_state_dict(session.initial)
    bench = session.result()
    if log_to_wandb:
        bench.log_to_wandb()
    return bench
