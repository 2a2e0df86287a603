"""train() under torchrun: two gloo processes on this CPU against one process with the doubled batch.

One torchrun launch (this file run as a script, see ``worker``) trains every case; the tests read
what it left behind and compare with one-process runs here. Unit tests of the sharding and the
resume rules need no processes.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from utils.models.examples import example_model
from utils.training import PrecisionWarning, train
from utils.training.batches import TensorBatches
from utils.training.parallel.distributed import ShardedTensorBatches, World, torchrun_command
from utils.training.runs import checkpoint as ckpt_io

ROOT = Path(__file__).resolve().parents[1]
B, T, WORLD = 4, 16, 2  # per-rank batch, sequence length, processes
CASES = {
    "equal": dict(max_steps=8),
    "half": dict(max_steps=4),  # resumed in one process by a test
    "accum": dict(max_steps=6, grad_accum_steps=2, n=40),  # 5 global batches an epoch: a short tail each epoch
    "bf16": dict(max_steps=6, precision="bf16-mixed", lr=1e-2),
}


def make_model():
    torch.manual_seed(0)  # ranks build the same weights; DDP would broadcast rank 0's anyway
    return example_model("gpt-micro", n_layer=1, n_embd=32, n_head=2, block_size=T)


def make_data(n=64):
    """Sequences counting upwards mod 256 from random starts: learnable in a few steps."""
    start = torch.randint(0, 256, (n, 1), generator=torch.Generator().manual_seed(3))
    return (start + torch.arange(T + 1)) % 256


def run_case(name, *, batch_size, **kw):
    """The case's train() call; the same in each rank and in the one-process reference."""
    case = dict(CASES[name])
    n = case.pop("n", 64)
    case.update(kw)
    case.setdefault("precision", "32-true")
    case.setdefault("progress", False)
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        result = train(model, make_data(n), device="cpu", batch_size=batch_size, lr=case.pop("lr", 3e-3),
                       log_every=1, **case)
    return model, result


class Recorder:
    """A callback that notes the hooks it saw, in ``path`` at the end (it must run on rank 0 only)."""

    def __init__(self, path):
        self.path, self.hooks = path, []

    def on_step_end(self, trainer, metrics):
        self.hooks.append("on_step_end")

    def on_train_end(self, trainer, result):
        Path(self.path).write_text(json.dumps(self.hooks + ["on_train_end"]))


def worker(out: Path) -> None:
    """Each torchrun process: train every case, then save what the tests compare (per rank)."""
    rank = int(os.environ["RANK"])
    saves = []
    real_save = ckpt_io.save_atomic
    ckpt_io.save_atomic = lambda obj, path: saves.append(str(path)) or real_save(obj, path)
    mine = out / "worker"
    mine.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        kw = {}
        if name in ("equal", "half"):
            kw["run_dir"] = out / name
        stderr = open(mine / f"stderr-{name}-rank{rank}.txt", "w")
        with stderr, contextlib.redirect_stderr(stderr):
            model, result = run_case(name, batch_size=B, progress=name == "equal",
                                     callbacks=[Recorder(mine / f"callbacks-{name}-rank{rank}.json")], **kw)
        torch.save({"params": model.state_dict(), "history": result.history,
                    "precision": result.precision.name, "checkpoint_path": result.checkpoint_path},
                   mine / f"{name}-rank{rank}.pt")
    (mine / f"saves-rank{rank}.json").write_text(json.dumps(saves))


# ---- the launch ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = torchrun_command([str(Path(__file__).resolve()), str(out)], nproc=WORLD)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s:\n{output[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{output[-4000:]}")
    return out


def saved(out, name, rank=0):
    return torch.load(out / "worker" / f"{name}-rank{rank}.pt", weights_only=True)


def assert_close(actual: dict, expected: dict, atol=1e-4):
    assert actual.keys() == expected.keys()
    worst = max((actual[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= atol, f"largest parameter difference {worst:.2e} > {atol}"


@pytest.fixture(scope="module")
def reference():
    """One process, batch B × WORLD: what the two ranks together must reproduce."""
    model, result = run_case("equal", batch_size=B * WORLD)
    return model.state_dict(), result


# ---- two processes -------------------------------------------------------------------------------
def test_two_processes_match_one_process_with_the_doubled_batch(ddp, reference):
    assert_close(saved(ddp, "equal")["params"], reference[0])


def test_both_ranks_end_with_the_same_weights(ddp):
    assert_close(saved(ddp, "equal", 1)["params"], saved(ddp, "equal", 0)["params"], atol=0.0)


def test_logged_loss_is_the_mean_over_ranks(ddp, reference):
    losses = [h["loss"] for h in saved(ddp, "equal", 1)["history"]]
    assert losses == pytest.approx([h["loss"] for h in reference[1].history], abs=1e-5)


def test_accumulation_with_a_short_tail_matches_one_process(ddp):
    model, _ = run_case("accum", batch_size=B * WORLD)
    assert_close(saved(ddp, "accum")["params"], model.state_dict())


def test_checkpoint_holds_the_unwrapped_model_and_the_world_size(ddp):
    _, state = ckpt_io.load_checkpoint(ddp / "equal")
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["world_size"] == WORLD


def test_ddp_checkpoint_resumes_in_one_process(ddp, reference):
    model, result = run_case("equal", batch_size=B * WORLD, resume_from=ddp / "half")
    assert result.global_step == 8
    assert_close(model.state_dict(), reference[0])


def test_resume_with_another_global_batch_is_an_error_naming_the_fix(ddp):
    message = (f"was trained with a global batch of {B * WORLD} (batch_size={B} × {WORLD} process(es)), "
               f"but this run's is {B} (batch_size={B} × 1 process(es)); the data position would not "
               f"match. Pass batch_size={B * WORLD}.")
    with pytest.raises(ValueError, match=re.escape(message)):
        run_case("equal", batch_size=B, resume_from=ddp / "half")


def test_bf16_mixed_trains_under_ddp(ddp):
    run = saved(ddp, "bf16")
    losses = [h["loss"] for h in run["history"]]
    assert run["precision"] == "bf16-mixed"
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1


def test_rank_zero_alone_wrote_the_checkpoints(ddp):
    saves = {r: json.loads((ddp / "worker" / f"saves-rank{r}.json").read_text()) for r in range(WORLD)}
    assert saves[1] == [] and saves[0]
    assert saved(ddp, "equal", 1)["checkpoint_path"] == str(ddp / "equal" / "checkpoints" / "latest.pt")


def test_rank_zero_alone_wrote_metrics_once_per_step(ddp, reference):
    lines = [json.loads(x) for x in (ddp / "equal" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if r["type"] == "step"]
    assert steps == [h["step"] for h in reference[1].history]


def test_rank_zero_alone_ran_callbacks_and_showed_progress(ddp):
    mine = ddp / "worker"
    hooks = json.loads((mine / "callbacks-equal-rank0.json").read_text())
    assert hooks.count("on_step_end") == 8
    assert not (mine / "callbacks-equal-rank1.json").exists()
    assert "train [32-true]" in (mine / "stderr-equal-rank0.txt").read_text()
    assert (mine / "stderr-equal-rank1.txt").read_text() == ""


# ---- no processes needed -------------------------------------------------------------------------
def test_shards_put_together_are_the_global_batches_of_each_epoch():
    data = torch.arange(40 * 3).view(40, 3)
    full = TensorBatches(data, batch_size=8, seed=5)
    shards = [ShardedTensorBatches(TensorBatches(data, 4, 5), r, 2) for r in range(2)]
    for epoch, start in ((0, 0), (1, 0), (1, 3)):
        together = [torch.cat(pair) for pair in zip(*(s.epoch(epoch, start) for s in shards))]
        expected = list(full.epoch(epoch, start))
        assert len(together) == len(expected) == 5 - start
        assert all(torch.equal(a, b) for a, b in zip(together, expected))


def test_fewer_samples_than_one_global_batch_is_an_error():
    message = "train_data has 6 samples, fewer than one global batch of batch_size=4 per process × 2 processes = 8."
    with pytest.raises(ValueError, match=re.escape(message)):
        ShardedTensorBatches(TensorBatches(torch.zeros(6, 3, dtype=torch.long), 4, 0), 0, 2)


def test_plain_process_is_rank_zero_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert World.detect() == World(rank=0, world_size=1, local_rank=0)


def test_torchrun_environment_is_read(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = World.detect()
    assert (world.rank, world.world_size, world.is_rank_zero) == (1, 2, False)


def test_half_a_torchrun_environment_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ValueError, match=re.escape("This process has RANK='0': torchrun sets RANK, WORLD_SIZE and LOCAL_RANK")):
        World.detect()


def test_dataloader_without_distributed_sampler_warns():
    loader = DataLoader(TensorDataset(torch.zeros(8, 3)), batch_size=2)
    with pytest.warns(UserWarning, match=re.escape("train_data is a DataLoader without a DistributedSampler: each of the 2 processes")):
        assert World(0, 2).shard(loader) is loader


def test_dataloader_checkpoint_on_another_world_size_is_an_error():
    state = {"args": {"batch_size": 4}, "world_size": 2}
    with pytest.raises(ValueError, match=re.escape("'c.pt' was trained by 2 process(es), this run has 4: only tensor data")):
        ckpt_io.check_world("c.pt", state, batch_size=2, world_size=4, tensor_data=False)


if __name__ == "__main__":  # run by torchrun from the `ddp` fixture
    worker(Path(sys.argv[1]))
