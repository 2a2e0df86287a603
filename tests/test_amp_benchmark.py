import json
import math
import re
import time
import types
import warnings

import matplotlib
import pytest
import torch
from torch import nn

from utils.models.examples import example_model
from utils.training import (
    AmpBenchmark,
    Capabilities,
    PrecisionWarning,
    benchmark_amp,
    resolve_precision,
    scan_fp16_overflow,
)
from utils.training.amp.measure import (
    StepClock,
    matmul_params,
    model_flops_per_step,
    runs_natively,
    saved_tensor_bytes,
    state_bytes,
)
from utils.training.benchmark import runner as runner_module
from utils.training.benchmark.results import NOISE_BOUND, AmpRow, compare_to_baseline
from utils.training.benchmark.runner import BenchmarkSession

matplotlib.use("Agg")

SEQ = 17  # 16 inputs + 1 shifted target per row


def micro():
    return example_model("gpt-micro", n_layer=1, block_size=16)


def ids(rows, vocab=256, seed=0):
    return torch.randint(0, vocab, (rows, SEQ), generator=torch.Generator().manual_seed(seed))


def quietly(fn, *args, **kwargs):
    """bf16/fp16 on a CPU without native bf16 warn that they are slow; the tests know."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        return fn(*args, **kwargs)


def quiet_benchmark(*args, **kwargs):
    kwargs.setdefault("max_seconds", 0)  # exactly `repeats`: the tests count runs and steps
    return quietly(benchmark_amp, *args, **kwargs)


@pytest.fixture(scope="module")
def bench():
    torch.manual_seed(0)  # the initial weights, whatever ran before: fp32 then learns ~0.3 in its 4 steps
    return quiet_benchmark(micro, counting_ids(32), precisions=("32-true", "auto", "bf16-mixed", "16-mixed"),
                           steps=3, warmup=1, repeats=2, batch_size=4, device="cpu", eval_data=ids(8, seed=1), lr=1e-2)


def counting_ids(rows, vocab=256):
    """Rows that count upwards mod vocab: learnable, so 4 steps at lr 1e-2 move the loss ~0.3."""
    start = torch.randint(0, vocab, (rows, 1), generator=torch.Generator().manual_seed(3))
    return (start + torch.arange(SEQ)) % vocab


# ---- rows ------------------------------------------------------------------------------------


def test_every_requested_precision_has_a_row_and_duplicates_are_collapsed_with_a_note(bench):
    auto = resolve_precision("auto", "cpu").name
    expected = list(dict.fromkeys(["32-true", auto, "bf16-mixed", "16-mixed"]))
    assert [r.precision for r in bench.rows] == expected
    assert bench.row("auto").precision == auto
    if auto == "32-true":  # a CPU without native bf16: 'auto' is fp32 and is measured once
        assert bench.row("32-true").requested == ["32-true", "auto"]
        assert any(note.startswith("'auto' resolves to '32-true' on cpu") for note in bench.notes)


def test_each_row_times_steps_times_repeats_and_compares_with_fp32(bench):
    base = bench.row("32-true")
    for row in bench.rows:
        assert row.error is None, row.error
        assert len(row.step_times_s) == 3 * 2  # warm-up steps dropped
        assert row.step_time_min_s <= row.step_time_s <= row.step_time_max_s
        assert row.speedup == pytest.approx(base.step_time_s / row.step_time_s)
        assert row.throughput == pytest.approx(4 * (SEQ - 1) / row.step_time_s)  # tokens per second
        if row.mfu is not None:  # a natively run dtype: against its ceiling, capped at 100%
            assert row.mfu == pytest.approx(min(1.0, row.model_flops_per_s / row.peak_flops))
        else:
            assert row.mfu_note == "n/a (emulated)"
        assert row.peak_memory_bytes is None  # CPU
        saved = row.activation_bytes + row.weight_copy_bytes
        assert row.memory_reduction_pct == pytest.approx(100 * (1 - saved / base.activation_bytes))
        assert row.loss_delta == pytest.approx(row.final_loss - base.final_loss)
        assert row.eval_loss is not None and 0 <= row.eval_accuracy <= 1
    assert base.speedup == 1.0 and base.loss_delta == 0.0


def test_half_precision_autocast_halves_saved_activations_and_saves_weight_copies():
    model = example_model("gpt-micro")
    batch = ids(8, seed=2)
    fp32, bf16 = (saved_tensor_bytes(model, batch, quietly(resolve_precision, p, "cpu"))
                  for p in ("32-true", "bf16-mixed"))
    assert fp32.weight_copies == 0
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert bf16.weight_copies == 2 * weights  # every Linear's weight, once, in 2 bytes
    assert bf16.activations < 0.8 * fp32.activations


def test_the_benchmark_rows_carry_the_saved_bytes(bench):
    assert bench.row("32-true").weight_copy_bytes == 0
    for name in ("bf16-mixed", "16-mixed"):
        row = bench.row(name)
        assert row.weight_copy_bytes > 0 and row.activation_ratio < 1


def test_adamw_state_is_twice_the_parameters(bench):
    row = bench.row("32-true")
    assert row.optimizer_bytes == 2 * row.param_bytes  # exp_avg and exp_avg_sq; step counters left out


def test_half_precision_losses_stay_within_tolerance_of_fp32(bench):
    # fp32 learned more than 4 tolerances below the untrained loss ln(256): a precision that did not
    # learn would be flagged, so the tolerance below can fail.
    assert bench.row("32-true").final_loss < math.log(256) - 4 * 0.05
    for row in bench.rows:
        assert abs(row.loss_delta) < 0.05 and row.exceeds_tolerance is False


def test_the_fp16_scan_runs_when_16_mixed_is_requested(bench):
    assert bench.fp16_scan is not None and bench.fp16_scan.ok
    assert "16-mixed is safe" in bench.fp16_scan.recommendation


# ---- identical start, interleaving -----------------------------------------------------------


def test_every_run_starts_from_the_same_weights_even_when_the_factory_is_random():
    built, models, starts = [], [], []

    def factory():  # no seed: each call initialises differently
        model = micro()
        built.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        return model

    def loss_fn(model, batch):  # sees the weights train() starts from, at each run's first step
        if not any(model is m for m in models):  # kept alive, so no two runs' models look alike
            models.append(model)
            starts.append(torch.cat([p.detach().float().flatten() for p in model.parameters()]))
        logits = model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    b = quiet_benchmark(factory, ids(16), precisions=("32-true", "bf16-mixed"), steps=1, warmup=0, repeats=2,
                        batch_size=4, device="cpu", loss_fn=loss_fn)
    assert not torch.equal(built[0], built[1])  # the factory really is random
    assert len(starts) == 4  # 2 precisions x 2 repeats, a fresh model each
    assert all(torch.equal(s, built[0]) for s in starts)  # all start from the first model's weights
    assert len({r.init_checksum for r in b.rows}) == 1


def test_repeats_are_interleaved_across_precisions():
    calls = []

    def loss_fn(model, batch):
        calls.append(torch.is_autocast_enabled("cpu"))
        logits = model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    quiet_benchmark(micro, ids(16), precisions=("32-true", "bf16-mixed"), steps=2, warmup=0, repeats=2,
                    batch_size=4, device="cpu", loss_fn=loss_fn)
    runs = [c for i, c in enumerate(calls) if i == 0 or c != calls[i - 1]]
    assert runs == [False, True, False, True]  # fp32, bf16, fp32, bf16


# ---- failures stay in their row --------------------------------------------------------------


class Overflowing(nn.Module):
    """Fine in fp32 (a LayerNorm tames it), but ``up`` outputs ~1e6: inf in fp16."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.up = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 32)
        with torch.no_grad():
            self.up.weight.mul_(1e6)

    def forward(self, x):
        return self.head(self.norm(self.up(self.emb(x))))


def test_scan_names_the_module_that_overflows_fp16_and_recommends_bf16_or_rescaling():
    scan = scan_fp16_overflow(Overflowing(), ids(4, vocab=32))
    assert not scan.ok
    assert [m.name for m in scan.overflowing] == ["up"]
    assert scan.overflowing[0].max_abs > 65504
    assert "first up (Linear)" in scan.recommendation
    assert "precision='bf16-mixed'" in scan.recommendation and "rescale" in scan.recommendation


def test_scan_flags_values_that_flush_to_zero_in_fp16():
    model = nn.Sequential(nn.Embedding(32, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight.mul_(1e-9)
        model[1].bias.zero_()
    scan = scan_fp16_overflow(model, (ids(4, vocab=32), torch.zeros(4, dtype=torch.long)))
    assert [m.name for m in scan.underflowing] == ["1", ""]  # the Linear, which is also the model's output
    assert "flush to zero" in scan.recommendation


def test_an_fp16_overflowing_model_marks_its_fp16_row_and_the_fp32_row_still_reports():
    b = quiet_benchmark(Overflowing, ids(16, vocab=32), precisions=("32-true", "16-mixed"), steps=2, warmup=1,
                        repeats=2, batch_size=4, device="cpu")
    fp32, fp16 = b.row("32-true"), b.row("16-mixed")
    assert fp32.error is None and len(fp32.step_times_s) == 4
    assert fp16.skipped_steps == 3
    assert fp16.error.startswith("3 of 3 steps were skipped by the GradScaler")
    assert "See the fp16 scan." in fp16.error
    assert not b.fp16_scan.ok
    assert len(fp16.step_times_s) == 2  # the failed precision ran once, then stopped


class FailsUnderAutocast(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = micro()

    def forward(self, x):
        if torch.is_autocast_enabled("cpu"):
            raise torch.OutOfMemoryError("out of memory: tried to allocate 2.00 GiB")
        return self.inner(x)


def test_a_precision_that_raises_marks_only_its_own_row():
    b = quiet_benchmark(FailsUnderAutocast, ids(16), precisions=("bf16-mixed", "32-true"), steps=2, warmup=0,
                        repeats=2, batch_size=4, device="cpu")
    assert b.row("bf16-mixed").error == "OutOfMemoryError: out of memory: tried to allocate 2.00 GiB"
    assert b.row("bf16-mixed").step_time_s is None and b.row("bf16-mixed").speedup is None
    assert b.row("32-true").error is None and len(b.row("32-true").step_times_s) == 4
    assert "error: OutOfMemoryError" in b.to_markdown()


# ---- arguments -------------------------------------------------------------------------------


def test_bad_counts_repeat_the_call():
    with pytest.raises(ValueError, match=re.escape("benchmark_amp(steps=0): steps must be an integer >= 1.")):
        benchmark_amp(micro, ids(8), steps=0)
    with pytest.raises(ValueError, match=re.escape("benchmark_amp(repeats=1.5): repeats must be an integer >= 1.")):
        benchmark_amp(micro, ids(8), repeats=1.5)


def test_an_unknown_precision_is_an_error_listing_the_accepted_ones():
    with pytest.raises(ValueError, match=re.escape("precision='fp8' is not a known precision. Accepted:")):
        benchmark_amp(micro, ids(8), precisions=("32-true", "fp8"))


def test_a_factory_returning_something_else_is_named():
    with pytest.raises(ValueError, match=re.escape("model_factory() returned str, not a torch.nn.Module.")):
        benchmark_amp(lambda: "gpt-micro", ids(8))


# ---- results ---------------------------------------------------------------------------------


def test_json_round_trip(bench):
    text = json.dumps(bench.to_dict(), allow_nan=False)
    again = AmpBenchmark.from_dict(json.loads(text))
    assert again.to_dict() == bench.to_dict()
    assert again.row("bf16-mixed").step_times_s == bench.row("bf16-mixed").step_times_s


def test_json_round_trip_of_a_failed_row_and_an_overflow_scan():
    scan = scan_fp16_overflow(Overflowing(), ids(4, vocab=32))
    b = AmpBenchmark([AmpRow("16-mixed", ["fp16"], final_loss=float("nan"), error="overflow")], "cpu",
                     fp16_scan=scan)
    data = json.loads(json.dumps(b.to_dict(), allow_nan=False))
    assert data["rows"][0]["final_loss"] is None
    again = AmpBenchmark.from_dict(data)
    assert again.fp16_scan.overflowing[0].name == "up" and again.to_dict() == data


def test_markdown_has_a_line_per_precision(bench):
    lines = bench.to_markdown().splitlines()
    for row in bench.rows:
        assert sum(line.startswith(f"| {row.precision}") for line in lines) == 1


def test_plot_draws_step_time_with_spread_and_memory(bench):
    fig = bench.plot()
    ax_time, ax_mem = fig.axes
    heights = [p.get_height() for p in ax_time.patches]
    assert heights == pytest.approx([r.step_time_s * 1e3 for r in bench.rows])
    assert ax_mem.get_ylabel() == "MiB" and len(ax_mem.patches) >= len(bench.rows)
    fig.canvas.draw()  # renders without error on Agg


def test_plot_puts_each_speedup_label_above_its_error_bar(bench):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = bench.plot()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax_time = fig.axes[0]
    whiskers = [seg for coll in ax_time.collections if hasattr(coll, "get_segments")
                for seg in coll.get_segments()]  # each (2, 2): the x, y of both ends
    labels = [t for t in ax_time.texts if t.get_text().endswith("x") or t.get_text() == "error"]
    assert len(labels) == len(bench.rows)
    renderer = canvas.get_renderer()
    for text, row in zip(labels, bench.rows):
        x, _ = text.get_position()
        top = max(seg[:, 1].max() for seg in whiskers if abs(seg[0, 0] - x) < 1e-9)
        assert top == pytest.approx(max(row.run_step_times_s) * 1e3)  # the slowest run
        box = text.get_window_extent(renderer).transformed(ax_time.transData.inverted())
        assert box.y0 > top  # the label's lowest pixel is above the whisker's end
        assert box.y1 <= ax_time.get_ylim()[1]  # and inside the axes


def test_summary_has_the_seeds_figures(bench):
    fig = bench.summary()["bf16-mixed"]
    row = bench.row("bf16-mixed")
    assert fig == {"speedup": row.speedup, "memory_reduction_pct": row.memory_reduction_pct,
                   "eval_accuracy": row.eval_accuracy, "accuracy_delta": row.accuracy_delta,
                   "loss_delta": row.loss_delta, "eval_loss_delta": row.eval_loss_delta}


class FakeRun:
    def __init__(self):
        self.logged, self.summary = [], {}

    def log(self, data):
        self.logged.append(data)


def test_wandb_gets_a_table_and_summary_metrics(bench):
    import wandb

    run = FakeRun()
    bench.log_to_wandb(run)
    table = run.logged[0]["amp_benchmark"]
    assert isinstance(table, wandb.Table)
    assert [line[0] for line in table.data] == [r.precision for r in bench.rows]
    assert run.summary["amp/bf16-mixed/speedup"] == bench.row("bf16-mixed").speedup


def test_log_to_wandb_starts_and_finishes_an_offline_run_when_none_is_active(bench, monkeypatch, tmp_path):
    import wandb
    import wandb_records

    # The run's folder is given to wandb.init: WANDB_DIR is read once per process, so an earlier W&B
    # test on the same xdist worker would have fixed it already.
    init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kwargs: init(dir=str(tmp_path), **kwargs))
    bench.log_to_wandb()
    assert wandb.run is None  # the run it started was finished
    records = wandb_records.wait_for_exit(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    assert wandb_records.config(records)["steps"] == 3
    summary = wandb_records.summary(records)
    assert summary["amp/32-true/speedup"] == 1.0
    assert summary["amp/bf16-mixed/final_loss"] == pytest.approx(bench.row("bf16-mixed").final_loss)


# ---- measurement helpers ---------------------------------------------------------------------


def test_activation_bytes_count_each_storage_once_and_leave_parameters_out():
    model = nn.Linear(4, 4, bias=False)

    def loss_fn(m, x):
        h = m(x)  # linear saves x (and its weight, a parameter)
        return (h * h).sum()  # saves h twice: one storage

    plan = resolve_precision("32-true", "cpu")
    assert saved_tensor_bytes(model, torch.randn(8, 4), plan, loss_fn) == (2 * 8 * 4 * 4, 0)


def test_tied_weights_count_once_and_position_tables_are_not_matmuls():
    model = micro()
    wpe = model.transformer.wpe.weight.numel()
    unique = sum(p.numel() for p in model.parameters())
    assert matmul_params(model) == unique - wpe  # wte is tied to lm_head, so it counts
    assert state_bytes(model) == (4 * unique, 0)
    c = model.config
    assert model_flops_per_step(model, 64, 16) == (6 * (unique - wpe) + 12 * c.n_layer * c.n_embd * 16) * 64


def test_step_clock_stamps_each_step():
    clock = StepClock(torch.device("cpu"))
    from utils.training import train

    train(micro(), ids(16), max_steps=3, batch_size=4, log_every=1, progress=False, callbacks=[clock],
          precision="32-true")
    times = clock.step_times()
    assert len(times) == 3 and all(t > 0 for t in times)
    assert clock.optimizer is not None


def test_loss_tolerance_flags_a_delta_beyond_it():
    rows = [AmpRow("32-true", final_loss=2.00), AmpRow("bf16-mixed", final_loss=2.06),
            AmpRow("16-mixed", final_loss=2.01)]
    compare_to_baseline(rows, tolerance=0.05)
    assert [r.exceeds_tolerance for r in rows] == [False, True, False]
    assert rows[1].loss_delta == pytest.approx(0.06)


def test_without_an_fp32_row_the_comparisons_are_empty_and_a_note_says_why():
    b = quiet_benchmark(micro, ids(8), precisions=("bf16-mixed",), steps=1, warmup=0, repeats=1, batch_size=4,
                        device="cpu")
    assert b.row("bf16-mixed").step_time_s is not None and b.row("bf16-mixed").speedup is None
    assert any(note.startswith("No '32-true' row") for note in b.notes)


def test_a_resolver_warning_goes_into_the_notes_not_onto_stderr():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = benchmark_amp(micro, ids(8), precisions=("32-true", "16-mixed"), steps=1, warmup=0, repeats=1,
                               max_seconds=0, batch_size=4, device="cpu")
    assert not [w for w in caught if issubclass(w.category, PrecisionWarning)]
    assert any("precision='16-mixed' on device='cpu' is honoured but slow" in note for note in result.notes)


# ---- noise, MFU, compile ---------------------------------------------------------------------


class BusySpells(nn.Module):
    """gpt-micro whose every other instance sleeps 50 ms a forward: runs that disagree, as under a busy spell.

    The benchmark builds one instance for the initial weights (no. 0), then one per run: runs 2, 4, ... are slow.
    With ``clock`` set (a one-item list the step clock reads) a forward moves it instead of sleeping: 1 ms, or
    51 ms for a slow instance, whatever else runs on the machine."""

    built = 0
    clock = None

    def __init__(self):
        super().__init__()
        self.inner = micro()
        self.slow = BusySpells.built % 2 == 0
        BusySpells.built += 1

    def forward(self, x):
        if BusySpells.clock is not None:
            BusySpells.clock[0] += 0.051 if self.slow else 0.001
        elif self.slow:
            time.sleep(0.05)
        return self.inner(x)


@pytest.fixture
def busy_spells():
    BusySpells.built, BusySpells.clock = 0, None
    yield BusySpells
    BusySpells.clock = None


def test_runs_that_disagree_make_a_noisy_row_and_no_speed_is_recommended(busy_spells, monkeypatch):
    busy_spells.clock = [0.0]
    monkeypatch.setattr(StepClock, "_stamp", lambda self: busy_spells.clock[0])  # step times on the model's clock
    b = quiet_benchmark(busy_spells, ids(16), precisions=("32-true",), steps=2, warmup=0, repeats=3, batch_size=4,
                        device="cpu")
    row = b.row("32-true")
    assert row.run_step_times_s == pytest.approx([0.001, 0.051, 0.001])  # one forward a step
    assert row.noise == pytest.approx(row.step_time_iqr_s / row.step_time_s)
    assert row.noise > NOISE_BOUND and row.noisy
    assert b.recommendation().startswith("The machine was busy: step times varied too much from run to run to "
                                         f"compare speeds (IQR / median: 32-true {row.noise:.1%}; the bound is "
                                         "10%), so nothing is recommended on speed.")
    assert f"noisy (IQR {row.noise:.1%} of the median)" in b.to_markdown()


def test_a_noisy_row_gets_one_more_round_when_the_budget_allows_one(busy_spells, monkeypatch):
    busy_spells.clock = [0.0]  # the step times and the budget both on the model's clock
    monkeypatch.setattr(StepClock, "_stamp", lambda self: busy_spells.clock[0])
    monkeypatch.setattr(runner_module, "time", types.SimpleNamespace(perf_counter=lambda: busy_spells.clock[0]))
    b = quiet_benchmark(busy_spells, ids(16), precisions=("32-true",), steps=2, warmup=0, repeats=3, batch_size=4,
                        device="cpu", max_seconds=0.05)  # the extra (slow) round outlasts this budget: one only
    assert b.settings["repeats"] == 4 and b.row("32-true").runs == 4
    assert len(b.row("32-true").step_times_s) == 4 * 2


def test_rows_with_fewer_than_three_runs_get_rounds_until_the_spread_can_be_judged():
    b = quiet_benchmark(micro, ids(16), precisions=("32-true",), steps=1, warmup=0, repeats=1, batch_size=4,
                        device="cpu", max_seconds=5)
    assert b.row("32-true").runs >= 3 and b.row("32-true").noise is not None
    exact = quiet_benchmark(micro, ids(16), precisions=("32-true",), steps=1, warmup=0, repeats=1, batch_size=4,
                            device="cpu")  # max_seconds=0: exactly `repeats`, spread unknown
    assert exact.row("32-true").runs == 1 and exact.row("32-true").noise is None


def test_a_bad_time_budget_repeats_the_call():
    with pytest.raises(ValueError, match=re.escape("benchmark_amp(max_seconds=-1): max_seconds must be a number >= 0.")):
        benchmark_amp(micro, ids(8), max_seconds=-1)


def test_native_dtypes_follow_the_injected_capabilities():
    plain, bf16_cpu = Capabilities(), Capabilities(cpu_bf16=True)
    assert runs_natively("cpu", torch.float32, plain)
    assert not runs_natively("cpu", torch.bfloat16, plain) and runs_natively("cpu", torch.bfloat16, bf16_cpu)
    assert not runs_natively("cpu", torch.float16, bf16_cpu)  # fp16 on a CPU: emulated
    t4 = Capabilities(cuda=True, cuda_count=1, cuda_bf16=False)
    assert runs_natively("cuda", torch.float16, t4) and not runs_natively("cuda", torch.bfloat16, t4)


def mfu_session(native: bool, square: float, shapes: float):
    session = BenchmarkSession.__new__(BenchmarkSession)  # only what _set_mfu reads
    session.flops_per_step, session.device, session.tokens_per_step = 1e9, torch.device("cpu"), 64
    session.matmul_shapes = [(8, 8)]
    session.native, session.peaks, session.shape_peaks = ({torch.float32: native}, {torch.float32: square},
                                                          {torch.float32: shapes})
    return session


def test_mfu_is_not_shown_for_an_emulated_dtype():
    row = AmpRow("32-true", step_time_s=0.5)
    mfu_session(native=False, square=1e9, shapes=1e9)._set_mfu(row, resolve_precision("32-true", "cpu"))
    assert row.mfu is None and row.mfu_note == "n/a (emulated)" and row.model_flops_per_s == 2e9


def test_mfu_beating_the_square_ceiling_uses_the_models_shapes():
    row = AmpRow("32-true", step_time_s=0.5)  # 2e9 FLOP/s
    mfu_session(native=True, square=1e9, shapes=4e9)._set_mfu(row, resolve_precision("32-true", "cpu"))
    assert row.peak_flops == 4e9 and row.mfu == 0.5 and row.mfu_note == "model's matmul shapes"


def test_mfu_beating_every_ceiling_is_capped_and_flagged():
    row = AmpRow("32-true", step_time_s=0.5)
    mfu_session(native=True, square=1e9, shapes=1.5e9)._set_mfu(row, resolve_precision("32-true", "cpu"))
    assert row.mfu == 1.0 and row.mfu_note.endswith("capped at 100%: the step beat the measured ceiling")


def test_compiled_rows_sit_beside_their_precision_and_train_to_the_same_loss():
    b = quiet_benchmark(micro, ids(16), precisions=("32-true",), compile=(False, True), steps=2, warmup=1,
                        repeats=1, batch_size=4, device="cpu", compile_options={"backend": "eager"})
    assert [r.precision for r in b.rows] == ["32-true", "32-true+compile"]
    plain, compiled = b.rows
    assert compiled.compile and not plain.compile and compiled.error is None
    assert compiled.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    assert compiled.compile_time_s is not None and plain.compile_time_s is None
    assert b.row("32-true+compile") is compiled


def test_compiling_without_warmup_is_refused():
    with pytest.raises(ValueError, match=re.escape("benchmark_amp(compile=True, warmup=0): torch.compile "
                                                   "compiles in the first step, so use warmup >= 1")):
        benchmark_amp(micro, ids(8), compile=True, warmup=0)
    with pytest.raises(ValueError, match=re.escape("benchmark_amp(compile='yes'): compile must be a bool")):
        benchmark_amp(micro, ids(8), compile="yes")
