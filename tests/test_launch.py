"""launch() and train(devices=N): processes forked from this one (as from a notebook kernel), gloo on this CPU."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from tests.test_ddp import WORLD, B, make_data, make_model
from utils.training import train
from utils.training.parallel import launch as launching
from utils.training.parallel.launch import WorkerError, launch


def run(devices=None, batch_size=B, **kw):
    model = make_model()
    result = train(model, make_data(), device="cpu", batch_size=batch_size, lr=3e-3, log_every=1, max_steps=8,
                   precision="32-true", devices=devices, **kw)
    return model, result


def rank_and_world():
    dist.init_process_group("gloo")
    try:
        total = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(total)
        return dist.get_rank(), dist.get_world_size(), total.item(), os.getpid()
    finally:
        dist.destroy_process_group()


def fails_in_rank_one():
    if os.environ["RANK"] == "1":
        raise ArithmeticError("planted in rank 1")
    return "rank 0 done"


def sleeps():
    time.sleep(120)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_train_on_two_devices_matches_one_process_with_the_doubled_batch_and_fills_the_model(tmp_path, capsys):
    model, result = run(devices=WORLD, run_dir=tmp_path / "run")
    reference, expected = run(batch_size=B * WORLD, progress=False)
    worst = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(),
                                                           reference.state_dict().values()))
    assert worst < 1e-4  # the weights trained in the processes are back in this process's model
    assert [h["loss"] for h in result.history] == pytest.approx([h["loss"] for h in expected.history], abs=1e-5)
    assert result.checkpoint_path == str(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert "train [32-true]" in capsys.readouterr().err  # rank 0's bar, drawn by this process


def test_launch_returns_rank_zeros_result_from_a_joined_group():
    rank, world, total, pid = launch(rank_and_world, num_processes=2)
    assert (rank, world, total) == (0, 2, 1.0)  # 0 + 1 summed over the two ranks
    assert pid != os.getpid() and not alive_child(pid)


def alive_child(pid):
    return any(p.pid == pid for p in launching.mp.active_children())


def test_a_workers_exception_names_its_rank_and_traceback():
    with pytest.raises(WorkerError, match=re.escape("rank 1 failed:\nTraceback")) as info:
        launch(fails_in_rank_one, num_processes=2)
    assert info.value.rank == 1
    assert "ArithmeticError: planted in rank 1" in str(info.value)
    assert "fails_in_rank_one" in str(info.value)


def test_an_interrupted_launch_leaves_no_process_behind(monkeypatch):
    monkeypatch.setattr(launching, "GRACE_S", 0.5)
    started = []
    real_start = launching.mp.get_context("fork").Process.start

    def note(self):
        real_start(self)
        started.append(self.pid)

    monkeypatch.setattr(launching.mp.get_context("fork").Process, "start", note)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # the kernel's "interrupt"
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch(sleeps, num_processes=2)
    finally:
        timer.cancel()
    assert len(started) == 2 and not any(map(alive, started))


def test_a_process_that_dies_is_named(monkeypatch):
    def dies():
        if os.environ["RANK"] == "1":
            os._exit(3)
        return 1

    with pytest.raises(WorkerError, match=re.escape("rank 1 exited with code 3 without a result")):
        launch(dies, num_processes=2)


def test_a_parent_that_ran_openmp_threads_can_still_launch(tmp_path):
    """GNU OpenMP's thread pool does not survive a fork; a kernel has always run some ops before."""
    script = tmp_path / "after_openmp.py"
    script.write_text(
        "import torch\nfrom utils.training.parallel.launch import launch\ntorch.set_num_threads(2)\n"
        "torch.nn.functional.layer_norm(torch.randn(64, 2000), (2000,))  # the parent's thread team exists\n"
        "def norm():\n    return float(torch.nn.functional.layer_norm(torch.ones(64, 2000), (2000,)).sum())\n"
        "print(launch(norm, num_processes=2))\n")
    root = launching.__file__.rsplit("/utils/", 1)[0]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "0.0\n"


# ---- bad input: one message, before any process starts -------------------------------------------
def test_launch_after_cuda_was_initialised_says_restart_the_kernel(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    message = ("train(devices=2) is not allowed after CUDA was initialised in this kernel: forked processes "
               "cannot use it. Restart the kernel and run the launch before any cell that touches the GPU")
    with pytest.raises(ValueError, match=re.escape(message)):
        run(devices=2, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_more_devices_than_the_machine_has_is_an_error(tmp_path):
    n = (os.cpu_count() or 1) + 1
    message = (f"train(devices={n}) is not allowed: this machine has no GPU and {os.cpu_count()} CPU core(s); "
               f"use at most that many gloo processes.")
    with pytest.raises(ValueError, match=re.escape(message)):
        run(devices=n, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("devices", [0, -1, 1.5, True, "2"])
def test_devices_must_be_a_positive_integer(devices):
    with pytest.raises(ValueError, match=re.escape(f"train(devices={devices!r}) is not allowed: it must be an "
                                                   f"integer >= 1.")):
        run(devices=devices)


def test_launch_inside_a_launched_process_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=re.escape("launch(num_processes=2) is not allowed in a process that is "
                                                   "already one of several (RANK='0')")):
        launch(sleeps, num_processes=2)
