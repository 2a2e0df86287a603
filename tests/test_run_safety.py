"""Never lose a run (issue 18): finite checkpoints, survivable stops, no silent overwrite, torn
metrics lines, full disks, failing W&B, verified checkpoints and bad data past the first batch."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from utils.training import PrecisionWarning, train
from utils.training.amp.precision import resolve_precision
from utils.training.cli import exit_status, train_summary
from utils.training.loop.guards import StepChecks, all_finite
from utils.training.parallel.distributed import World
from utils.training.runs import checkpoint as ckpt_io
from utils.training.runs.checkpoint import CheckpointWriteError, load_checkpoint
from utils.training.runs.curves import read_metrics
from utils.training.runs.metrics_log import repair

ROOT = Path(__file__).resolve().parents[1]
V, T = 64, 16


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, 16), nn.Linear(16, V)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def data(n=64, seed=1):
    return torch.randint(0, V, (n, T + 1), generator=torch.Generator().manual_seed(seed))


def run(model, train_data, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("precision", "32-true")
    kw.setdefault("batch_size", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        return train(model, train_data, **kw)


def lm_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


class NanGrad(torch.autograd.Function):
    """Finite in the forward pass, NaN in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


# ---- 1. only finite state is saved ------------------------------------------------------------

def test_finite_loss_with_nan_gradients_stops_and_keeps_the_good_checkpoint(tmp_path):
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        loss = lm_loss(model, batch)
        return loss + NanGrad.apply(model.head.weight.sum()) if len(calls) == 4 else loss

    with pytest.raises(FloatingPointError, match=re.escape(
            "The loss became non-finite at step 4 in 32-true.")) as info:
        run(tiny(), data(), max_steps=10, loss_fn=poisoned, log_every=1, checkpoint_every=2, run_dir=tmp_path)
    assert f"The last good checkpoint is {tmp_path / 'checkpoints' / 'latest.pt'} (step 2)." in str(info.value)
    _, state = load_checkpoint(tmp_path)
    assert state["global_step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_non_finite_weights_are_never_saved(tmp_path):
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    calls = []

    def poisoning(model, batch):  # a finite loss and gradients; Adam's state goes inf during step 4
        calls.append(1)
        loss = lm_loss(model, batch)
        if len(calls) == 4:
            next(iter(optimizer.state.values()))["exp_avg"].fill_(float("inf"))
        return loss

    with pytest.raises(FloatingPointError, match=re.escape(
            "The weights or optimizer state are not finite at step 4 in 32-true: not saved. The last good "
            f"checkpoint is {tmp_path / 'checkpoints' / 'latest.pt'} (step 2).")):
        run(model, data(), max_steps=10, log_every=10, checkpoint_every=2, loss_fn=poisoning, optimizer=optimizer,
            run_dir=tmp_path)
    assert load_checkpoint(tmp_path)[1]["global_step"] == 2


def test_a_non_finite_step_not_yet_logged_is_never_saved(tmp_path):
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        return lm_loss(model, batch) * (float("nan") if len(calls) == 3 else 1.0)

    with pytest.raises(FloatingPointError, match=re.escape("The loss became non-finite at step 3 in 32-true.")):
        run(tiny(), data(), max_steps=10, log_every=10, checkpoint_every=2, loss_fn=poisoned, run_dir=tmp_path)
    assert load_checkpoint(tmp_path)[1]["global_step"] == 2


def test_all_finite_sees_one_nan_among_many_tensors():
    tensors = [torch.ones(5), torch.ones(3, dtype=torch.bfloat16), torch.ones(2)]
    assert all_finite(tensors)
    tensors[2][1] = float("nan")
    assert not all_finite(tensors)
    assert all_finite([torch.full((4,), 6e4, dtype=torch.float16)])  # large but finite: no overflow


def test_checkpoint_minutes_saves_when_that_much_time_passed_since_the_last_save(tmp_path, monkeypatch):
    clock = [0.0]  # the Checkpointer's clock, moved 4 minutes by each logged step: no real waiting
    monkeypatch.setattr(ckpt_io, "time", types.SimpleNamespace(monotonic=lambda: clock[0], strftime=time.strftime))
    saved, save = [], ckpt_io.Checkpointer.save

    def recording_save(self, state, best=False):
        saved.append(state["global_step"])
        save(self, state, best)

    monkeypatch.setattr(ckpt_io.Checkpointer, "save", recording_save)

    class FourMinutesAStep:
        def on_step_end(self, trainer, metrics):
            clock[0] += 240.0

    run(tiny(), data(), max_steps=8, log_every=1, checkpoint_minutes=10, run_dir=tmp_path,
        callbacks=[FourMinutesAStep()])
    # 12 min at step 3: saved, and the 10 minutes count again from there (step 6); step 8 is the end
    assert saved == [3, 6, 8]


def test_checkpoint_minutes_is_read_at_log_steps_only(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(ckpt_io, "time", types.SimpleNamespace(monotonic=lambda: clock[0], strftime=time.strftime))
    saved, save = [], ckpt_io.Checkpointer.save
    monkeypatch.setattr(ckpt_io.Checkpointer, "save",
                        lambda self, state, best=False: (saved.append(state["global_step"]), save(self, state, best)))

    def one_minute_a_step(model, batch):
        clock[0] += 60.0
        return lm_loss(model, batch)

    run(tiny(), data(), max_steps=7, log_every=3, checkpoint_minutes=2, loss_fn=one_minute_a_step, run_dir=tmp_path)
    assert saved == [3, 6, 7]  # 2 minutes passed at step 2, but the first log step after it is step 3


def test_a_16_mixed_run_whose_every_step_is_skipped_ends_with_an_error():
    def overflowing(model, batch):
        return lm_loss(model, batch) * float("inf")

    # The scale halves from 2**16 on each skipped step: under 2**-24 after 41 of them.
    with pytest.raises(FloatingPointError, match=re.escape(
            "No progress: the last 41 steps (to step 41) were all skipped for inf/NaN gradients in 16-mixed")):
        run(tiny(), data(256), precision="16-mixed", device="cpu", max_steps=200, batch_size=4,
            loss_fn=overflowing, log_every=50)


def test_fifty_skipped_steps_in_a_row_end_the_run_while_the_scale_is_still_high():
    checks = StepChecks(tiny(), resolve_precision("32-true", "cpu"))
    for step in range(1, 50):  # 49 in a row, then one step that went through: the count starts again
        checks.observe_skip(True, 1024.0, step)
    checks.observe_skip(False, 1024.0, 50)
    for step in range(51, 100):
        checks.observe_skip(True, 1024.0, step)
    with pytest.raises(FloatingPointError, match=re.escape(
            "No progress: the last 50 steps (to step 100) were all skipped for inf/NaN gradients in 32-true, "
            "and the loss scale fell to 1024.")):
        checks.observe_skip(True, 1024.0, 100)


# ---- 2. stops are survivable ------------------------------------------------------------------

def popen_cli(args, run_dir: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "utils.training", "train", "--model", "example:gpt-micro", "--model-config",
           '{"n_layer": 1, "n_embd": 32}', "--context", "32", "--batch-size", "4", "--log-every", "1",
           "--no-progress", "--max-steps", "100000", "--run-dir", str(run_dir), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_steps(run_dir: Path, proc, n: int = 1, timeout: float = 120) -> None:
    metrics, t0 = run_dir / "metrics.jsonl", time.monotonic()
    while not (metrics.is_file() and metrics.read_text().count('"type": "step"') >= n):
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no metrics line appeared: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)


def adam_steps(state) -> set:
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_cli_at_a_step_boundary_with_a_checkpoint(tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = popen_cli([], run_dir)
    wait_for_steps(run_dir, proc, 2)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    _, state = load_checkpoint(run_dir)
    step = state["global_step"]
    assert f"interrupted ({sig.name}) at step {step} " in out
    assert f"saved          checkpoint of step {step}: " in out
    assert adam_steps(state) == {step}  # the optimizer's counter is the checkpoint's: no half-saved step
    assert "Traceback" not in err
    assert not list((run_dir / "checkpoints").glob(".latest.pt.*"))


def summary_of(result, run_dir) -> str:
    return train_summary(result, {"model": "tiny", "batch_size": 8, "run_dir": str(run_dir)}, World())


def test_a_second_interrupt_mid_step_stops_at_once_and_saves_no_half_step(tmp_path):
    """Both signals arrive at a known point (step 4's forward), in this process: no timing involved."""
    calls = []

    def interrupted_twice(model, batch):
        calls.append(1)
        if len(calls) == 4:  # the first asks for a stop after this step; the second stops now
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return lm_loss(model, batch)

    result = run(tiny(), data(), max_steps=10, log_every=1, checkpoint_every=2, loss_fn=interrupted_twice,
                 run_dir=tmp_path)
    assert result.interrupted and result.stopped_by == "SIGINT"
    assert (result.global_step, result.checkpoint_step) == (3, 2)  # step 4 never applied, step 3 not saved
    state = load_checkpoint(tmp_path)[1]
    assert state["global_step"] == 2 and adam_steps(state) == {2}
    assert exit_status(result) == 1
    assert "NO new checkpoint (stopped mid-step); the last is the checkpoint of step 2" in summary_of(result, tmp_path)


def test_a_second_interrupt_during_a_save_lets_the_save_finish(tmp_path, monkeypatch):
    writes, save_atomic = [], ckpt_io.save_atomic

    def interrupted_save(state, path):
        writes.append(state["global_step"])
        if len(writes) == 1:
            signal.raise_signal(signal.SIGINT)  # the second signal, while the first checkpoint is being written
        save_atomic(state, path)

    monkeypatch.setattr(ckpt_io, "save_atomic", interrupted_save)

    class FirstSignal:
        def on_step_end(self, trainer, metrics):
            if trainer.global_step == 2:
                signal.raise_signal(signal.SIGINT)

    result = run(tiny(), data(), max_steps=10, log_every=1, checkpoint_every=2, run_dir=tmp_path,
                 callbacks=[FirstSignal()])
    assert result.interrupted and (result.global_step, result.checkpoint_step) == (2, 2)
    assert writes == [2]  # written once, whole: not cut short by the second signal and written again
    assert adam_steps(load_checkpoint(tmp_path)[1]) == {2}
    assert not list((tmp_path / "checkpoints").glob(".latest.pt.*"))
    assert exit_status(result) == 130
    assert f"saved          checkpoint of step 2: {tmp_path / 'checkpoints' / 'latest.pt'}" in summary_of(result, tmp_path)


def test_stale_temp_files_are_swept_on_the_next_start(tmp_path):
    run(tiny(), data(), max_steps=2, run_dir=tmp_path)
    stale = tmp_path / "checkpoints" / ".latest.pt.k1ll3d"
    stale.write_bytes(b"x" * 100)
    run(tiny(), data(), max_steps=4, run_dir=tmp_path, resume_from=tmp_path)
    assert not stale.exists()


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_run_safety import tiny, data, run
resume = sys.argv[2] == "resume"
run(tiny(), data(), max_steps=40, log_every=1, checkpoint_every=3, run_dir=sys.argv[1],
    resume_from=sys.argv[1] if resume else None)
"""


def _run_script(script: Path, run_dir: Path, mode: str):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(run_dir), mode], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_random_kill_9s_lose_nothing_beyond_the_last_checkpoint(tmp_path):
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT.format(tests=str(ROOT / "tests")))
    straight = tmp_path / "straight"
    assert _run_script(script, straight, "fresh").wait(timeout=180) == 0
    want = torch.load(straight / "checkpoints" / "latest.pt", weights_only=True)
    want_steps = [r["step"] for r in read_metrics(straight)[0]]
    rng = torch.Generator().manual_seed(18)
    survived = 0
    for i in range(3):
        run_dir = tmp_path / f"killed{i}"
        proc = _run_script(script, run_dir, "fresh")
        wait_for_steps(run_dir, proc, 1)
        time.sleep(float(torch.rand((), generator=rng)) * 0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = False
        if (run_dir / "checkpoints" / "latest.pt").is_file():
            state = load_checkpoint(run_dir)[1]
            step = state["global_step"]
            # a fast run may have finished (its last step and final validation saved) before the kill:
            # resuming it is then an error (nothing to train), and there is nothing to lose
            finished = step == 40 and any(e.get("step") == 40 for e in state["epochs"])
            assert step % 3 == 0 or step % 8 == 0  # every 3 steps or at an epoch end (8 steps), whole
            mode = "resume"
        else:
            ckpt_io.claim_run_dir(run_dir, overwrite=True)  # killed before its first checkpoint
            mode = "fresh"
        if not finished:
            assert _run_script(script, run_dir, mode).wait(timeout=180) == 0
        got = load_checkpoint(run_dir)[1]
        assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
        assert [r["step"] for r in read_metrics(run_dir)[0]] == want_steps  # no step twice, none missing
        survived += 1
    assert survived == 3


# ---- 3. no silent overwrite -------------------------------------------------------------------

def test_a_fresh_run_into_a_folder_that_holds_a_run_is_an_error(tmp_path):
    run(tiny(), data(), max_steps=2, run_dir=tmp_path)
    before = (tmp_path / "checkpoints" / "latest.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=re.escape(
            f"run_dir={str(tmp_path)!r} already holds a run (checkpoints/latest.pt or metrics.jsonl). Continue it "
            f"with resume_from={str(tmp_path)!r} (CLI: --resume), pick a new folder, or pass overwrite=True")):
        run(tiny(), data(), max_steps=2, run_dir=tmp_path)
    assert ((tmp_path / "checkpoints" / "latest.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_text()) == before


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run(tiny(), data(), max_steps=2, log_every=1, run_dir=tmp_path)
    run(tiny(), data(), max_steps=3, log_every=1, run_dir=tmp_path, overwrite=True)
    (archive,) = tmp_path.glob("replaced-*")
    assert [r["step"] for r in read_metrics(archive)[0]] == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path)[0]] == [1, 2, 3]
    assert load_checkpoint(archive)[1]["global_step"] == 2


def test_cli_refuses_a_second_fresh_run_into_the_same_folder(tmp_path, capsys):
    from utils.training import cli

    args = ["train", "--model", "example:gpt-micro", "--model-config", '{"n_layer": 1, "n_embd": 32}',
            "--context", "32", "--max-steps", "1", "--no-progress", "--run-dir", str(tmp_path)]
    assert cli.main(args) == 0
    command = (tmp_path / "command.json").read_text()
    assert cli.main(args) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "command.json").read_text() == command  # nothing written by the refused call
    assert cli.main([*args, "--overwrite"]) == 0
    assert len(list(tmp_path.glob("replaced-*/command.json"))) == 1


def files_of(folder: Path) -> dict:
    return {f: f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def test_resuming_into_another_folder_that_holds_a_run_is_an_error_that_writes_nothing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny(), data(), max_steps=2, log_every=1, run_dir=a)
    run(tiny(seed=1), data(), max_steps=3, log_every=1, run_dir=b)
    before = files_of(a), files_of(b)
    with pytest.raises(ValueError, match=re.escape(f"run_dir={str(b)!r} already holds a run")):
        run(tiny(), data(), max_steps=4, log_every=1, run_dir=b, resume_from=a)
    assert (files_of(a), files_of(b)) == before


@pytest.mark.parametrize("name, then, now", [("seed", 0, 1), ("grad_accum_steps", 1, 2)])
def test_resuming_with_another_seed_or_accumulation_is_an_error_that_writes_nothing(tmp_path, name, then, now):
    run(tiny(), data(), max_steps=2, run_dir=tmp_path, **{name: then})
    before = files_of(tmp_path)
    latest = tmp_path / "checkpoints" / "latest.pt"
    with pytest.raises(ValueError, match=re.escape(
            f"Checkpoint {str(latest)!r} was trained with {name}={then}, but this call has {name}={now}; the "
            f"data position would not match. Pass {name}={then}.")):
        run(tiny(), data(), max_steps=4, run_dir=tmp_path, resume_from=tmp_path, **{name: now})
    assert files_of(tmp_path) == before


# ---- 4. metrics files -------------------------------------------------------------------------

def test_a_torn_last_line_is_tolerated_by_the_reader_and_repaired_on_resume(tmp_path):
    run(tiny(), data(), max_steps=4, log_every=1, run_dir=tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"type": "step", "st')
    with pytest.warns(RuntimeWarning, match=re.escape(f"{metrics}: its last line is incomplete")):
        steps, _ = read_metrics(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    with pytest.warns(RuntimeWarning, match=re.escape(f"{metrics}: its last line was incomplete")):
        run(tiny(), data(), max_steps=6, log_every=1, run_dir=tmp_path, resume_from=tmp_path)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "step"] == [1, 2, 3, 4, 5, 6]


RECORDS = b'{"type": "step", "step": 1}\n{"type": "step", "step": 2}\n{"type": "epoch", "step": 2}\n'


def test_repair_cuts_a_torn_last_line_and_nothing_else(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(RECORDS + b'{"type": "step", "st')
    with pytest.warns(RuntimeWarning, match=re.escape(f"{path}: its last line was incomplete")):
        assert repair(path) == len(b'{"type": "step", "st')
    assert path.read_bytes() == RECORDS


def test_repair_keeps_a_whole_last_record_whose_newline_is_missing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(RECORDS + b'{"type": "step", "step": 3}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was lost: no warning
        assert repair(path) == 0
    assert path.read_bytes() == RECORDS + b'{"type": "step", "step": 3}\n'


def test_repair_on_resume_keeps_the_records_the_checkpoint_knows_then_cuts_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(RECORDS + b'{"ty')
    with pytest.warns(RuntimeWarning, match="its last line was incomplete"):
        repair(path, keep=2)
    assert path.read_bytes() == RECORDS.split(b"\n", 2)[0] + b"\n" + RECORDS.split(b"\n", 2)[1] + b"\n"
    path.write_bytes(RECORDS + b'{"ty')
    with pytest.warns(RuntimeWarning, match="its last line was incomplete"):
        repair(path, keep=3)  # every whole record known: only the torn line goes
    assert path.read_bytes() == RECORDS


def test_records_written_after_the_last_checkpoint_are_not_duplicated_on_resume(tmp_path):
    class Kill:  # dies after step 5's record; the last checkpoint holds step 4
        def on_step_end(self, trainer, metrics):
            if trainer.global_step == 5:
                raise SystemExit

    with pytest.raises(SystemExit):
        run(tiny(), data(), max_steps=8, log_every=1, checkpoint_every=4, run_dir=tmp_path, callbacks=[Kill()])
    assert load_checkpoint(tmp_path)[1]["global_step"] == 4
    run(tiny(), data(), max_steps=8, log_every=1, run_dir=tmp_path, resume_from=tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)[0]] == list(range(1, 9))


def test_a_run_stopped_before_its_final_validation_gets_it_on_resume(tmp_path):
    class StopAtTheEnd:
        def on_step_end(self, trainer, metrics):
            if trainer.global_step == 4:
                raise KeyboardInterrupt  # after the last step, before the final validation

    first = run(tiny(), data(), val_data=data(16, seed=2), max_steps=4, log_every=1, run_dir=tmp_path,
                callbacks=[StopAtTheEnd()])
    assert first.interrupted and first.epochs == [] and first.checkpoint_step == 4
    again = run(tiny(), data(), val_data=data(16, seed=2), max_steps=4, run_dir=tmp_path, resume_from=tmp_path)
    assert [e["step"] for e in again.epochs] == [4] and again.epochs[0]["val_loss"] > 0
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    assert [e["step"] for e in read_metrics(tmp_path)[1]] == [4]


# ---- 5. disk and W&B faults -------------------------------------------------------------------

class FullDisk:
    """A file object that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run(tiny(), data(), max_steps=2, run_dir=tmp_path)
    latest = tmp_path / "checkpoints" / "latest.pt"
    before = latest.read_bytes()
    real = os.fdopen
    monkeypatch.setattr(ckpt_io.os, "fdopen", lambda fd, mode: FullDisk(real(fd, mode), 5000))
    with pytest.raises(CheckpointWriteError, match=re.escape(
            f"Cannot write the checkpoint {str(latest)!r}: No space left on device (ENOSPC). Free space or pick "
            f"a writable run_dir; the previous checkpoint is intact.")):
        run(tiny(), data(), max_steps=4, run_dir=tmp_path, resume_from=tmp_path)
    assert latest.read_bytes() == before
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest.pt"]


def test_a_full_disk_during_a_metrics_write_names_the_file_and_leaves_no_partial_line(tmp_path, monkeypatch):
    from utils.training.runs import metrics_log

    run(tiny(), data(), max_steps=2, log_every=1, run_dir=tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    before = metrics.read_text()
    real = open

    def full_open(path, mode="r", *a, **kw):
        f = real(path, mode, *a, **kw)
        return FullDisk(f, 0) if str(path) == str(metrics) and "a" in mode else f

    monkeypatch.setattr(metrics_log, "open", full_open, raising=False)
    with pytest.raises(CheckpointWriteError, match=re.escape(
            f"Cannot write the metrics file {str(metrics)!r}: No space left on device (ENOSPC).")):
        run(tiny(), data(), max_steps=4, log_every=1, run_dir=tmp_path, resume_from=tmp_path)
    assert metrics.read_text() == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_one_message_naming_the_file(tmp_path):
    run(tiny(), data(), max_steps=2, run_dir=tmp_path)
    folder = tmp_path / "checkpoints"
    folder.chmod(0o500)
    try:
        with pytest.raises(CheckpointWriteError, match=r"Permission denied \(EACCES\)"):
            run(tiny(), data(), max_steps=4, run_dir=tmp_path, resume_from=tmp_path)
    finally:
        folder.chmod(0o700)


def test_a_folder_that_refuses_new_files_is_one_message_naming_the_file(tmp_path, monkeypatch):
    run(tiny(), data(), max_steps=2, run_dir=tmp_path)
    latest = tmp_path / "checkpoints" / "latest.pt"
    before = latest.read_bytes()

    def refuse(*args, **kwargs):  # what a read-only folder does, also for root (who ignores chmod)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(ckpt_io.tempfile, "mkstemp", refuse)
    with pytest.raises(CheckpointWriteError, match=re.escape(
            f"Cannot write the checkpoint {str(latest)!r}: Permission denied (EACCES).")):
        run(tiny(), data(), max_steps=4, run_dir=tmp_path, resume_from=tmp_path)
    assert latest.read_bytes() == before


def test_any_wandb_failure_at_init_disables_wandb_with_one_warning(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from utils.training.wandb_log.session import WandbWarning, init_wandb

    def broken(**kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "wandb"))

    monkeypatch.setattr(wandb, "init", broken)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.warns(WandbWarning) as caught:
        session = init_wandb("amp-tests", run_dir=tmp_path)
    assert session.mode == "disabled" and session.run is None
    assert [str(w.message) for w in caught] == [
        f"W&B: disabled (W&B failed to start: PermissionError: [Errno 13] Permission denied: "
        f"'{tmp_path / 'wandb'}'). Metrics are kept locally only in {tmp_path / 'metrics.jsonl'}."]
    result = run(tiny(), data(), max_steps=2, run_dir=tmp_path)  # training goes on
    assert result.global_step == 2


# ---- 6. checkpoints verified on load ----------------------------------------------------------

def test_flipped_bytes_in_tensor_data_fail_the_crc_check(tmp_path):
    run(tiny(), data(), max_steps=2, run_dir=tmp_path)
    path = tmp_path / "checkpoints" / "latest.pt"
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor's bytes
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=re.escape(
            f"Checkpoint {str(path)!r} cannot be read; it is truncated or corrupt (CRC mismatch in {info.filename!r}).")):
        load_checkpoint(path)


@pytest.mark.parametrize("damage, problem", [
    (lambda s: s["position"].pop("batch"), "position.batch is missing"),
    (lambda s: s["rng"].__setitem__("torch", torch.zeros(3)), "rng.torch is a torch.float32 tensor, expected torch.uint8"),
    (lambda s: s["optimizer"].__setitem__("state", []), "optimizer.state is a list, expected dict"),
    (lambda s: s.__setitem__("global_step", "7"), "global_step is a str, expected int"),
    (lambda s: s["model"].__setitem__("head.bias", 3), "model['head.bias'] is a int, expected a tensor"),
])
def test_damaged_nested_fields_are_one_named_error(tmp_path, damage, problem):
    run(tiny(), data(), max_steps=2, run_dir=tmp_path)
    path = tmp_path / "checkpoints" / "latest.pt"
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    with pytest.raises(ValueError, match=re.escape(f"Checkpoint {str(path)!r} is damaged: ")) as info:
        run(tiny(), data(), max_steps=4, resume_from=tmp_path)
    assert problem in str(info.value)


def test_resuming_16_mixed_in_32_true_says_the_scaler_state_is_dropped(tmp_path):
    run(tiny(), data(), precision="16-mixed", device="cpu", max_steps=2, run_dir=tmp_path)
    with pytest.warns(PrecisionWarning, match=re.escape(
            "was trained in precision='16-mixed'; resuming in '32-true': its GradScaler state is dropped.")):
        result = train(tiny(), data(), precision="32-true", device="cpu", max_steps=3, batch_size=8,
                       resume_from=tmp_path, progress=False)
    assert result.global_step == 3 and result.final_loss_scale is None


def test_resuming_in_a_precision_that_changes_the_weights_dtype_is_an_error(tmp_path):
    run(tiny(), data(), max_steps=2, run_dir=tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            "was trained in precision='32-true' (weights in torch.float32), this run asks for 'bf16-true' "
            "(weights in torch.bfloat16): resuming would change the weights' dtype. Pass precision='32-true'.")):
        run(tiny(), data(), precision="bf16-true", device="cpu", max_steps=3, resume_from=tmp_path)


# ---- 7. data checked everywhere ---------------------------------------------------------------

def test_a_bad_token_id_past_the_first_batch_is_named():
    bad = data()
    bad[:, 3] = V + 5  # in every row: whichever batch comes first after step 1 holds it
    batches = [data(8), data(8, seed=5), bad[:8]]
    with pytest.raises(ValueError, match=re.escape(f"train_data holds token id {V + 5}, outside the model's "
                                                   f"vocabulary") + r".*Found in the batch of step 3\."):
        run(tiny(), batches, max_steps=3)


@pytest.mark.parametrize("where", ["train_data", "val_data"])
def test_a_token_id_equal_to_the_vocabulary_size_is_out_of_range(where):
    bad = data(16, seed=2)
    bad[5, 4] = V  # the first id past the embedding's rows (0..V-1)
    kw = {"train_data": bad} if where == "train_data" else {"train_data": data(), "val_data": bad}
    with pytest.raises(ValueError, match=re.escape(
            f"{where} holds token id {V}, outside the model's vocabulary: its input embedding has {V} rows "
            f"(ids 0..{V - 1})")):
        run(tiny(), max_steps=2, **kw)


def test_a_bad_token_id_in_val_data_is_named():
    bad = data(16, seed=2)
    bad[9, 2] = -1
    with pytest.raises(ValueError, match=re.escape("val_data holds token id -1, outside the model's vocabulary")):
        run(tiny(), data(), val_data=bad, max_steps=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int16])
def test_token_ids_of_another_dtype_are_named(dtype):
    with pytest.raises(ValueError, match=re.escape(
            f"train_data holds token ids of dtype {dtype}: token ids must be torch.int64 (long) or torch.int32.")):
        run(tiny(), [b.to(dtype) for b in data().split(8)], max_steps=2)


def test_a_batch_with_no_target_is_named():
    pairs = [(x[:, :-1], x[:, 1:]) for x in data(32).split(8)]
    pairs[1] = (pairs[1][0], torch.full_like(pairs[1][1], -100))
    with pytest.raises(ValueError, match=re.escape(
            "train_data gave a batch with no target to learn from at step 2: every target is IGNORE_INDEX (-100).")):
        run(tiny(), pairs, max_steps=4, log_every=2)


def test_train_restores_the_signal_handlers_it_found():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        run(tiny(), data(), max_steps=1)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_train_in_another_thread_installs_no_handler():
    import threading

    before = signal.getsignal(signal.SIGINT)
    results, seen = [], []

    class Look:
        def on_step_end(self, trainer, metrics):
            seen.append(signal.getsignal(signal.SIGINT))

    worker = threading.Thread(target=lambda: results.append(run(tiny(), data(), max_steps=1, log_every=1,
                                                                callbacks=[Look()])))
    worker.start()
    worker.join()
    assert results[0].global_step == 1 and seen == [before]


@pytest.mark.parametrize("max_steps", [3, 4])
def test_resuming_with_max_steps_at_or_below_the_step_done_is_an_error_that_writes_nothing(tmp_path, max_steps):
    run(tiny(), data(), val_data=data(16, seed=2), max_steps=4, run_dir=tmp_path)
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    latest = tmp_path / "checkpoints" / "latest.pt"
    with pytest.raises(ValueError, match=re.escape(
            f"max_steps={max_steps} is not allowed: checkpoint {str(latest)!r} is already at step 4, so there is "
            f"nothing to train. Pass max_steps > 4")):
        run(tiny(), data(), val_data=data(16, seed=2), max_steps=max_steps, run_dir=tmp_path, resume_from=tmp_path)
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before
