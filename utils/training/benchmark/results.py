"""What :func:`utils.training.benchmark_amp` returns: one row per precision, and ways to show them.

Example::

    >>> bench = benchmark_amp(lambda: example_model("gpt-micro"), ids, steps=10)   # doctest: +SKIP
    >>> print(bench.to_markdown())                                                 # doctest: +SKIP
    >>> bench.row("32-true").step_time_s, bench.summary()                          # doctest: +SKIP
    >>> fig = bench.plot()                                                         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

from torch.utils.benchmark import Measurement, TaskSpec

from utils.common.figures import new_figure
from utils.common.strict_json import json_safe
from utils.training.amp.overflow_scan import Fp16Scan

BASELINE = "32-true"
NOISE_BOUND = 0.10  # a row whose runs' IQR / median stays above this is ``noisy``: no speed verdict
MIN_RUNS = 3  # runs a row needs before its spread, and so its speed, is judged
SHORT_RUN_S = 1.0  # a noisy row whose runs last less than this is told to run more steps
_MIB = 2**20


@dataclass
class AmpRow:
    """One precision's figures. Ratios and deltas compare with the ``32-true`` row (None without it).

    A row whose run failed (out of memory, a non-finite loss, a precision the device refuses, an
    fp16 run that skipped most of its steps) says why in ``error``; what was measured stays.
    """

    precision: str  # canonical name actually run
    requested: list[str] = field(default_factory=list)  # the spellings that resolved to it
    reason: str = ""  # why resolve_precision chose it
    step_time_s: float | None = None  # median of the runs' mean step times
    step_time_min_s: float | None = None  # the fastest timed step of any run
    step_time_max_s: float | None = None  # the slowest
    step_times_s: list[float] = field(default_factory=list)  # every timed step, in run order
    run_step_times_s: list[float] = field(default_factory=list)  # each run's mean step time, in run order
    step_time_iqr_s: float | None = None  # interquartile range of the runs' mean step times
    noise: float | None = None  # step_time_iqr_s / step_time_s; None with fewer than MIN_RUNS runs
    noisy: bool = False  # noise stayed above NOISE_BOUND: the machine was busy, the speed is not trusted
    compile: bool = False  # the model ran under torch.compile (the row's name ends in "+compile")
    compile_time_s: float | None = None  # first compiled step minus the median step: compiling, not stepping
    throughput: float | None = None
    throughput_unit: str = "tokens/s"
    speedup: float | None = None  # fp32 median / this median
    activation_bytes: int | None = None  # activations saved for backward in one step, each storage once
    activation_ratio: float | None = None  # / fp32's
    weight_copy_bytes: int | None = None  # autocast's half-precision weight copies, also saved for backward
    peak_memory_bytes: int | None = None  # CUDA only: peak allocated during a run
    param_bytes: int | None = None
    optimizer_bytes: int | None = None
    memory_reduction_pct: float | None = None  # vs fp32: peak memory on CUDA, else activations + weight copies
    final_loss: float | None = None  # the last step's training loss
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    loss_delta: float | None = None  # final_loss - fp32's
    eval_loss_delta: float | None = None
    accuracy_delta: float | None = None
    exceeds_tolerance: bool | None = None  # |loss_delta| or |eval_loss_delta| > the benchmark's tolerance
    skipped_steps: int | None = None  # GradScaler skips (16-mixed)
    model_flops_per_s: float | None = None
    peak_flops: float | None = None  # the matmul ceiling of this precision's compute dtype
    mfu: float | None = None  # model_flops_per_s / peak_flops, never above 1.0
    mfu_note: str = ""  # "n/a (emulated)", or which ceiling peak_flops is ("square matmul", "model's matmul shapes")
    init_checksum: str | None = None  # of the weights every repeat started from
    error: str | None = None

    def set_step_times(self, runs: list[list[float]], items_per_step: int | None) -> None:
        """Record the timed steps of each run and derive the median, spread and throughput.

        As in ``torch.utils.benchmark``, a measurement is a block of steps, here one run's timed
        steps: the row's step time is the median of the runs' mean step times and its noise their
        IQR / median. Step-to-step jitter (15-30% on an idle cloud VM) averages out within a run;
        a busy spell that slows whole runs does not, and shows.
        """
        runs = [list(r) for r in runs if r]
        self.step_times_s = [t for r in runs for t in r]
        self.run_step_times_s = [statistics.fmean(r) for r in runs]
        if runs:
            timing = run_timing(self.run_step_times_s)
            self.step_time_s, self.step_time_iqr_s = timing.median, timing.iqr
            self.step_time_min_s, self.step_time_max_s = min(self.step_times_s), max(self.step_times_s)
            judged = len(runs) >= MIN_RUNS
            self.noise = _ratio(self.step_time_iqr_s, self.step_time_s) if judged else None
            self.noisy = judged and not timing.meets_confidence(NOISE_BOUND)
            self.throughput = _ratio(items_per_step, self.step_time_s)

    @property
    def runs(self) -> int:
        """How many runs were timed."""
        return len(self.run_step_times_s)


def run_timing(run_means: list[float]) -> Measurement:
    """Runs' mean step times as a ``torch.utils.benchmark.Measurement`` (``.median``, ``.iqr``,
    ``.meets_confidence(bound)``): one measurement per run. ``benchmarks/amp_speedup.py`` judges
    its plain loop with it too, so both sides use one statistic.

    Example::

        >>> t = run_timing([0.10, 0.11, 0.30])
        >>> round(t.median, 3), round(t.iqr, 3), t.meets_confidence(0.10)
        (0.11, 0.1, False)
    """
    return Measurement(number_per_run=1, raw_times=list(run_means), task_spec=TaskSpec("train step", ""))


def _ratio(a, b):
    return a / b if a is not None and b else None


def _delta(a, b):
    return a - b if a is not None and b is not None else None


def _saved(row: AmpRow) -> int | None:
    """All a step saves for backward: activations and autocast's weight copies."""
    return None if row.activation_bytes is None else row.activation_bytes + (row.weight_copy_bytes or 0)


def compare_to_baseline(rows: list[AmpRow], tolerance: float) -> None:
    """Fill each row's speedup, memory ratios and loss deltas against the fp32 row."""
    base = next((r for r in rows if r.precision == BASELINE), None)
    if base is None:
        return
    for row in rows:
        row.speedup = _ratio(base.step_time_s, row.step_time_s)
        row.activation_ratio = _ratio(row.activation_bytes, base.activation_bytes)
        on_cuda = row.peak_memory_bytes is not None and base.peak_memory_bytes is not None
        mem = (_ratio(row.peak_memory_bytes, base.peak_memory_bytes) if on_cuda
               else _ratio(_saved(row), _saved(base)))
        row.memory_reduction_pct = None if mem is None else 100.0 * (1.0 - mem)
        row.loss_delta = _delta(row.final_loss, base.final_loss)
        row.eval_loss_delta = _delta(row.eval_loss, base.eval_loss)
        row.accuracy_delta = _delta(row.eval_accuracy, base.eval_accuracy)
        deltas = [d for d in (row.loss_delta, row.eval_loss_delta) if d is not None]
        row.exceeds_tolerance = any(not abs(d) <= tolerance for d in deltas) if deltas else None


def _status(r: AmpRow) -> str:
    if r.error:
        return f"error: {r.error}"
    parts = [f"noisy (IQR {r.noise:.1%} of the median)"] if r.noisy else []
    if r.step_time_s is not None and r.noise is None:
        parts.append(f"{r.runs} of {MIN_RUNS} runs: spread unknown")
    if r.exceeds_tolerance:
        parts.append("Δ over tolerance")
    if r.compile_time_s is not None:
        parts.append(f"compiled in {r.compile_time_s:.1f} s")
    return ", ".join(parts) or "ok"


def _fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a" if value is None else str(value)
    return f"{value * scale:{spec}}{suffix}"


_TABLE_COLUMNS = ("precision", "requested", "step_time_s", "step_time_min_s", "step_time_max_s", "throughput",
                  "speedup", "activation_bytes", "activation_ratio", "weight_copy_bytes", "peak_memory_bytes",
                  "memory_reduction_pct",
                  "final_loss", "eval_loss", "loss_delta", "eval_accuracy", "mfu", "mfu_note", "skipped_steps",
                  "step_time_iqr_s", "noise", "noisy", "run_step_times_s", "compile_time_s", "error")


def _quartiles(row: AmpRow) -> tuple[float, float]:
    """The 25th and 75th percentiles of a row's runs (its median twice when it has one run)."""
    times = row.run_step_times_s or [row.step_time_s]
    if len(times) < 2:
        return times[0], times[0]
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, q3


def _apart(fast: AmpRow, slow: AmpRow) -> bool:
    """``fast`` is faster than ``slow`` beyond the runs' spread: their interquartile ranges do not overlap."""
    return _quartiles(fast)[1] < _quartiles(slow)[0]


def _slower(r: AmpRow) -> str:
    """A row slower than fp32 beyond the spread; where it is ``auto``'s pick, what to pick instead."""
    if "auto" in r.requested:
        return (f"auto picks {r.precision} on this machine, but on this model it ran at {r.speedup:.2f}x the "
                f"speed of {BASELINE}: pass precision='{BASELINE}' (--precision {BASELINE}) where speed matters")
    return f"{r.precision} is {1 / r.speedup:.1f}x slower ({r.reason.rstrip('.')})"


def _no_speed_verdict(text: str, rows: list[AmpRow]) -> str:
    """A verdict that says why speed is not compared, then any drift or failure."""
    drift = [r.precision for r in rows if r.exceeds_tolerance and r.error is None]
    failed = [f"{r.precision} failed here: {r.error}" for r in rows if r.error]
    if drift:
        text += f" Loss drifts from fp32 beyond the tolerance in: {', '.join(drift)}."
    return " ".join([text] + [f if f.endswith(".") else f + "." for f in failed])


def _busy_verdict(noisy: list[AmpRow], rows: list[AmpRow], hint: str = "") -> str:
    """No speed verdict from runs that varied more than NOISE_BOUND: say so, and why."""
    spread = ", ".join(f"{r.precision} {r.noise:.1%}" for r in noisy)
    return _no_speed_verdict(
        f"The machine was busy: step times varied too much from run to run to compare speeds (IQR / median: "
        f"{spread}; the bound is {NOISE_BOUND:.0%}), so nothing is recommended on speed. Rerun on a quiet "
        f"machine or with a larger max_seconds.{hint}", rows)


def _few_runs_verdict(unjudged: list[AmpRow], rows: list[AmpRow]) -> str:
    """No speed verdict from fewer than MIN_RUNS runs: their spread, and so the noise, is unknown."""
    counts = ", ".join(f"{r.precision} {r.runs}" for r in unjudged)
    return _no_speed_verdict(
        f"Too few runs to tell speed from noise (runs: {counts}; at least {MIN_RUNS} are needed), so nothing "
        f"is recommended on speed. Rerun with repeats >= {MIN_RUNS} or a max_seconds > 0.", rows)


@dataclass
class AmpBenchmark:
    """Rows per precision, the settings they were measured with, and notes on what was decided.

    ``settings`` holds ``steps``, ``warmup``, ``repeats`` (those run, extra ones included),
    ``noise_bound``, ``min_runs``, ``compile``, ``tf32``, ``cpu_allocator`` (on a CPU: ``"steady"`` or
    ``"default"``), ``batch_size``, ``lr``, ``loss_tolerance``, ``items_per_step`` and ``flops_per_step``; ``notes`` says, for instance,
    that two requests resolved to the same precision and were measured once.
    """

    rows: list[AmpRow]
    device: str
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fp16_scan: Fp16Scan | None = None  # when 16-mixed was run

    def row(self, precision: str) -> AmpRow:
        """The row of a canonical precision name, or of a spelling that was requested."""
        for row in self.rows:
            if precision == row.precision or precision in row.requested:
                return row
        raise KeyError(f"row({precision!r}): no such row. Rows: {', '.join(r.precision for r in self.rows)}.")

    def summary(self) -> dict[str, dict]:
        """The seed's figures per precision: speedup, memory reduction %, accuracy and loss difference."""
        return {r.precision: {"speedup": r.speedup, "memory_reduction_pct": r.memory_reduction_pct,
                              "eval_accuracy": r.eval_accuracy, "accuracy_delta": r.accuracy_delta,
                              "loss_delta": r.loss_delta, "eval_loss_delta": r.eval_loss_delta}
                for r in self.rows}

    def to_dict(self) -> dict:
        """Everything, JSON-safe (non-finite floats become None)."""
        return json_safe({
            "device": self.device, "settings": self.settings, "notes": list(self.notes),
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "fp16_scan": self.fp16_scan.to_dict() if self.fp16_scan else None,
        })

    @classmethod
    def from_dict(cls, data: dict) -> AmpBenchmark:
        """Rebuild from :meth:`to_dict` output (for instance after ``json.loads``)."""
        scan = data.get("fp16_scan")
        return cls(rows=[AmpRow(**r) for r in data["rows"]], device=data["device"],
                   settings=dict(data.get("settings", {})), notes=list(data.get("notes", [])),
                   fp16_scan=Fp16Scan.from_dict(scan) if scan else None)

    def to_markdown(self) -> str:
        """A Markdown table, one line per precision, then the notes and any fp16 scan advice."""
        unit = self.rows[0].throughput_unit if self.rows else "tokens/s"
        lines = [
            f"| precision | step ms (IQR of runs; step min–max) | {unit} | speedup | activations MiB (×fp32) | weight copies MiB "
            f"| peak MiB | params+optim MiB | final loss | eval loss | Δ loss | MFU | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            asked = [q for q in r.requested if q != r.precision]
            name = r.precision + (f" ({', '.join(asked)})" if asked else "")
            spread = f"{_fmt(r.step_time_s, '.1f', 1e3)} ({_fmt(r.step_time_iqr_s, '.1f', 1e3)}; " \
                     f"{_fmt(r.step_time_min_s, '.1f', 1e3)}–{_fmt(r.step_time_max_s, '.1f', 1e3)})"
            act = f"{_fmt(r.activation_bytes, '.2f', 1 / _MIB)} ({_fmt(r.activation_ratio, '.2f', suffix='x')})"
            state = None if r.param_bytes is None else r.param_bytes + (r.optimizer_bytes or 0)
            status = _status(r)
            lines.append(" | ".join([
                f"| {name}", spread, _fmt(r.throughput, ",.0f"), _fmt(r.speedup, ".2f", suffix="x"), act,
                _fmt(r.weight_copy_bytes, ".2f", 1 / _MIB), _fmt(r.peak_memory_bytes, ".1f", 1 / _MIB), _fmt(state, ".1f", 1 / _MIB),
                _fmt(r.final_loss, ".4f"), _fmt(r.eval_loss, ".4f"), _fmt(r.loss_delta, "+.4f"),
                r.mfu_note if r.mfu is None and r.mfu_note else _fmt(r.mfu, ".1%"), status.replace("|", "/").replace("\n", " ") + " |",
            ]))
        lines += [f"\n- {note}" for note in self.notes]
        if self.fp16_scan is not None:
            lines.append(f"\nfp16 scan: {self.fp16_scan.recommendation}")
        return "\n".join(lines)

    def _steadier(self, noisy: list[AmpRow]) -> str:
        """What would steady noisy rows: longer runs, and on a CPU the steady allocator."""
        hints = []
        steps = self.settings.get("steps")
        run_s = min(r.step_time_s * steps for r in noisy) if steps else None
        if run_s is not None and run_s < SHORT_RUN_S:
            hints.append(f"Each run lasted about {run_s:.2g} s: more steps per run (steps={math.ceil(steps * SHORT_RUN_S / run_s)}) "
                         f"average out step-to-step jitter.")
        if self.settings.get("cpu_allocator") == "default":
            hints.append("On a CPU, a common cause is glibc mapping and unmapping every large tensor: "
                         "utils.training.steady_cpu_allocator() before the benchmark steadies it.")
        return "".join(" " + h for h in hints)

    def recommendation(self) -> str:
        """The table's verdict in words: the fastest precision whose loss stays within tolerance of fp32.

        A precision is called faster (or slower) only when its runs and fp32's are apart: their
        interquartile ranges do not overlap. No speed is compared while a row is noisy or has
        fewer than ``MIN_RUNS`` runs.

        Example::

            >>> bench.recommendation()                                     # doctest: +SKIP
            'Use bf16-mixed: 1.52x faster than 32-true (41.0 ms against 62.3 ms a step) ...'
        """
        base = next((r for r in self.rows if r.precision == BASELINE and r.error is None), None)
        if base is None or base.step_time_s is None:
            return f"No usable {BASELINE} row, so nothing to compare against: include {BASELINE!r} in precisions."
        lines, fine = [], []
        timed = [r for r in self.rows if r.error is None and r.step_time_s is not None]
        noisy = [r for r in timed if r.noisy]
        if noisy:
            return _busy_verdict(noisy, self.rows, self._steadier(noisy))
        unjudged = [r for r in timed if r.noise is None]
        if unjudged and len(timed) > 1:
            return _few_runs_verdict(unjudged, self.rows)
        if all(r is base for r in self.rows):  # one row: nothing to compare
            return (f"Only {BASELINE} was measured: no mixed precision to compare. Add bf16-mixed or 16-mixed "
                    f"to precisions.")
        for r in self.rows:
            if r is base:
                continue
            if r.error:
                lines.append(f"{r.precision} failed here: {r.error}")
            elif r.exceeds_tolerance:
                lines.append(f"{r.precision} drifts from fp32 (loss Δ {_fmt(r.loss_delta, '+.4f')}, over the "
                             f"tolerance {self.settings.get('loss_tolerance')}): not recommended.")
            elif r.speedup is not None:
                fine.append(r)
        best = max(fine, key=lambda r: r.speedup, default=None)
        if best is not None and best.speedup >= 1.05 and _apart(best, base):
            verdict = (f"Use {best.precision}: {best.speedup:.2f}x faster than {BASELINE} "
                       f"({best.step_time_s * 1e3:.1f} ms against {base.step_time_s * 1e3:.1f} ms a step), loss "
                       f"within tolerance (Δ {_fmt(best.loss_delta, '+.4f')})")
            if best.memory_reduction_pct is not None:
                verdict += f", {best.memory_reduction_pct:.0f}% less memory saved for backward"
            verdict += "." + (" fp16 needs its GradScaler: keep it on." if best.precision == "16-mixed" else "")
        elif best is not None and best.speedup >= 0.95 and (best.memory_reduction_pct or 0) >= 20:
            verdict = (f"{best.precision} is about as fast as {BASELINE} ({best.speedup:.2f}x) but saves "
                       f"{best.memory_reduction_pct:.0f}% of the memory saved for backward: use it when memory "
                       f"is what limits you (a larger batch or model), else stay with {BASELINE}.")
        elif best is not None and best.speedup >= 1.05:
            verdict = (f"Stay with {BASELINE}: {best.precision}'s {best.speedup:.2f}x is within the spread of the "
                       f"runs (their interquartile ranges overlap), so it is not clearly faster here.")
        elif not fine:
            verdict = f"Stay with {BASELINE}: no mixed precision ran to the end here."
        else:
            verdict = f"Stay with {BASELINE}: no mixed precision was faster here."
        slower = [_slower(r) for r in fine if r.speedup < 0.95 and _apart(base, r)]
        return " ".join([verdict] + [s if s.endswith(".") else s + "." for s in slower + lines])

    def plot(self):
        """A matplotlib ``Figure``: step time (median of the runs, whiskers from the fastest to the slowest
        run) and memory, side by side."""
        names = [r.precision for r in self.rows]
        fig = new_figure(11, 4)
        ax_time, ax_mem = fig.subplots(1, 2)
        med = [(r.step_time_s or 0.0) * 1e3 for r in self.rows]
        runs = [r.run_step_times_s or [r.step_time_s or 0.0] for r in self.rows]  # the measurements
        low = [m - min(t) * 1e3 if r.step_time_s else 0.0 for m, t, r in zip(med, runs, self.rows)]
        high = [max(t) * 1e3 - m if r.step_time_s else 0.0 for m, t, r in zip(med, runs, self.rows)]
        bars = ax_time.bar(names, med, yerr=[low, high], capsize=6, color="tab:blue")
        pad = 0.02 * max([m + h for m, h in zip(med, high)] + [1e-9])
        for bar, m, h, r in zip(bars, med, high, self.rows):  # above the upper whisker, not on it
            ax_time.text(bar.get_x() + bar.get_width() / 2, m + h + pad,
                         "error" if r.error else _fmt(r.speedup, ".2f", suffix="x"), ha="center", va="bottom")
        ax_time.margins(y=0.15)  # room for the labels above the tallest whisker
        ax_time.set(title="Step time: median of runs, fastest–slowest run; label: speedup", ylabel="ms per step")
        kinds = [("activations", "activation_bytes"), ("autocast weight copies", "weight_copy_bytes"),
                 ("params + optimizer", None), ("peak (CUDA)", "peak_memory_bytes")]
        width = 0.8 / len(kinds)
        for i, (label, attr) in enumerate(kinds):
            if attr is None:
                values = [((r.param_bytes or 0) + (r.optimizer_bytes or 0)) / _MIB for r in self.rows]
            else:
                values = [(getattr(r, attr) or 0) / _MIB for r in self.rows]
            if any(values):
                ax_mem.bar([j + (i - 1.5) * width for j in range(len(names))], values, width, label=label)
        ax_mem.set_xticks(range(len(names)), names)
        ax_mem.set(title="Memory", ylabel="MiB")
        ax_mem.legend()
        return fig

    def log_to_wandb(self, run=None) -> None:
        """Log a ``wandb.Table`` (one line per precision) and summary metrics ``amp/<precision>/<figure>``.

        Args:
            run: a W&B run; default: the active one, or a new run in project ``"amp-benchmark"``
                (finished here).
        """
        import wandb

        started = run is None and wandb.run is None
        run = run or wandb.run or wandb.init(project="amp-benchmark", job_type="benchmark", config=self.settings)
        rows = [[json_safe(", ".join(r.requested) if c == "requested" else getattr(r, c)) for c in _TABLE_COLUMNS]
                for r in self.rows]
        run.log({"amp_benchmark": wandb.Table(columns=list(_TABLE_COLUMNS), data=rows)})
        for r in self.rows:
            for key in ("step_time_s", "throughput", "speedup", "activation_bytes", "peak_memory_bytes",
                        "memory_reduction_pct", "final_loss", "eval_loss", "loss_delta", "eval_accuracy", "mfu"):
                value = json_safe(getattr(r, key))
                if value is not None:
                    run.summary[f"amp/{r.precision}/{key}"] = value
        if started:
            run.finish()
