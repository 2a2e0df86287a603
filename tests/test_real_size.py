"""A real-size model on a CPU: Tier 1's reduced sizes, the tiers' progress bars, and the notebooks'
"auto" settings resized for a large model. Small models stand in (the thresholds are lowered), so
nothing here is slow; benchmarks/tier1_time.py times the real 124M GPT."""
import re

import pytest
import torch
from user_models import NanoConfig, NanoGPT

from utils.models.examples import example_model
from utils.models.sizes import input_spec
from utils.notebook import cells as nb
from utils.tiers import tier1 as validation
from utils.tiers.report import Check, run_checks
from utils.tiers.tier1 import check_memory, check_numerical_stability, check_shapes, run_tier1, tier1_sizes


def nano():
    torch.manual_seed(0)
    return NanoGPT(NanoConfig(vocab_size=256, block_size=128, n_layer=1, n_head=2, n_embd=32))


@pytest.fixture
def large(monkeypatch):
    """Every model counts as too large for the full sizes on a CPU."""
    monkeypatch.setattr(validation, "CPU_FULL_FORWARD_FLOPS", 1.0)


def test_a_small_model_keeps_the_full_sizes():
    model = example_model("gpt-micro")
    assert tier1_sizes(model, input_spec(model)).reduced is False


def test_a_large_model_on_a_cpu_gets_reduced_sizes_with_the_reason(large):
    model = nano()
    sizes = tier1_sizes(model, input_spec(model))
    params = sum(p.numel() for p in model.parameters())
    assert sizes.reduced and sizes.reason.startswith(f"{params / 1e6:,.0f}M parameters at a context of 128 on a CPU")


def test_a_reduced_tier1_passes_and_says_how_it_measured(large):
    report = run_tier1(nano(), figures=False, progress=False)
    assert report.passed, report
    assert "so the checks use the full length once each" in report.info["sizes"]
    assert report["memory_footprint"].details["fp32_measured_at"] == [1]


def test_reduced_shapes_try_every_length_at_batch_1_and_short_inputs_at_larger_batches():
    check = check_shapes(nano(), batch_sizes=(1, 2, 4), max_tokens=128)
    tried = set(check.details["output_shapes"])
    assert {"(1, 1)", "(1, 2)", "(1, 32)", "(1, 64)", "(1, 128)"} <= tried  # 1, 2, 64, a quarter, all
    assert {"(2, 64)", "(4, 32)"} <= tried and not {"(2, 128)", "(4, 64)"} & tried  # at most 128 tokens
    assert "(1, 64) all id 255" in tried


def test_reduced_numerics_see_the_full_length_once_and_a_sample_of_ids():
    check = check_numerical_stability(nano(), trials=2, seq_len=16, max_sweep_tokens=32)
    assert check.passed and check.details["tokens_swept"] == 32
    assert "3 random batches and 32 of 256 token ids (a random sample)" in check.summary


class _NaNAtTheEnd(NanoGPT):
    """Finite on short inputs; its last position's embedding is NaN."""

    def __init__(self):
        super().__init__(NanoConfig(vocab_size=256, block_size=128, n_layer=1, n_head=2, n_embd=32))
        with torch.no_grad():
            self.pos.weight[-1] = float("nan")


def test_reduced_numerics_still_find_nan_at_the_last_position():
    check = check_numerical_stability(_NaNAtTheEnd(), trials=2, seq_len=16, max_sweep_tokens=32)
    assert not check.passed and "1 of 3 random batches give NaN/Inf" in check.summary


def test_memory_scaled_from_one_batch_is_per_sample():
    model = nano()
    full = check_memory(model, batch_sizes=(1, 2, 4), figure=False).details["activation_bytes"]["32-true"]
    scaled = check_memory(model, batch_sizes=(1, 2, 4), figure=False,
                          measured_batch_sizes=(1,)).details["activation_bytes"]["32-true"]
    assert scaled[1] == full[1] and scaled[4] == 4 * full[1]
    assert scaled[4] == pytest.approx(full[4], rel=0.05)  # activations are per sample


def test_the_progress_bar_names_the_check_being_run(capsys):
    seen = []
    run_checks("Tier 1: Toy", [("first", lambda: Check("first", True, "ok")),
                                ("second", lambda: seen.append(1) or Check("second", True, "ok"))])
    err = capsys.readouterr().err
    assert "Tier 1: Toy: first" in err and "Tier 1: Toy: second" in err and seen == [1]


def test_no_progress_bar_when_asked(capsys):
    run_checks("Tier 1: Toy", [("first", lambda: Check("first", True, "ok"))], progress=False)
    assert capsys.readouterr().err == ""


# ---- the notebooks' "auto" settings --------------------------------------------------------------

@pytest.fixture
def cpu_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "_DONE", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(nb, "cpu_has_native_bf16", lambda: False)
    return tmp_path


def test_a_large_model_on_a_cpu_resizes_the_auto_settings(cpu_settings, monkeypatch):
    monkeypatch.setattr(nb, "LARGE_ON_CPU_PARAMS", 1000)
    nb.use_settings(run_dir=str(cpu_settings), batch_size="auto", max_steps=7, bench_steps="auto",
                    bench_repeats=2, bench_precisions="auto")
    note = nb.fit_settings_to_model(nano())
    cfg = nb.need("settings")
    assert (cfg.batch_size, cfg.max_steps) == (nb.CPU_LARGE_SIZES["batch_size"], 7)  # a typed value stays
    assert cfg.extra == {"bench_steps": nb.CPU_LARGE_SIZES["bench_steps"], "bench_repeats": 2,
                         "bench_precisions": "32-true"}  # emulated bf16 left out at this size
    assert cfg.sizes == nb.CELL_SIZES["cpu-large"]
    assert re.match(r"0M parameters on a CPU: the 'auto' settings are sized for it \(batch_size=1, bench_steps=2, "
                    r"bench_precisions=32-true; the AMP doctor on 1 sample of 32 tokens\)\.", note)


def test_a_small_model_keeps_the_runtimes_sizes(cpu_settings):
    before = nb.use_settings(run_dir=str(cpu_settings), batch_size="auto")
    assert nb.fit_settings_to_model(example_model("gpt-micro")) == ""
    assert nb.need("settings") == before


def test_the_doctors_batch_is_one_short_window_for_a_large_model(cpu_settings, monkeypatch):
    monkeypatch.setattr(nb, "LARGE_ON_CPU_PARAMS", 1000)
    nb.use_settings(run_dir=str(cpu_settings))
    windows = torch.arange(10 * 129).view(10, 129)
    assert tuple(nb.doctor_batch(windows).shape) == (4, 129)  # the CPU sizes: four whole windows
    nb.fit_settings_to_model(nano())
    assert torch.equal(nb.doctor_batch(windows), windows[:1, :33])
    inputs, labels = nb.short_windows((windows, torch.arange(10)))
    assert tuple(inputs.shape) == (10, 32) and labels.shape == (10,)


@pytest.mark.parametrize("native", [True, False])
def test_an_emulated_precision_is_timed_at_the_smallest_batch_only_and_said(monkeypatch, native):
    import warnings

    from utils.tiers import memory_speed
    from utils.training import PrecisionWarning, resolve_precision

    monkeypatch.setattr(memory_speed, "runs_natively", lambda device, dtype: native)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        plan = resolve_precision("bf16-mixed", device="cpu")
    check = memory_speed.check_inference_speed(nano(), batch_sizes=(1, 2), seq_len=8, repeats=1, plan=plan,
                                               figure=False)
    assert sorted(check.details["bf16-mixed"]["tokens_per_s"]) == ([1, 2] if native else [1])
    assert check.details["fp32"]["tokens_per_s"].keys() == {1, 2}
    assert ("(emulated on this cpu: timed at batch 1 only)" in check.summary) is not native
