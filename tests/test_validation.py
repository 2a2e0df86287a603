"""Tier 1 on every kind of model a user brings, and on broken models that must fail the right check."""
import math
import re
import warnings

import matplotlib
import pytest
import torch
from torch import nn
from user_models import TransformerLM, TupleLM, tiny_gpt2

from utils.models.examples import example_model
from utils.tiers.report import Check, Report, run_check
from utils.tiers.tier1 import (
    check_gradient_flow,
    check_inference_speed,
    check_initialization,
    check_memory,
    check_numerical_stability,
    check_shapes,
    run_tier1,
)
from utils.training.amp.precision import PrecisionWarning, resolve_precision

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # model inits are random; results must not be

TIER1 = ["shape_robustness", "gradient_flow", "numerical_stability", "initialization",
         "memory_footprint", "inference_speed"]


# --- broken models --------------------------------------------------------------------------------

class Detached(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x).detach()  # the bug: nothing before this block learns


def detached_block_model():
    model = example_model("gpt-micro", n_layer=2)
    model.transformer.h[0] = Detached(model.transformer.h[0])
    return model


class NaNForToken(nn.Module):
    def __init__(self, token=7):
        super().__init__()
        self.inner, self.token = example_model("gpt-micro", n_layer=1), token

    def forward(self, ids):
        logits = self.inner(ids)
        return logits.masked_fill((ids == self.token).unsqueeze(-1), float("nan"))


def huge_init_model():
    model = example_model("gpt-micro", n_layer=2)
    nn.init.normal_(model.transformer.h[1].mlp.c_fc.weight, std=100.0)
    return model


class SeqFirst(nn.Module):
    """Returns (T, B, V): the classic batch_first mix-up."""

    def __init__(self):
        super().__init__()
        self.inner = example_model("gpt-micro", n_layer=1)

    def forward(self, ids):
        return self.inner(ids).transpose(0, 1)


# --- the tier on good models -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro_report():
    return run_tier1(example_model("gpt-micro"))


def test_tier1_runs_at_least_six_checks_and_passes_on_gpt_micro(micro_report):
    assert [c.name for c in micro_report.checks] == TIER1
    assert micro_report.passed, micro_report.to_markdown()


def test_tier1_info_names_the_model_and_plan(micro_report):
    info = micro_report.info
    assert (info["model"], info["parameters"], info["vocab_size"]) == ("GPT", 120_576, 256)
    assert info["max_seq_len"] == "64 (from the model)"
    assert info["precision"] == resolve_precision("auto", device="cpu").describe()  # whatever this CPU supports


@pytest.mark.parametrize("make", [
    lambda: example_model("encoder-classifier"),
    lambda: TransformerLM(),
    lambda: TupleLM(),
    lambda: tiny_gpt2(),
], ids=["encoder-classifier", "nn.Transformer", "tuple", "hf-gpt2"])
def test_tier1_passes_on_every_kind_of_model(make):
    report = run_tier1(make(), batch_sizes=(1, 3), figures=False)
    assert report.passed, report.to_markdown()


def test_model_without_fixed_context_gets_the_default_and_says_so():
    report = run_tier1(TupleLM(), batch_sizes=(1,), figures=False)
    assert report.info["max_seq_len"] == "64 (the model has no fixed context; default)"
    assert report["shape_robustness"].details["too_long_input"] == "not tried: the model has no fixed context"


def test_tier1_leaves_the_model_as_it_was():
    model = example_model("gpt-micro", n_layer=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_tier1(model, batch_sizes=(1,), figures=False)
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_without_a_vocabulary_is_told_the_tiers_take_token_ids():
    class NoEmbedding(nn.Module):
        def forward(self, ids):
            return ids.float()
    with pytest.raises(ValueError, match=re.escape(
            "run_tier1(NoEmbedding): NoEmbedding is not a token model: it has no config.vocab_size and no "
            "nn.Embedding. The tiers, evaluate and train on text take models of token ids (B, T); found instead: "
            "NoEmbedding.forward(ids); it has no layer with parameters.")):
        run_tier1(NoEmbedding())


# --- each check on its broken model ----------------------------------------------------------------

def test_detached_block_fails_gradient_flow_and_names_the_parameters():
    report = run_tier1(detached_block_model(), batch_sizes=(1,), figures=False)
    assert [c.name for c in report.failed] == ["gradient_flow"]
    missing = report["gradient_flow"].details["no_gradient"]
    assert "transformer.wpe.weight" in missing and "transformer.h.0.block.attn.c_attn.weight" in missing
    assert "transformer.h.1.attn.c_attn.weight" not in missing
    assert "transformer.wte.weight" not in missing  # tied to the head, so it still learns


def test_nan_for_one_token_fails_stability_and_names_the_token():
    check = check_numerical_stability(NaNForToken(token=7))
    assert not check.passed
    assert check.details["bad_tokens"] == [7]
    assert "1 token id(s) alone give NaN/Inf, e.g. [7]" in check.summary


def test_nan_model_fails_stability_in_the_tier():
    report = run_tier1(NaNForToken(), batch_sizes=(1,), figures=False)
    assert not report["numerical_stability"].passed and report["initialization"].passed


def test_std_100_layer_fails_initialization_and_is_named():
    report = run_tier1(huge_init_model(), batch_sizes=(1,), figures=False)
    check = report["initialization"]
    assert not check.passed
    assert list(check.details["outliers"]) == ["transformer.h.1.mlp.c_fc.weight"]
    assert re.search(r"e\.g\. transformer\.h\.1\.mlp\.c_fc\.weight: std (99\.\d|100|101) gives gain", check.summary)
    assert check.details["layers"]["transformer.h.1.mlp.c_fc.weight"]["gain"] == pytest.approx(800, rel=0.05)


def test_initialization_of_gpt2_and_torch_defaults_is_in_range():
    assert check_initialization(tiny_gpt2()).passed
    assert check_initialization(TransformerLM()).passed


def test_initialization_names_nan_and_huge_vectors():
    model = nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
        model[2].weight.fill_(500.0)
    outliers = check_initialization(model).details["outliers"]
    assert outliers == {"1.weight": "holds NaN/Inf", "2.weight": "a value of magnitude 500 > 100.0"}


def test_zero_matrices_are_noted_not_failed():
    model = example_model("gpt-micro", n_layer=1)
    nn.init.zeros_(model.transformer.h[0].attn.c_proj.weight)
    check = check_initialization(model)
    assert check.passed and check.details["constant_matrices"] == ["transformer.h.0.attn.c_proj.weight"]


def test_seq_first_output_fails_shapes():
    check = check_shapes(SeqFirst(), batch_sizes=(2,))
    assert not check.passed
    assert "input (2, 1) gave output (1, 2, 256): the first dimension is not the batch size 2" in check.details["problems"]


def test_a_length_the_model_cannot_take_fails_shapes():
    class NeedsTwo(TupleLM):
        def forward(self, ids):
            return super().forward(ids[:, :-1] if ids.shape[1] > 1 else ids[:, 5:])[0]
    check = check_shapes(NeedsTwo(), batch_sizes=(1,), max_seq_len=4)
    assert not check.passed
    assert check.summary.startswith("6 shape problem(s); first: input (1, 1) gave output (1, 0, 50)")


def test_model_detached_from_its_parameters_fails_gradient_flow():
    class Frozen(TupleLM):
        def forward(self, ids):
            return super().forward(ids)[0].detach()
    check = check_gradient_flow(Frozen())
    assert not check.passed and check.summary.startswith("The output does not depend on any trainable parameter")


def test_exploding_and_frozen_parameters():
    model = TupleLM()
    model.emb.weight.requires_grad_(False)
    check = check_gradient_flow(model, exploding_above=1e-3)
    assert check.details["frozen"] == ["emb.weight"]
    assert "emb.weight" not in check.details["grad_norms"]
    assert not check.passed and check.details["exploding_gradient"]


def test_a_check_that_raises_fails_with_the_error_instead_of_crashing():
    class Broken(TupleLM):
        def forward(self, ids):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\n(more detail)")
    report = run_tier1(Broken(), batch_sizes=(1,), figures=False)
    assert report["initialization"].passed
    speed = report["inference_speed"]
    assert not speed.passed
    assert speed.summary == "inference_speed could not run: RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    assert "Traceback" in speed.details["error"]


# --- memory and speed ---------------------------------------------------------------------------------

def test_activation_memory_grows_with_batch_and_counts_parameters_once():
    check = check_memory(example_model("gpt-micro", n_layer=1), batch_sizes=(1, 2, 4), figure=False)
    acts = check.details["activation_bytes"]["32-true"]
    assert 0 < acts[1] < acts[2] < acts[4] and acts[4] == pytest.approx(4 * acts[1], rel=0.05)
    assert check.details["parameter_bytes"] == 4 * check.details["parameters"]  # tied head counted once
    assert set(check.details["activation_bytes"]) == {"32-true", "bf16-mixed"}


def test_training_memory_adds_weights_grads_and_adam():
    model = TupleLM()
    check = check_memory(model, batch_sizes=(1,), max_seq_len=4, figure=False)
    n = check.details["parameters"]
    act = check.details["activation_bytes"]["32-true"][1]
    assert check.details["training_bytes_adam"]["32-true"][1] == 16 * n + act


def test_speed_reports_median_p95_and_throughput(micro_report):
    fp32 = micro_report["inference_speed"].details["fp32"]
    for b in (1, 2, 4):
        assert 0 < fp32["latency_ms_median"][b] <= fp32["latency_ms_p95"][b]
        assert fp32["tokens_per_s"][b] == pytest.approx(b * 64 / (fp32["latency_ms_median"][b] / 1e3))
    plan = resolve_precision("auto", device="cpu")
    if plan.name == "32-true":  # a CPU without native bf16: only fp32 is timed, and the summary says why
        assert "The AMP plan is fp32 here" in micro_report["inference_speed"].summary
        assert set(micro_report["inference_speed"].details) == {"seq_len", "repeats", "plan", "fp32"}
    else:  # native bf16: the plan is timed beside fp32 and compared with it
        assert f" {plan.name}: " in micro_report["inference_speed"].summary
        assert micro_report["inference_speed"].details[plan.name]["tokens_per_s"].keys() == {1, 2, 4}


def test_explicit_precision_is_honoured_and_compared_with_fp32():
    model = example_model("gpt-micro", n_layer=1)
    with warnings.catch_warnings():  # slow-bf16 warning only on a CPU without native bf16
        warnings.simplefilter("ignore", PrecisionWarning)
        report = run_tier1(model, precision="bf16-mixed", batch_sizes=(1,), max_seq_len=8, figures=False)
    speed = report["inference_speed"]
    assert set(speed.details) >= {"fp32", "bf16-mixed"} and "bf16-mixed:" in speed.summary
    assert report["numerical_stability"].details["autocast_finite"] is True


def test_16_true_plan_times_a_cast_copy_and_leaves_the_model_fp32():
    model = example_model("gpt-micro", n_layer=1)
    with warnings.catch_warnings():  # slow-bf16 warning only on a CPU without native bf16
        warnings.simplefilter("ignore", PrecisionWarning)
        plan = resolve_precision("bf16-true", device="cpu")
    check = check_inference_speed(model, batch_sizes=(1,), seq_len=4, plan=plan, repeats=1, figure=False)
    assert "bf16-true" in check.details
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --- figures and the report ----------------------------------------------------------------------------

def test_figures_are_returned_not_shown(micro_report):
    from matplotlib.figure import Figure
    figures = micro_report.figures
    assert set(figures) == {"gradient_flow", "memory_footprint", "inference_speed"}
    assert all(isinstance(f, Figure) for f in figures.values())
    assert len(figures["gradient_flow"].axes[0].patches) == 28  # one bar per parameter


@pytest.mark.parametrize("name", ["memory_footprint", "inference_speed"])
def test_batch_size_axes_tick_only_the_measured_batch_sizes(micro_report, name):
    ax = micro_report.figures[name].axes[0]
    assert ax.get_xlabel() == "batch size"
    assert list(ax.get_xticks()) == [1, 2, 4]  # run_tier1's default batch sizes; no 1.5, 2.5, 3.5
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]


def test_batch_sizes_spanning_8x_or_more_get_a_log2_axis():
    check = check_memory(example_model("gpt-micro", n_layer=1), batch_sizes=(1, 3, 16), max_seq_len=4)
    ax = check.figure.axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3", "16"]
    assert len(ax.get_xticks(minor=True)) == 0


def test_report_markdown_has_the_table_and_details(micro_report):
    text = micro_report.to_markdown()
    assert text.startswith("## Tier 1: GPT: PASSED")
    assert "| `gradient_flow` | PASS |" in text and "### PASS `initialization`" in text
    assert "... (28 in all)" in text  # long details are cut


def test_report_of_failures():
    report = Report("Tier 1: X", [Check("a", True, "fine"), Check("b", False, "bad | worse", {"x": math.nan}),
                                  Check("c", True, "nothing to do", skipped=True)])
    assert not report.passed and [c.name for c in report.failed] == ["b"]
    text = report.to_markdown()
    assert text.startswith("## Tier 1: X: FAILED (1 of 3 checks: b; 1 skipped: c)")
    assert "| `b` | FAIL | bad / worse |" in text and "| `c` | SKIP |" in text and "**x**: nan" in text
    with pytest.raises(KeyError, match=re.escape("report['d']: no such check. Checks: a, b, c.")):
        report["d"]


def test_run_check_passes_results_through():
    check = Check("ok", True, "fine")
    assert run_check("ok", lambda: check) is check
