"""The AMP doctor: loss-scale health, modules kept in fp32, GradScaler settings, the precision report.

One model overflows fp16 in one named module (``hot``) and is fine in fp32; everything runs on the
CPU with fp16 autocast (slow, so the sizes are tiny).
"""

import json
import math
import re
import warnings

import matplotlib
import pytest
import torch
import wandb_records
import wandb_stand_in
from torch import nn

from utils.models.examples import example_model
from utils.training import (
    AmpWandbCallback,
    PrecisionWarning,
    ScaleHealth,
    benchmark_amp,
    compare_precisions,
    init_wandb,
    resolve_precision,
    scan_fp16_overflow,
    train,
)
from utils.training.amp.keep_fp32 import KeptModules, select_modules, units_to_keep
from utils.training.amp.precision_report import make_fp16_hostile

matplotlib.use("Agg")

FP16_MAX = torch.finfo(torch.float16).max
FAILING = "fp16 loss scaling is failing"


class Hot(nn.Module):
    """Bytes -> 16 -> ``hot`` (a Linear whose weights are scaled by ``gain``) -> LayerNorm -> 256 logits.

    At gain 1e5 ``hot``'s outputs reach ~2e5: beyond fp16's 65504, so under 16-mixed they become inf
    and every step's gradients are non-finite; in fp32 the LayerNorm brings them back to O(1)."""

    def __init__(self, gain=1e5):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(256, 16)
        self.hot = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 256)
        with torch.no_grad():
            self.hot.weight.mul_(gain)

    def forward(self, ids):  # (B, T) -> (B, T, 256)
        return self.head(self.norm(self.hot(self.emb(ids))))


def token_ids(rows=32):
    return torch.randint(0, 256, (rows, 9), generator=torch.Generator().manual_seed(0))


def fp16_train(model, data=None, **kwargs):
    """``train`` in 16-mixed on the CPU, its "honoured but slow" note silenced; other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*honoured but slow", category=PrecisionWarning)
        return train(model, token_ids() if data is None else data, precision="16-mixed", device="cpu",
                     batch_size=4, log_every=1, progress=False, **kwargs)


def failing_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning) and FAILING in str(w.message)]


def test_the_test_model_overflows_fp16_in_hot_only():
    model = Hot()
    x = model.emb(token_ids()[:4, :-1])
    with torch.no_grad():
        assert float(model.hot(x).abs().max()) > FP16_MAX
        assert float(model.norm(model.hot(x)).abs().max()) < 10
        assert float(x.abs().max()) < 10


# ---- GradScaler settings -------------------------------------------------------------------------
def test_scaler_settings_grow_the_scale_as_gradscaler_documents():
    # GradScaler: after growth_interval finite steps in a row the scale is multiplied by growth_factor.
    # 16 -> (2 finite steps) 32 -> (2 more) 64.
    settings = {"init_scale": 2.0**4, "growth_interval": 2, "growth_factor": 2.0}
    assert fp16_train(Hot(gain=1.0), max_steps=2, scaler_kwargs=settings).final_loss_scale == 32.0
    result = fp16_train(Hot(gain=1.0), max_steps=4, scaler_kwargs=settings)
    assert (result.final_loss_scale, result.skipped_steps) == (64.0, 0)


def test_scaler_backoff_factor_applies_on_an_overflow():
    # A step with inf gradients multiplies the scale by backoff_factor: 16 * 0.25 = 4.
    result = fp16_train(Hot(), max_steps=1, scaler_kwargs={"init_scale": 16.0, "backoff_factor": 0.25})
    assert (result.final_loss_scale, result.skipped_steps) == (4.0, 1)


@pytest.mark.parametrize(("settings", "message"), [
    ({"growth_fator": 2.0}, "GradScaler setting growth_fator=2.0 is not known. Allowed: init_scale, growth_factor, "
                            "backoff_factor, growth_interval."),
    ({"init_scale": 0.0}, "GradScaler setting init_scale=0.0 is not allowed: it must be a finite number > 0."),
    ({"growth_factor": 1.0}, "GradScaler setting growth_factor=1.0 is not allowed: it must be a finite number > 1."),
    ({"backoff_factor": 1.5}, "GradScaler setting backoff_factor=1.5 is not allowed: it must be a number between 0 "
                              "and 1 (exclusive)."),
    ({"growth_interval": 2.5}, "GradScaler setting growth_interval=2.5 is not allowed: it must be an integer >= 1."),
    ({"growth_interval": True}, "GradScaler setting growth_interval=True is not allowed: it must be an integer >= 1."),
])
def test_bad_scaler_settings_name_the_setting(settings, message, tmp_path):
    plan = resolve_precision("32-true", "cpu")
    with pytest.raises(ValueError, match=re.escape(message)):
        plan.make_scaler(**settings)
    with pytest.raises(ValueError, match=re.escape(message)):
        train(Hot(gain=1.0), token_ids(), precision="32-true", max_steps=1, progress=False,
              run_dir=tmp_path / "run", scaler_kwargs=settings)
    assert not (tmp_path / "run").exists()  # it failed before any work


def test_scaler_settings_without_loss_scaling_warn_and_do_nothing():
    plan = resolve_precision("32-true", "cpu")
    with pytest.warns(PrecisionWarning, match=re.escape("GradScaler settings {'init_scale': 8.0} have no effect "
                                                        "under 32-true: it uses no loss scaling")):
        scaler = plan.make_scaler(init_scale=8.0)
    assert not scaler.is_enabled()


# ---- loss-scale health ---------------------------------------------------------------------------
def test_health_warns_once_with_the_step_the_scale_and_the_advice(tmp_path):
    # Every step overflows: the scale halves each step, 4 -> 2 -> 1 -> 0.5. Below the floor (1.0) at step 3.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fp16_train(Hot(), max_steps=6, scaler_kwargs={"init_scale": 4.0}, lr=1e-3, run_dir=tmp_path)
    shown = failing_warnings(caught)
    assert len(shown) == 1
    assert shown[0].startswith(f"{FAILING} at step 3: the loss scale fell to 0.5, below the floor 1; scale=0.5")
    for advice in ("precision='bf16-mixed'", "keep_fp32='auto'", "lower the learning rate (lr=0.001 now)"):
        assert advice in shown[0]
    assert (result.scale_health["status"], result.scale_health["step"], result.scale_health["scale"]) == (
        "warning", 3, 0.5)
    assert [h["scale_health"] for h in result.history] == ["ok", "ok", "warning", "warning", "warning", "warning"]
    with open(tmp_path / "metrics.jsonl") as f:
        steps = [json.loads(line) for line in f if '"step"' in line]
    assert [s["scale_health"] for s in steps if s["type"] == "step"] == [h["scale_health"] for h in result.history]


def test_health_judges_the_skip_rate_over_a_full_window_only():
    health = ScaleHealth(window=4, threshold=0.25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, skipped in enumerate([True, True, False], start=1):  # 2 of 3, but the window is not full
            health.update(step, 2.0**15, skipped)
        assert (health.status, caught) == ("ok", [])
        health.update(4, 2.0**15, False)  # 2 of the last 4 = 50% > 25%
        health.update(5, 2.0**14, True)
    assert (health.status, health.step, len(failing_warnings(caught))) == ("warning", 4, 1)
    assert "50% of the last 4 optimizer steps were skipped (threshold 25%)" in health.message


def test_health_stays_ok_through_the_scalers_first_back_offs():
    health = ScaleHealth()  # window 50, threshold 25%: 3 skips in the first steps are the scaler settling
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        for step in range(1, 61):
            health.update(step, 2.0 ** 13, step <= 3)
    assert (health.status, health.skip_rate) == ("ok", 0.0)


def test_health_rejects_a_bad_window():
    with pytest.raises(ValueError, match=re.escape("ScaleHealth(window=0) is not allowed: it must be an integer >= 1.")):
        ScaleHealth(window=0)


def test_fp32_runs_have_no_scale_health():
    result = train(Hot(gain=1.0), token_ids(), precision="32-true", max_steps=2, progress=False, log_every=1)
    assert result.scale_health is None
    assert "scale_health" not in result.history[0]


# ---- keep_fp32 -----------------------------------------------------------------------------------
def test_select_modules_takes_names_globs_and_types_outermost_first():
    model = example_model("gpt-micro")
    assert select_modules(model, ["lm_head", "*.ln_f", nn.LayerNorm]) == [
        "transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2",
        "transformer.ln_f", "lm_head"]
    # a module inside a selected one already runs in fp32: only the outer one is listed
    assert select_modules(model, ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp"]) == ["transformer.h.1.mlp"]
    assert select_modules(model, "lm_head") == ["lm_head"]


def test_select_modules_names_an_entry_that_matches_nothing():
    message = ("keep_fp32 entry 'lm_haed' matches no module of GPT. Its modules: transformer, transformer.wte, "
               "transformer.wpe,")
    with pytest.raises(ValueError, match=re.escape(message)):
        select_modules(example_model("gpt-micro"), ["lm_head", "lm_haed"])
    with pytest.raises(ValueError, match=re.escape("keep_fp32 entry BatchNorm1d matches no module of GPT.")):
        select_modules(example_model("gpt-micro"), [nn.BatchNorm1d])
    with pytest.raises(ValueError, match=re.escape("keep_fp32 entry 42 is not allowed: use a module name")):
        select_modules(example_model("gpt-micro"), [42])


def test_units_keep_a_leafs_parent_and_skip_what_only_passes_an_overflow_on():
    model = example_model("gpt-micro")
    # c_fc overflows, then everything its output reaches: the rest of that MLP, its block (the
    # residual add), the next block. Keeping the MLP keeps the source; the blocks only pass it on.
    flagged = ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.gelu", "transformer.h.1.mlp.c_proj",
               "transformer.h.1.mlp.dropout", "transformer.h.1.mlp", "transformer.h.1", "transformer", ""]
    assert units_to_keep(model, flagged) == ["transformer.h.1.mlp"]
    assert units_to_keep(Hot(), ["hot"]) == ["hot"]  # a leaf right under the model is kept alone
    assert units_to_keep(model, ["transformer.h.0"]) == ["transformer.h.0"]  # the overflow starts in its own code


def test_kept_modules_run_in_fp32_then_are_restored():
    model, x = Hot(gain=1.0), torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        assert model.hot(x).dtype == torch.float16
        with KeptModules(model, ["hot"], "cpu"):
            assert model.hot(x.half()).dtype == torch.float32  # half input cast up, autocast off
            assert model.head(x).dtype == torch.float16  # the others are untouched
        assert model.hot(x).dtype == torch.float16
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_keep_fp32_auto_finds_hot_and_the_run_matches_fp32():
    settings = {"max_steps": 8, "lr": 1e-2, "data": token_ids(8)}  # 4 epochs of 2 batches: the loss falls
    plain = fp16_train(Hot(), **settings)
    kept = fp16_train(Hot(), keep_fp32="auto", **settings)
    fp32 = train(Hot(), settings.pop("data"), precision="32-true", batch_size=4, log_every=1, progress=False, **settings)
    assert (plain.skipped_steps, math.isnan(plain.final_loss)) == (8, True)
    assert kept.skipped_steps == 0
    assert kept.precision.reason.endswith("Kept in fp32 (keep_fp32='auto': the fp16 scan of the first batch flagged "
                                          "them): hot.")
    # Tolerance: a few fp16 roundings of the loss (unit roundoff 2**-11). Training moved the fp32 loss
    # by far more than that, so the check tells a run that trains like fp32 from one that does not.
    tolerance = 4 * 2.0**-11 * fp32.history[0]["loss"]
    assert fp32.history[0]["loss"] - fp32.final_loss > 10 * tolerance
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(kept.history, fp32.history, strict=True)]
    assert max(diffs) < tolerance


def test_keep_fp32_leaves_the_model_as_it_was_even_when_training_fails():
    model = Hot(gain=1.0)

    def failing_loss(net, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fp16_train(model, max_steps=2, keep_fp32=["hot", nn.LayerNorm], loss_fn=failing_loss)
    assert all("forward" not in m.__dict__ for m in model.modules())
    fp16_train(model, max_steps=1, keep_fp32=["hot"])
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_keep_fp32_under_fp32_warns_and_keeps_nothing():
    with pytest.warns(PrecisionWarning, match=re.escape("keep_fp32=['hot'] has no effect under 32-true: nothing is "
                                                        "autocast")):
        result = train(Hot(gain=1.0), token_ids(), precision="32-true", max_steps=1, progress=False,
                       keep_fp32=["hot"])
    assert result.precision.reason == "32-true was asked for and cpu supports it."


def test_keep_fp32_with_an_unknown_name_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=re.escape("keep_fp32 entry 'hott' matches no module of Hot. Its modules: "
                                                   "emb, hot, norm, head.")):
        fp16_train(Hot(), max_steps=1, keep_fp32=["hott"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_benchmark_adds_a_kept_row_beside_16_mixed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        bench = benchmark_amp(Hot, token_ids(), precisions=("32-true", "16-mixed"), device="cpu", steps=2, warmup=0,
                              repeats=1, batch_size=4, keep_fp32="auto", max_seconds=0)
    assert [r.precision for r in bench.rows] == ["32-true", "16-mixed", "16-mixed+fp32[hot]"]
    plain, kept = bench.row("16-mixed"), bench.row("16-mixed+fp32[hot]")
    assert (plain.skipped_steps, kept.skipped_steps, kept.error) == (2, 0, None)
    assert "2 of 2 steps were skipped" in plain.error


# ---- compare_precisions --------------------------------------------------------------------------
def test_compare_precisions_ranks_the_overflowing_module_first():
    model, batch = Hot(), token_ids(4)
    report = compare_precisions(model, batch)
    top = report.rows[0]
    with torch.no_grad():
        expected_max = float(model.hot(model.emb(batch[:, :-1])).abs().max())
    assert (top.module, top.kind, top.rel_error, top.overflow) == ("hot", "Linear", math.inf, True)
    assert top.max_abs == pytest.approx(expected_max)
    assert top.range_frac == pytest.approx(expected_max / FP16_MAX)
    assert report.keep_fp32 == ["hot"]
    assert (report.dtype, math.isnan(report.loss), math.isfinite(report.loss_fp32)) == ("float16", True, True)
    assert report.to_markdown().splitlines()[2].startswith("| hot | Linear | inf | inf |")
    assert "Keep in fp32: hot (train(..., keep_fp32=['hot']))." in report.to_markdown()


def test_compare_precisions_measures_underflow_and_small_errors():
    model = Hot(gain=1e-9)  # hot's outputs ~1e-9 (its bias zeroed): below fp16's smallest subnormal, 6e-8
    with torch.no_grad():
        model.hot.bias.zero_()
    report = compare_precisions(model, token_ids(4))
    rows = {r.module: r for r in report.rows}
    assert rows["hot"].underflow_frac == 1.0
    assert rows["emb"].underflow_frac == 0.0 and rows["emb"].rel_error == 0.0  # embeddings are not autocast
    assert report.keep_fp32 == []
    errors = [r.rel_error for r in report.rows]
    assert errors == sorted(errors, reverse=True)


def test_compare_precisions_bf16_on_gpt_micro_stays_within_bf16_rounding():
    report = compare_precisions(example_model("gpt-micro", n_layer=1), token_ids(2), precision="bf16-mixed")
    assert report.dtype == "bfloat16" and report.keep_fp32 == []
    # bf16 keeps 8 significant bits (unit roundoff 2**-8 = 0.0039); a block's errors stay a few of those
    assert 0 < report.rows[0].rel_error < 16 * 2.0**-8


def test_compare_precisions_leaves_the_model_as_it_was():
    model = Hot()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grad = torch.full_like(model.head.weight, 3.0)
    model.head.weight.grad = grad
    compare_precisions(model, token_ids(4))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.head.weight.grad is grad and float(grad.max()) == 3.0
    assert model.hot.weight.grad is None
    assert model.training is False
    assert all(not m._forward_hooks for m in model.modules())


def test_compare_precisions_needs_a_mixed_precision():
    message = ("compare_precisions(precision='32-true'): it resolves to '32-true', which autocasts nothing to "
               "compare with fp32. Use '16-mixed' or 'bf16-mixed'.")
    with pytest.raises(ValueError, match=re.escape(message)):
        compare_precisions(Hot(), token_ids(4), precision="32-true")


def test_precision_report_plot_draws_a_bar_per_module():
    report = compare_precisions(Hot(), token_ids(4))
    figure = report.plot()
    (ax,) = figure.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == [r.module or "<model>" for r in report.rows][::-1]


# ---- W&B ------------------------------------------------------------------------------------------
def test_callback_alerts_once_and_records_kept_modules(fake_wandb):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        fp16_train(Hot(), max_steps=5, scaler_kwargs={"init_scale": 4.0}, callbacks=[AmpWandbCallback()])
    run = fake_wandb.run
    (title, text, level), = run.alerts
    assert (title, level) == ("fp16 loss scale collapsing", "WARN") and text.startswith(f"{FAILING} at step 3")
    assert (run.summary["amp/scale_health"], run.summary["amp/scale_health_step"]) == ("warning", 3)
    assert [row["amp/skip_rate"] for row, _ in run.rows if "amp/skip_rate" in row] == [1.0] * 5

    fake_wandb.run = wandb_stand_in.FakeRun()
    fp16_train(Hot(), max_steps=1, keep_fp32="auto", callbacks=[AmpWandbCallback()])
    amp = fake_wandb.run.config.values["amp"]
    assert amp["keep_fp32"] == ["hot"] and amp["reason"].endswith("flagged them): hot.")
    assert (fake_wandb.run.summary["amp/scale_health"], fake_wandb.run.alerts) == ("ok", [])


def test_offline_run_records_scale_health_in_the_summary(tmp_path):
    session = init_wandb("amp-tests", run_dir=tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)
            result = fp16_train(Hot(), max_steps=4, scaler_kwargs={"init_scale": 4.0}, callbacks=[AmpWandbCallback()])
    finally:
        session.finish()
    records = wandb_records.wait_for_exit(next(session.offline_dir.glob("run-*.wandb")))
    summary = wandb_records.summary(records)
    assert (summary["amp/scale_health"], summary["amp/scale_health_step"]) == ("warning", 3)
    assert result.scale_health["step"] == 3


def test_make_fp16_hostile_scales_one_linear_to_the_asked_peak():
    model, batch = example_model("gpt-micro", n_layer=1), token_ids(2)
    assert make_fp16_hostile(model, batch) == "transformer.h.0.mlp.c_fc"  # the first Linear with "mlp" in its name
    peaks = {m.name: m.max_abs for m in scan_fp16_overflow(model, batch).modules}
    assert peaks["transformer.h.0.mlp.c_fc"] == pytest.approx(4 * FP16_MAX, rel=1e-5)
    assert peaks["transformer.h.0.attn.c_attn"] < FP16_MAX
    assert compare_precisions(model, batch).keep_fp32 == ["transformer.h.0.mlp"]
    with pytest.raises(ValueError, match=re.escape("make_fp16_hostile(module='lm_haed'): not an nn.Linear of GPT. "
                                                   "Its Linears: transformer.h.0.attn.c_attn,")):
        make_fp16_hostile(model, batch, module="lm_haed")


def test_make_fp16_hostile_picks_a_linear_the_forward_pass_calls():
    # nn.TransformerEncoderLayer's attention uses out_proj's weights without calling it: never the default.
    model = example_model("encoder-classifier", n_layer=1)
    batch = (token_ids(2), torch.tensor([0, 1]))  # a classifier's batch: token ids and their labels
    assert make_fp16_hostile(model, batch) == "encoder.layers.0.linear1"
    with pytest.raises(ValueError, match=re.escape(
            "make_fp16_hostile(module='encoder.layers.0.self_attn.out_proj'): EncoderClassifier's forward pass never "
            "calls it (an nn.MultiheadAttention uses its out_proj's weights directly). The Linears it calls: "
            "encoder.layers.0.linear1, encoder.layers.0.linear2, head.")):
        make_fp16_hostile(model, batch, module="encoder.layers.0.self_attn.out_proj")
