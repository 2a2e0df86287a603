"""plan_memory per GPU count: one GPU, DDP or FSDP over N, checked against what FSDP processes hold on this CPU."""

import pytest

from tests.test_fsdp import B, make_data, make_model
from utils.training import plan_memory, train
from utils.training.parallel.launch import launch
from utils.training.runs.sharded_checkpoint import local_tensors

pytestmark = pytest.mark.filterwarnings("ignore::utils.training.PrecisionWarning")


@pytest.fixture(scope="module")
def plan():
    return plan_memory(make_model(), make_data()[:2], precisions=("32-true", "16-mixed"))


class HeldBytes:
    """Rank 0's callback (the others run none): the bytes of its weight and AdamW shards once training ends."""

    weights = optimizer = None

    def on_train_end(self, trainer, result):
        self.weights = sum(t.numel() * t.element_size() for t in local_tensors(trainer.model.parameters()))
        states = [v for s in trainer.optimizer.state.values() for v in s.values() if v.dim() > 0]
        self.optimizer = sum(t.numel() * t.element_size() for t in local_tensors(states))


def held_by_rank_zero():
    held = HeldBytes()
    train(make_model(), make_data(), device="cpu", batch_size=B, max_steps=1, precision="32-true", progress=False,
          strategy="fsdp", callbacks=[held])
    return held.weights, held.optimizer


@pytest.mark.slow
def test_fsdp_shards_per_process_are_what_the_plan_predicts(plan):
    weights, optimizer = launch(held_by_rank_zero, num_processes=2)
    row = plan.row("32-true")
    assert weights == pytest.approx(row.weight_bytes / 2, rel=0.02)  # shards are padded to equal sizes
    assert optimizer == pytest.approx(row.optimizer_bytes / 2, rel=0.02)
    assert plan.per_gpu_fixed_bytes("32-true", "FSDP", 2) < plan.per_gpu_fixed_bytes("32-true", "one GPU", 1)


def capacity_between(plan, precision, low: int, high: int) -> int:
    """A GPU size (bytes) whose usable part lies between two fixed sizes, with room for 2 samples above low."""
    usable = low + 2 * plan.row(precision).bytes_per_sample
    assert usable < high, "the test model's sharding does not save enough to separate the strategies"
    return int(usable / (1 - plan.margin)) + 1


def test_the_plan_names_fsdp_when_one_gpu_and_ddp_do_not_fit(plan):
    one = plan.per_gpu_fixed_bytes("16-mixed", "one GPU", 1)
    gpu = capacity_between(plan, "16-mixed", plan.per_gpu_fixed_bytes("16-mixed", "FSDP", 8), one)
    rows = {(r["strategy"], r["gpus"]): r for r in plan.strategies("16-mixed", gpu)}
    assert rows[("one GPU", 1)]["batch_per_gpu"] == 0 and rows[("DDP", 8)]["batch_per_gpu"] == 0
    assert rows[("FSDP", 8)]["batch_per_gpu"] >= 2
    assert rows[("FSDP", 8)]["global_batch"] == 8 * rows[("FSDP", 8)]["batch_per_gpu"]
    first = min(n for (s, n), r in rows.items() if s == "FSDP" and r["batch_per_gpu"])
    assert plan.recommend("16-mixed", gpu).startswith(f"16-mixed: does not fit one {gpu / 2**30:.1f} GiB, nor "
                                                      f"DDP (a full copy per GPU); FSDP over {first} x ")


def test_the_plan_says_when_even_eight_shards_do_not_fit(plan):
    gpu = int(plan.per_gpu_fixed_bytes("32-true", "FSDP", 8) / (1 - plan.margin))  # not one sample more
    assert plan.recommend("32-true", gpu).endswith("does not fit even sharded over 8 x 0.0 GiB (FSDP).")


def test_one_gpu_when_it_fits(plan):
    assert plan.recommend("16-mixed", "T4").startswith("16-mixed on one T4: batch up to ")
    assert plan.strategies("16-mixed", "T4")[0]["batch_per_gpu"] == \
        plan.max_batch_size("16-mixed", "T4")


def test_the_largest_unit_is_the_larger_of_a_block_and_the_roots_own_weights(plan):
    model = make_model()
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    root = total - 2 * block  # embeddings (tied with the head) and the final norm
    assert plan.unit_fraction == pytest.approx(max(root, block) / total)
