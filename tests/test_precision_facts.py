"""Every precision fact in precision.py: dtypes, who scales the loss, what runs emulated."""
import re
import warnings

import pytest
import torch

from utils.training.amp.precision import (
    CANONICAL,
    Capabilities,
    is_emulated,
    plan_for,
    precision_facts,
    resolve_precision,
)

NO_BF16_CPU = Capabilities(cpu_bf16=False)
BF16_CPU = Capabilities(cpu_bf16=True)


@pytest.mark.parametrize("spelling, compute, params, autocast, scaler", [
    ("32", torch.float32, torch.float32, False, False),
    ("fp16", torch.float16, torch.float32, True, True),
    ("bf16", torch.bfloat16, torch.float32, True, False),
    ("16_true", torch.float16, torch.float16, False, False),
    ("bf16-true", torch.bfloat16, torch.bfloat16, False, False),
])
def test_facts_of_each_precision(spelling, compute, params, autocast, scaler):
    facts = precision_facts(spelling)
    assert (facts.compute_dtype, facts.param_dtype, facts.autocast, facts.use_scaler) == (compute, params, autocast, scaler)
    assert facts.fp16 == (compute == torch.float16)


def test_auto_has_no_fixed_facts():
    with pytest.raises(ValueError, match=re.escape("precision='auto' has no fixed facts: it depends on the machine.")):
        precision_facts("auto")


@pytest.mark.parametrize("name", CANONICAL)
def test_the_resolver_builds_its_plan_from_the_facts(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-bit on a CPU warns; the plan is what is checked here
        plan = resolve_precision(name, device="cpu", caps=BF16_CPU)
    assert plan == plan_for(name, torch.device("cpu"), plan.reason)
    assert plan.autocast_dtype == (precision_facts(name).compute_dtype if precision_facts(name).autocast else None)


@pytest.mark.parametrize("name, device, caps, emulated", [
    ("32-true", "cpu", NO_BF16_CPU, False),
    ("bf16-mixed", "cpu", NO_BF16_CPU, True),
    ("bf16-mixed", "cpu", BF16_CPU, False),
    ("16-mixed", "cpu", BF16_CPU, True),
    ("16-mixed", "cuda", Capabilities(cuda=True, cuda_count=1), False),
    ("bf16-true", "cuda", Capabilities(cuda=True, cuda_count=1, cuda_bf16=False), True),
])
def test_what_runs_emulated(name, device, caps, emulated):
    assert is_emulated(name, device, caps) is emulated


def test_a_resolved_plan_says_whether_it_is_emulated():
    with pytest.warns(UserWarning, match="no native bf16"):
        assert resolve_precision("bf16-mixed", device="cpu", caps=NO_BF16_CPU).emulated is True
    assert resolve_precision("bf16-mixed", device="cpu", caps=BF16_CPU).emulated is False
