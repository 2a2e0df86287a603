"""strategy="fsdp": FSDP2 (fully_shard) over two gloo processes on this CPU, launched by train(devices=2),
against one plain process with the doubled batch."""

import os
import re
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from tests.test_ddp import WORLD, B, T, make_data
from utils.models.examples import example_model
from utils.training import resolve_precision, train
from utils.training.parallel.distributed import fsdp_units, mixed_precision_policy
from utils.training.parallel.launch import launch

pytestmark = pytest.mark.filterwarnings("ignore::utils.training.PrecisionWarning")


def make_model():
    torch.manual_seed(0)
    return example_model("gpt-micro", n_layer=2, n_embd=32, n_head=2, block_size=T)


def run(devices=None, batch_size=B, strategy="ddp", **kw):
    kw.setdefault("precision", "32-true")
    kw.setdefault("max_steps", 8)
    model = make_model()
    result = train(model, make_data(kw.pop("n", 64)), device="cpu", batch_size=batch_size, lr=kw.pop("lr", 3e-3),
                   log_every=1, progress=False, devices=devices, strategy=strategy, **kw)
    return model, result


def fsdp_alone(**kw):
    """One FSDP process, forked (launch): the processes these tests fork later never inherit a parent
    that ran FSDP itself (such forks hung once in ~5 runs here)."""
    return launch(lambda: run(batch_size=B * WORLD, strategy="fsdp", **kw)[1], num_processes=1)


def worst_difference(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def losses(result):
    return [h["loss"] for h in result.history]


@pytest.fixture(scope="module")
def reference():
    return run(batch_size=B * WORLD)


@pytest.mark.slow
def test_fsdp_over_two_processes_matches_one_process_after_8_fp32_steps(reference):
    model, result = run(devices=WORLD, strategy="fsdp")
    assert losses(result) == pytest.approx(losses(reference[1]), abs=1e-4)
    assert worst_difference(model, reference[0]) < 1e-4  # the shards gathered back into this model
    assert reference[1].history[0]["grad_norm"] > 1.0  # so the clipping (max_grad_norm=1.0) was at work
    assert result.history[0]["grad_norm"] == pytest.approx(reference[1].history[0]["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_accumulation_with_a_short_tail_matches_one_process():
    kw = dict(max_steps=6, grad_accum_steps=2, n=40)  # 5 global batches an epoch: a short tail each epoch
    model, _ = run(devices=WORLD, strategy="fsdp", **kw)
    expected, _ = run(batch_size=B * WORLD, **kw)
    assert worst_difference(model, expected) < 1e-4


def test_fsdp_in_one_process_matches_the_plain_loop(reference):
    result = fsdp_alone()
    assert losses(result) == pytest.approx(losses(reference[1]), abs=1e-5)


@pytest.mark.slow
def test_fsdp_trains_in_bf16_mixed():
    _, result = run(devices=WORLD, strategy="fsdp", precision="bf16-mixed", max_steps=6, lr=1e-2)
    assert result.precision.name == "bf16-mixed"
    assert all(map(torch.isfinite, torch.tensor(losses(result))))
    assert losses(result)[-1] < losses(result)[0] - 0.1


class OverflowOnce:
    """A loss_fn whose third call returns inf: in rank 1 only under two processes (found_inf must reach rank 0)."""

    def __init__(self, rank="0"):
        self.rank, self.calls = rank, 0

    def __call__(self, model, batch):
        self.calls += 1
        logits = model(batch[:, :-1])
        logits = logits[0] if isinstance(logits, tuple) else logits
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        planted = self.calls == 3 and os.environ.get("RANK", "0") == self.rank
        return loss * float("inf") if planted else loss


@pytest.mark.slow
def test_fp16_overflow_in_one_rank_skips_the_step_and_halves_the_scale_as_one_process_does():
    kw = dict(precision="16-mixed", max_steps=4, scaler_kwargs={"init_scale": 2.0**10})
    _, result = run(devices=WORLD, strategy="fsdp", loss_fn=OverflowOnce(rank="1"), **kw)
    _, expected = run(batch_size=B * WORLD, loss_fn=OverflowOnce(), **kw)
    assert [h["skipped"] for h in result.history] == [False, False, True, False]
    assert [h["loss_scale"] for h in result.history] == [h["loss_scale"] for h in expected.history]
    assert result.history[2]["loss_scale"] == 2.0**9
    assert (result.skipped_steps, result.final_loss_scale) == (expected.skipped_steps, expected.final_loss_scale)
    assert all(torch.isfinite(torch.tensor(losses(result)[3:])))  # the step after the skip trained on


def test_mixed_precision_policy_follows_the_plan():
    bf16 = mixed_precision_policy(resolve_precision("bf16-mixed", "cpu"))
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    fp16 = mixed_precision_policy(resolve_precision("16-mixed", "cpu"))
    assert (fp16.param_dtype, fp16.reduce_dtype) == (torch.float16, torch.float32)
    assert mixed_precision_policy(resolve_precision("32-true", "cpu")) is None
    assert mixed_precision_policy(resolve_precision("bf16-true", "cpu")) is None


def test_units_are_the_blocks_of_a_module_list():
    model = make_model()
    assert fsdp_units(model) == list(model.transformer.h)
    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))  # no ModuleList: the children with weights
    assert fsdp_units(plain) == [plain[0], plain[2]]


# ---- bad input: one message, before any process starts or any file is written ---------------------
def test_an_unknown_strategy_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=re.escape("train(strategy='zero3') is not allowed: use one of 'ddp', 'fsdp'.")):
        run(devices=WORLD, strategy="zero3", run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fsdp_for_a_model_with_nothing_to_shard_is_an_error(tmp_path):
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(256, 256))

        def forward(self, ids):
            return self.weight[ids]

    message = ("train(strategy='fsdp') is not allowed for Bare: it has no submodule with parameters to shard one "
               "by one (FSDP gathers one unit's weights at a time). Use strategy='ddp'")
    with pytest.raises(ValueError, match=re.escape(message)):
        train(Bare(), make_data(), devices=WORLD, strategy="fsdp", run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fsdp_with_an_optimizer_built_before_sharding_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match=re.escape("train(strategy='fsdp', optimizer=...) is not allowed")):
        train(model, make_data(), strategy="fsdp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def keep_lm_head_in_fp32():
    seen = {}
    model = make_model()
    for name in ("lm_head", "transformer.h.0.mlp.c_fc"):
        module = dict(model.named_modules())[name]
        module.register_forward_hook(  # the last call: a training step
            lambda m, a, out, name=name: seen.__setitem__(name, (m.weight.dtype, out.dtype)))
    result = train(model, make_data(), device="cpu", batch_size=B, max_steps=1, progress=False, strategy="fsdp",
                   precision="bf16-mixed", keep_fp32=["lm_head"])
    return seen, result


def test_keep_fp32_modules_compute_in_fp32_under_an_fsdp_bf16_policy():
    seen, result = launch(keep_lm_head_in_fp32, num_processes=1)
    assert seen["lm_head"] == (torch.float32, torch.float32)  # weights gathered in fp32, autocast off
    assert seen["transformer.h.0.mlp.c_fc"] == (torch.bfloat16, torch.bfloat16)  # the policy's bf16
    assert "lm_head" in result.precision.reason


# ---- sharded checkpoints (torch.distributed.checkpoint) ----------------------------------------------
def sharded_weights(run_dir):
    """The model a run folder's sharded checkpoint holds, read in this plain process (no group)."""
    head = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    model = make_model()
    state = model.state_dict()
    dcp.load({"model": state}, checkpoint_id=run_dir / "checkpoints" / head["sharded"])
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """Two FSDP processes, 4 of the 8 steps, into a run folder."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "half"
    run(devices=WORLD, strategy="fsdp", max_steps=4, run_dir=run_dir)
    return run_dir


@pytest.mark.slow
def test_the_run_folder_holds_a_head_and_one_shard_file_per_process(half):
    folder = half / "checkpoints"
    head = torch.load(folder / "latest.pt", weights_only=True)
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", head["sharded"]]
    assert sorted(p.name for p in (folder / head["sharded"]).iterdir()) == [".metadata", "__0_0.distcp",
                                                                            "__1_0.distcp"]
    assert (head["model"], head["world_size"], head["global_step"]) == ({}, WORLD, 4)  # no full gather


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_two_process_sharded_checkpoint_resumes_in_one_process_to_the_straight_runs_weights(
        half, reference, strategy, tmp_path):
    shutil.copytree(half, tmp_path / "run")
    if strategy == "fsdp":
        result = fsdp_alone(resume_from=tmp_path / "run", run_dir=tmp_path / "run")
        resumed = sharded_weights(tmp_path / "run")  # FSDP leaves the model sharded: read its checkpoint
    else:
        resumed, result = run(batch_size=B * WORLD, resume_from=tmp_path / "run", run_dir=tmp_path / "run")
    assert result.global_step == 8
    assert worst_difference(resumed, reference[0]) < 1e-4
    assert len(list((tmp_path / "run" / "checkpoints").glob("shards-*"))) == (strategy == "fsdp")


@pytest.mark.slow
def test_a_one_process_sharded_checkpoint_resumes_on_two_processes_to_the_straight_runs_weights(reference, tmp_path):
    fsdp_alone(max_steps=4, run_dir=tmp_path / "run")
    model, result = run(devices=WORLD, strategy="fsdp", resume_from=tmp_path / "run", run_dir=tmp_path / "run")
    assert result.global_step == 8
    assert worst_difference(model, reference[0]) < 1e-4
    assert worst_difference(sharded_weights(tmp_path / "run"), reference[0]) < 1e-4


@pytest.mark.slow
def test_missing_shards_are_an_error_naming_the_folder(half, tmp_path):
    shutil.copytree(half, tmp_path / "run")
    shards = next((tmp_path / "run" / "checkpoints").glob("shards-*"))
    (shards / ".metadata").unlink()
    message = (f"Checkpoint {str(tmp_path / 'run' / 'checkpoints' / 'latest.pt')!r} is damaged: its shards "
               f"{str(shards)!r} are missing or incomplete (no .metadata).")
    with pytest.raises(ValueError, match=re.escape(message)):
        run(batch_size=B * WORLD, resume_from=tmp_path / "run")


def test_a_full_checkpoint_resumed_with_fsdp_is_an_error_before_any_process_starts(tmp_path):
    run(batch_size=B, max_steps=2, run_dir=tmp_path / "run")
    message = "holds a full, unsharded state (written with strategy='ddp' or by one process); resuming it with "
    with pytest.raises(ValueError, match=re.escape(message)):
        run(devices=WORLD, strategy="fsdp", resume_from=tmp_path / "run", run_dir=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def logged_by_the_wandb_callback():
    """Each rank trains with the W&B callback (rank 0 alone runs it); what the stand-in run received."""
    import sys

    from utils.training import AmpWandbCallback

    run(strategy="fsdp", precision="16-mixed", max_steps=3, callbacks=[AmpWandbCallback(precision="16-mixed")])
    return sys.modules["wandb"].run.rows


@pytest.mark.slow
def test_the_wandb_callback_logs_the_loss_scale_of_an_fsdp_run(fake_wandb):
    rows = launch(logged_by_the_wandb_callback, num_processes=WORLD)
    scales = [row["amp/loss_scale"] for row, _ in rows if "amp/loss_scale" in row]
    assert scales and all(s == 2.0**16 for s in scales)  # no overflow in 3 steps at the default scale
    assert {step for _, step in rows if step is not None} >= {1, 2, 3}
