"""plan_memory: bytes per part computed by hand for a tiny model, batch sizes consistent with the peak."""
import re

import matplotlib
import pytest
import torch
from torch import nn

from utils.training import MemoryPlan, find_batch_size, plan_memory, resolve_precision
from utils.training.amp.measure import saved_tensor_bytes
from utils.training.benchmark.memory_plan import GPUS, measured_peak_bytes, training_step

matplotlib.use("Agg")

VOCAB, WIDTH, T = 32, 8, 6


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, VOCAB))  # logits (B, T, VOCAB)


def ids(rows):
    return torch.randint(0, VOCAB, (rows, T + 1), generator=torch.Generator().manual_seed(rows))


PARAMS = VOCAB * WIDTH + WIDTH * VOCAB + VOCAB  # embedding, linear weight, linear bias


@pytest.fixture(scope="module")
def plan() -> MemoryPlan:
    return plan_memory(tiny(), ids(4), precisions=("32-true", "bf16-mixed", "16-true"))


def test_weights_gradients_and_adam_state_are_counted_by_hand(plan):
    fp32 = plan.row("32-true")
    assert fp32.weight_bytes == fp32.gradient_bytes == PARAMS * 4
    assert fp32.optimizer_bytes == 2 * PARAMS * 4  # AdamW: exp_avg and exp_avg_sq in fp32
    assert fp32.weight_copy_bytes == 0
    assert plan.row("16-true").weight_bytes == PARAMS * 2  # half-precision weights


def test_autocast_copies_only_the_linear_weight(plan):
    assert plan.row("bf16").weight_copy_bytes == WIDTH * VOCAB * 2  # the embedding is a lookup, not cast


def test_activations_are_per_sample_not_per_token(plan):
    batch = ids(4)
    measured = saved_tensor_bytes(tiny(), batch, resolve_precision("32-true", "cpu")).activations
    assert plan.row("32-true").activation_bytes_per_sample * 4 == pytest.approx(measured)
    assert plan.row("32-true").output_grad_bytes_per_sample == 2 * 4 * T * VOCAB


def test_the_largest_batch_is_the_last_whose_peak_fits(plan):
    budget = 10 * 2**20
    n = plan.max_batch_size("32-true", budget)
    usable = budget * (1 - plan.margin)
    assert n > 1 and plan.peak_bytes("32-true", n) <= usable < plan.peak_bytes("32-true", n + 1)
    assert plan.peak_bytes("32-true", 2) < plan.peak_bytes("32-true", 3)


def test_a_gpu_without_bf16_fits_no_bf16_batch_and_the_table_says_so(plan):
    assert GPUS["T4"].bf16 is False and plan.max_batch_size("bf16-mixed", "T4") is None
    assert plan.max_batch_size("32-true", "T4") > 0
    bf16_line = next(line for line in plan.to_markdown().splitlines() if line.startswith("| bf16-mixed"))
    assert bf16_line.split(" | ")[7] == "no bf16"  # the T4 column, after 6 figures


def test_not_even_one_sample_fits_gives_zero(plan):
    assert plan.max_batch_size("32-true", plan.row("32-true").fixed_bytes) == 0


def test_an_unknown_gpu_repeats_the_call(plan):
    with pytest.raises(ValueError, match=re.escape("max_batch_size(gpu='V100'): unknown GPU. Use one of T4, L4, "
                                                   "A100-40GB, A100-80GB, H100-80GB, or a memory size in bytes.")):
        plan.max_batch_size("32-true", "V100")


def test_auto_cannot_be_planned_and_an_unplanned_precision_is_named(plan):
    with pytest.raises(ValueError, match=re.escape("plan_memory(precisions=(..., 'auto')): 'auto' depends on")):
        plan_memory(tiny(), ids(2), precisions=("auto",))
    with pytest.raises(ValueError, match=re.escape("row(precision='16-mixed'): not in this plan. Planned: "
                                                   "32-true, bf16-mixed, 16-true.")):
        plan.peak_bytes("16-mixed", 1)


def test_plot_shows_the_largest_batch_per_gpu(plan):
    fig = plan.plot()
    heights = [p.get_height() for p in fig.axes[0].patches[:len(GPUS)]]
    assert heights == [plan.max_batch_size("32-true", g) for g in GPUS]


def test_find_batch_size_halves_on_out_of_memory_until_a_step_runs():
    tried = []

    def step(batch_size):
        tried.append(batch_size)
        if batch_size > 12:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch_size} GiB")

    assert find_batch_size(step, 64) == 8
    assert tried == [64, 32, 16, 8]


def test_find_batch_size_passes_other_errors_through_and_gives_up_below_min_size():
    def broken(batch_size):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        find_batch_size(broken, 8)

    def never(batch_size):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(RuntimeError, match=re.escape("find_batch_size(start=8): even batch_size=2 runs out of")):
        find_batch_size(never, 8, min_size=2)


def test_a_training_step_trial_leaves_the_weights_as_they_were():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training_step(model, ids(8), "32-true", "cpu")(4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_measured_peak_is_cuda_only():
    with pytest.raises(ValueError, match=re.escape("measured_peak_bytes(device='cpu'): only CUDA reports a peak")):
        measured_peak_bytes(tiny(), ids(4), "32-true", 2, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="only CUDA reports a measured peak")
def test_the_plan_is_within_25_percent_of_the_measured_cuda_peak():
    from utils.models.examples import example_model

    model = example_model("gpt-micro")
    batch = torch.randint(0, 256, (16, model.config.block_size + 1), generator=torch.Generator().manual_seed(0))
    plan = plan_memory(model, batch[:4], precisions=("32-true", "16-mixed"), device="cuda")
    for precision in ("32-true", "16-mixed"):
        measured = measured_peak_bytes(example_model("gpt-micro"), batch, precision, 8)
        assert 0.75 <= plan.peak_bytes(precision, 8) / measured <= 1.25, precision
