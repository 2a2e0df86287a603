"""AmpBenchmark.recommendation(): the verdict in words must match the measured table."""
import pytest

from utils.training.benchmark.results import AmpBenchmark, AmpRow, compare_to_baseline


def bench(*rows, tolerance=0.05):
    rows = list(rows)
    compare_to_baseline(rows, tolerance)
    return AmpBenchmark(rows, "cpu", settings={"loss_tolerance": tolerance})


def row(precision, ms, loss=2.0, act=1000, error=None, reason="why", runs=3):
    """A row timed over `runs` quiet runs of `ms` each (a failed row, ms=None, has none)."""
    r = AmpRow(precision, final_loss=loss, activation_bytes=act, error=error, reason=reason)
    if ms is not None:
        r.set_step_times([[ms / 1e3, ms / 1e3]] * runs, 1)
    return r


def test_faster_amp_within_tolerance_is_recommended_with_its_figures():
    text = bench(row("32-true", 60.0), row("bf16-mixed", 40.0, loss=2.01, act=640)).recommendation()
    assert text.startswith("Use bf16-mixed: 1.50x faster than 32-true (40.0 ms against 60.0 ms a step), "
                           "loss within tolerance (Δ +0.0100), 36% less memory saved for backward.")


def test_slower_amp_keeps_fp32_and_says_how_much_slower():
    text = bench(row("32-true", 50.0), row("bf16-mixed", 1000.0, reason="this CPU emulates bf16")).recommendation()
    assert text == ("Stay with 32-true: no mixed precision was faster here. "
                    "bf16-mixed is 20.0x slower (this CPU emulates bf16).")


def test_faster_but_drifting_precision_is_not_recommended():
    text = bench(row("32-true", 60.0), row("16-mixed", 30.0, loss=2.5)).recommendation()
    assert text.startswith("Stay with 32-true")
    assert "16-mixed drifts from fp32 (loss Δ +0.5000, over the tolerance 0.05): not recommended." in text


def test_same_speed_with_less_memory_is_offered_for_memory_bound_runs():
    text = bench(row("32-true", 60.0), row("bf16-mixed", 59.0, act=500)).recommendation()
    assert text.startswith("bf16-mixed is about as fast as 32-true (1.02x) but saves 50%")


def test_failed_rows_are_reported_and_fp16_reminds_of_the_scaler():
    text = bench(row("32-true", 60.0), row("16-mixed", 30.0), row("bf16-mixed", None, error="bf16 unsupported")).recommendation()
    assert "fp16 needs its GradScaler: keep it on." in text and "bf16-mixed failed here: bf16 unsupported." in text


def test_without_fp32_there_is_nothing_to_compare():
    assert bench(row("bf16-mixed", 40.0)).recommendation().startswith("No usable 32-true row")


def test_a_noisy_row_means_no_speed_verdict_even_when_another_row_looks_faster():
    fp32 = row("32-true", 60.0)
    # runs averaging 40, 60, 80, 100 ms: IQR 0.03 over a median of 0.07: 43%
    fp32.set_step_times([[0.030, 0.050], [0.060], [0.080, 0.080], [0.120, 0.080]], 1)
    assert fp32.run_step_times_s == pytest.approx([0.040, 0.060, 0.080, 0.100])
    text = bench(fp32, row("bf16-mixed", 30.0), row("16-mixed", None, error="no fp16")).recommendation()
    assert text == ("The machine was busy: step times varied too much from run to run to compare speeds (IQR / "
                    "median: 32-true 42.9%; the bound is 10%), so nothing is recommended on speed. Rerun on a quiet "
                    "machine or with a larger max_seconds. 16-mixed failed here: no fp16.")


def test_step_jitter_inside_runs_is_not_noise_but_runs_that_disagree_are():
    quiet, busy = AmpRow("32-true"), AmpRow("32-true")
    quiet.set_step_times([[0.05, 0.15]] * 3, 1)  # every step 50% off the mean, every run alike
    busy.set_step_times([[0.10], [0.10], [0.13], [0.13]], 1)  # runs 30% apart: a busy spell
    assert quiet.step_time_s == pytest.approx(0.10) and quiet.noise == pytest.approx(0.0) and not quiet.noisy
    assert (quiet.step_time_min_s, quiet.step_time_max_s) == (0.05, 0.15)
    assert busy.noise == pytest.approx(0.03 / 0.115) and busy.noisy


def test_fewer_than_three_runs_give_no_speed_verdict_however_large_the_speedup():
    text = bench(row("32-true", 300.0, runs=2), row("bf16-mixed", 100.0, runs=2)).recommendation()
    assert text == ("Too few runs to tell speed from noise (runs: 32-true 2, bf16-mixed 2; at least 3 are "
                    "needed), so nothing is recommended on speed. Rerun with repeats >= 3 or a max_seconds > 0.")
    one = row("bf16-mixed", 100.0, runs=1)
    assert one.noise is None and not one.noisy
    assert "1 of 3 runs: spread unknown" in bench(row("32-true", 300.0), one).to_markdown()


def test_a_single_fp32_row_never_claims_mixed_precision_was_slower():
    text = bench(row("32-true", 60.0)).recommendation()
    assert text == ("Only 32-true was measured: no mixed precision to compare. Add bf16-mixed or 16-mixed "
                    "to precisions.")


def test_when_every_mixed_precision_failed_the_verdict_says_none_ran():
    text = bench(row("32-true", 60.0), row("16-mixed", None, error="no fp16")).recommendation()
    assert text == "Stay with 32-true: no mixed precision ran to the end here. 16-mixed failed here: no fp16."


def test_a_busy_verdict_says_what_would_steady_short_runs_and_a_default_cpu_allocator():
    fp32 = AmpRow("32-true")
    fp32.set_step_times([[0.010] * 4, [0.005] * 4, [0.010] * 4], 1)  # runs of 4 steps: 0.04 s at the median
    base = {"loss_tolerance": 0.05, "steps": 4}
    short = AmpBenchmark([fp32], "cpu", settings={**base, "cpu_allocator": "default"}).recommendation()
    assert short.endswith("Each run lasted about 0.04 s: more steps per run (steps=100) average out step-to-step "
                          "jitter. On a CPU, a common cause is glibc mapping and unmapping every large tensor: "
                          "utils.training.steady_cpu_allocator() before the benchmark steadies it.")
    long = AmpBenchmark([fp32], "cpu", settings={**base, "steps": 400, "cpu_allocator": "steady"}).recommendation()
    assert long.endswith("or with a larger max_seconds.")


def test_a_speedup_within_the_spread_of_the_runs_is_not_called_faster_or_slower():
    fp32, bf16 = AmpRow("32-true", final_loss=2.0, activation_bytes=1000), AmpRow("bf16-mixed", final_loss=2.0, activation_bytes=1000)
    fp32.set_step_times([[0.100], [0.108], [0.116]], 1)  # IQR 0.008: 7% of the median, under the bound
    bf16.set_step_times([[0.097], [0.100], [0.110]], 1)  # 1.08x by the medians; quartiles 0.0985-0.105, fp32's 0.104-0.112
    assert not fp32.noisy and not bf16.noisy
    text = bench(fp32, bf16).recommendation()
    assert text == ("Stay with 32-true: bf16-mixed's 1.08x is within the spread of the runs (their interquartile "
                    "ranges overlap), so it is not clearly faster here.")
    slow = AmpRow("bf16-mixed", final_loss=2.0, activation_bytes=1000, reason="why")
    slow.set_step_times([[0.106], [0.116], [0.118]], 1)  # 0.93x by the medians; quartiles 0.111-0.117 overlap fp32's
    assert slow.speedup is None and bench(fp32, slow).rows[1].speedup < 0.95
    assert bench(fp32, slow).recommendation() == "Stay with 32-true: no mixed precision was faster here."
