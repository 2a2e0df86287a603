"""The seed's TestComputeEffectivePrecision cases, kept as they were specified."""
import itertools

import pytest

from utils.training import compute_effective_precision, resolve_precision
from utils.training.amp.precision import Capabilities


class TestComputeEffectivePrecision:
    def test_use_amp_none_returns_requested(self):
        assert compute_effective_precision("bf16", None, True, True) == "bf16"
        assert compute_effective_precision("16-mixed", None, False, False) == "16-mixed"

    def test_use_amp_true_cuda_available_use_gpu_true(self):
        assert compute_effective_precision("32", True, True, True) == "16"

    def test_use_amp_true_cuda_available_but_use_gpu_false(self):
        assert compute_effective_precision("32", True, True, False) == "32"

    def test_use_amp_true_cuda_not_available(self):
        assert compute_effective_precision("16", True, False, True) == "32"

    def test_use_amp_false_always_returns_32(self):
        for cuda, gpu in itertools.product([True, False], repeat=2):
            assert compute_effective_precision("16", False, cuda, gpu) == "32"

    @pytest.mark.parametrize("use_amp, cuda, gpu", list(itertools.product([None, True, False], [True, False], [True, False])))
    def test_all_combinations(self, use_amp, cuda, gpu):
        expected = "bf16" if use_amp is None else ("16" if use_amp and cuda and gpu else "32")
        assert compute_effective_precision("bf16", use_amp, cuda, gpu) == expected


def test_effective_precision_strings_are_accepted_by_the_resolver():
    gpu = Capabilities(cuda=True, cuda_count=1, cuda_bf16=True)
    assert resolve_precision(compute_effective_precision("32", True, True, True), caps=gpu).name == "16-mixed"
    assert resolve_precision(compute_effective_precision("32", False, True, True), caps=gpu).name == "32-true"
