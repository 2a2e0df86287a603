"""Each Tier 1 check has a model that fails it and one that passes it; where a check only reports,
a reported figure is compared with one computed here by hand."""
import math
import os
import statistics
import warnings

import pytest
import torch
from torch import nn

from utils.tiers.tier1 import (
    check_gradient_flow,
    check_inference_speed,
    check_initialization,
    check_memory,
    check_numerical_stability,
    check_shapes,
)
from utils.training import PrecisionWarning, resolve_precision

V, CONTEXT = 32, 8


class TokenLM(nn.Module):
    """Embedding → Linear → head: a well-behaved (B, T) -> (B, T, V) model with no fixed context."""

    def __init__(self, width=16):
        super().__init__()
        self.emb = nn.Embedding(V, width)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, V)

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def good():
    torch.manual_seed(0)
    return TokenLM()


KW = {"max_seq_len": CONTEXT}  # short inputs: these models have no context of their own


# ---- shapes ------------------------------------------------------------------------------------------

def test_shapes_pass_and_name_the_output():
    check = check_shapes(good(), batch_sizes=(1, 3), **KW)
    assert check.passed, check.summary
    assert check.details["output"] == f"(B, T, {V})"
    # 2 batch sizes x lengths {1, 2, 2, 4, 8} (a set: {1, 2, 4, 8}) + the two edge-token inputs
    assert check.details["inputs_tried"] == 2 * 4 + 2


class SqueezesTheBatch(TokenLM):
    """The classic ``.squeeze()`` bug: a batch of one loses its batch dimension."""

    def forward(self, ids):
        return super().forward(ids).squeeze()


def test_a_model_that_squeezes_a_batch_of_one_fails_shapes():
    torch.manual_seed(0)
    check = check_shapes(SqueezesTheBatch(), batch_sizes=(1, 2), **KW)
    assert not check.passed
    assert f"input (1, 8) gave output (8, {V}): the first dimension is not the batch size 1" in check.details["problems"]


class LengthInTheWidth(TokenLM):
    """Per-token outputs whose width follows the input length: (B, T, T)."""

    def forward(self, ids):
        h = self.emb(ids)  # (B, T, width)
        return h @ h.transpose(1, 2)  # (B, T, T)


def test_trailing_dimensions_that_follow_the_input_fail_shapes():
    torch.manual_seed(0)
    check = check_shapes(LengthInTheWidth(), batch_sizes=(1,), **KW)
    assert not check.passed
    assert check.details["problems"][-1] == ("the output's trailing dimensions change with the input: "
                                             "[(1,), (2,), (4,), (8,)]")


# ---- gradient flow -----------------------------------------------------------------------------------

class ScaledPath(TokenLM):
    """``mid`` reaches the logits only through a factor ``gain``: its gradient is ``gain`` times smaller."""

    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.gain * self.mid(h))


def test_gradient_flow_passes_and_reports_every_parameter():
    check = check_gradient_flow(good(), figure=False, **KW)
    assert check.passed, check.summary
    assert sorted(check.details["grad_norms"]) == ["emb.weight", "head.bias", "head.weight", "mid.bias", "mid.weight"]
    assert all(v > 0 for v in check.details["grad_norms"].values())


def test_a_vanishing_gradient_fails_and_is_named():
    torch.manual_seed(0)
    check = check_gradient_flow(ScaledPath(gain=1e-12), figure=False, **KW)
    assert not check.passed
    assert check.details["vanishing_gradient"] == ["mid.weight", "mid.bias"]
    assert "2 vanishing gradient" in check.summary


def test_the_vanishing_threshold_is_the_one_given():
    """The same model, the threshold just below and just above mid.bias's gradient norm."""
    torch.manual_seed(0)
    model = ScaledPath(gain=1e-3)
    norm = check_gradient_flow(model, figure=False, **KW).details["grad_norms"]["mid.bias"]
    assert check_gradient_flow(model, vanishing_below=norm / 2, figure=False, **KW).details.get("vanishing_gradient") is None
    below = check_gradient_flow(model, vanishing_below=norm * 2, figure=False, **KW)
    assert not below.passed and "mid.bias" in below.details["vanishing_gradient"]


def test_a_zero_gradient_fails_and_is_named():
    torch.manual_seed(0)
    check = check_gradient_flow(ScaledPath(gain=0.0), figure=False, **KW)
    assert not check.passed and check.details["zero_gradient"] == ["mid.weight", "mid.bias"]


def test_an_infinite_gradient_fails_and_is_named():
    torch.manual_seed(0)
    check = check_gradient_flow(ScaledPath(gain=float("inf")), figure=False, **KW)
    assert not check.passed and "mid.weight" in check.details["non_finite_gradient"]


# ---- numerical stability ------------------------------------------------------------------------------

class NoisyInEval(TokenLM):
    """Noise in eval mode too (dropout that forgets ``self.training``): not deterministic."""

    def forward(self, ids):
        out = super().forward(ids)
        return out + 1e-3 * torch.rand_like(out)


class NaNOnLongInputs(TokenLM):
    """Finite for one token, NaN from 4 tokens on: only full-length random batches show it."""

    def forward(self, ids):
        out = super().forward(ids)
        return out * float("nan") if ids.shape[1] >= 4 else out


class OverflowsInHalf(TokenLM):
    """Logits ~1e5: finite in fp32, beyond fp16's 65504 under 16-bit autocast."""

    def forward(self, ids):
        return super().forward(ids) * 1e6


def test_numerical_stability_passes_with_a_deterministic_finite_model():
    check = check_numerical_stability(good(), **KW)
    assert check.passed, check.summary
    assert check.details["eval_repeat_max_diff"] == 0.0
    assert (check.details["bad_tokens"], check.details["tokens_swept"]) == ([], V)


def test_non_determinism_in_eval_fails():
    torch.manual_seed(0)
    check = check_numerical_stability(NoisyInEval(), **KW)
    assert not check.passed
    assert 0 < check.details["eval_repeat_max_diff"] <= 1e-3  # two draws of 1e-3 · U(0, 1) differ by < 1e-3
    assert "eval mode is not deterministic" in check.summary


def test_nan_on_random_batches_fails_even_when_every_token_alone_is_fine():
    torch.manual_seed(0)
    check = check_numerical_stability(NaNOnLongInputs(), trials=3, **KW)
    assert not check.passed
    assert check.details["bad_tokens"] == []
    assert check.summary.startswith("3 of 3 random batches give NaN/Inf")


def test_overflow_under_fp16_autocast_fails_and_fp32_alone_passes():
    torch.manual_seed(0)
    model = OverflowsInHalf()
    assert check_numerical_stability(model, **KW).passed  # no plan: fp32 only, and fp32 holds 1e6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        plan = resolve_precision("16-mixed", device="cpu")
    check = check_numerical_stability(model, plan=plan, **KW)
    assert not check.passed and check.details["autocast_finite"] is False
    assert "under 16-mixed the output has NaN/Inf" in check.summary


# ---- initialization ------------------------------------------------------------------------------------

def linear_with_std(std, fan_in=100):
    layer = nn.Linear(fan_in, 10)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(10, fan_in, generator=torch.Generator().manual_seed(0)) * std)
        layer.bias.zero_()
    return layer


@pytest.mark.parametrize("std, passes", [(0.5, True), (2.0, False)])
def test_initialization_gain_is_std_times_sqrt_fan_in(std, passes):
    layer = linear_with_std(std)
    check = check_initialization(layer)
    assert check.passed is passes
    by_hand = statistics.stdev(layer.weight.flatten().tolist()) * math.sqrt(100)  # ~5 or ~20 against 10
    assert check.details["layers"]["weight"]["gain"] == pytest.approx(by_hand, rel=1e-5)
    assert ("weight" in check.details["outliers"]) is not passes


# ---- memory --------------------------------------------------------------------------------------------

class WithBuffer(TokenLM):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(7, 3, dtype=torch.float64))


def test_memory_counts_weights_and_buffers_as_computed_by_hand():
    torch.manual_seed(0)
    model = WithBuffer()
    model.emb.weight.requires_grad_(False)
    check = check_memory(model, batch_sizes=(1,), figure=False, **KW)
    assert check.passed, check.summary
    # emb 32x16, mid 16x16 + 16, head 16x32 + 32; float32
    params = 32 * 16 + 16 * 16 + 16 + 16 * 32 + 32
    trainable = params - 32 * 16
    assert (check.details["parameters"], check.details["trainable"]) == (params, trainable)
    assert check.details["parameter_bytes"] == 4 * params
    assert check.details["buffer_bytes"] == 7 * 3 * 8
    act = check.details["activation_bytes"]["32-true"][1]
    # weights and buffers, then a gradient and Adam's two moments per trainable float32 parameter
    assert check.details["training_bytes_adam"]["32-true"][1] == 4 * params + 168 + 3 * 4 * trainable + act


def test_memory_check_fails_when_training_does_not_fit_the_device(monkeypatch):
    page = {"SC_PHYS_PAGES": 1, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: page[name])  # a device with 4 KiB of memory
    check = check_memory(good(), batch_sizes=(1,), figure=False, **KW)
    assert check.details["device_memory_bytes"] == 4096
    assert not check.passed and check.summary.startswith("fp32 training at batch 1 needs about")


# ---- inference speed -------------------------------------------------------------------------------------

def test_speed_reports_throughput_from_the_median_latency():
    check = check_inference_speed(good(), batch_sizes=(1, 4), seq_len=4, repeats=3, figure=False,
                                  plan=resolve_precision("32-true", device="cpu"), **KW)
    assert check.passed and set(check.details) >= {"fp32", "seq_len"} and check.details["seq_len"] == 4
    fp32 = check.details["fp32"]
    for b in (1, 4):
        assert fp32["tokens_per_s"][b] == pytest.approx(b * 4 / (fp32["latency_ms_median"][b] / 1e3))


def test_speed_fails_when_the_model_cannot_run():
    from utils.tiers.tier1 import run_tier1

    class Raises(TokenLM):
        def forward(self, ids):
            raise RuntimeError("no kernel for this shape")

    torch.manual_seed(0)
    check = run_tier1(Raises(), batch_sizes=(1,), figures=False, **KW)["inference_speed"]
    assert not check.passed and check.summary.endswith("RuntimeError: no kernel for this shape")
