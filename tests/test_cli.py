"""`python -m utils.training`: train, resume, bench, --help and bad options, end to end.

Runs use a one-layer gpt-micro on a 12 KB text so each takes a second or two; the real entry point
(`python -m`, `torchrun -m`) is run as a subprocess where the exit status or the launcher matters.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb_records

from utils.data import load_corpus
from utils.training import cli, resolve_precision
from utils.training.benchmark.results import AmpBenchmark
from utils.training.parallel.distributed import torchrun_command
from utils.training.runs.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "example:gpt-micro", "--model-config", '{"n_layer": 1, "n_embd": 32}', "--context", "32",
        "--batch-size", "8", "--lr", "3e-3", "--log-every", "2", "--no-progress"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(load_corpus()[:12_000], encoding="utf-8")
    return path


def run_module(args, *, launcher=("-m", "utils.training"), timeout=180, torchrun=False):
    """The real entry point in a subprocess; (exit status, stdout, stderr). Killed whole on timeout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = torchrun_command([*launcher, *args], nproc=2) if torchrun else [sys.executable, *launcher, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out, err


def steps_in(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["type"] == "step"]


# ---- train and resume ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    """`python -m utils.training train` for 6 steps, as a user runs it."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    status, out, err = run_module(["train", *TINY, "--data", str(text_file), "--max-steps", "6",
                                   "--run-dir", str(run_dir)])
    assert status == 0, err[-3000:]
    return run_dir, out


def test_train_writes_the_run_folder(trained):
    run_dir, _ = trained
    assert steps_in(run_dir) == [2, 4, 6]
    assert load_checkpoint(run_dir)[1]["global_step"] == 6
    assert json.loads((run_dir / "command.json").read_text())["model_config"] == {"n_layer": 1, "n_embd": 32}


def test_train_prints_a_summary(trained):
    run_dir, out = trained
    assert "example:gpt-micro trained to step 6" in out
    assert re.search(r"final loss +\d+\.\d{4}", out)
    assert "skipped steps  0" in out
    assert "None" not in out
    plan = resolve_precision("auto")
    assert (f"final loss scale n/a (no GradScaler in {plan.name})" in out) == (not plan.use_scaler)
    assert f"precision      {resolve_precision('auto').describe()}" in out  # auto, with its reason, wherever it runs
    assert f"run folder     {run_dir}" in out


def test_resume_takes_the_options_from_the_run_folder(trained, tmp_path, text_file, capsys):
    run_dir, _ = trained
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixture's subprocess (OMP_NUM_THREADS=1): bf16 kernels sum in another order on 2
    try:
        assert cli.main(["train", "--resume", str(run_dir), "--run-dir", str(resumed), "--max-steps", "10",
                         "--no-progress"]) == 0
        assert cli.main(["train", *TINY, "--data", str(text_file), "--max-steps", "10", "--run-dir", str(straight)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert steps_in(resumed) == [8, 10]
    a, b = load_checkpoint(resumed)[1]["model"], load_checkpoint(straight)[1]["model"]
    # the uninterrupted run (to float noise: the first 6 steps ran in another process)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in b)


def test_resume_into_the_same_folder_appends_to_its_metrics(trained, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained[0]), str(copy)], check=True)
    assert cli.main(["train", "--resume", str(copy), "--max-steps", "8", "--no-progress"]) == 0
    assert steps_in(copy) == [2, 4, 6, 8]


def folder_bytes(root):
    """Every file under ``root`` and its bytes: what a failed call must leave as it was."""
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(Path(root).rglob("*")) if f.is_file()}


def test_a_resume_with_another_batch_size_fails_and_leaves_the_folder_as_it_was(trained, capsys):
    run_dir, _ = trained
    before = folder_bytes(run_dir.parent)
    assert cli.main(["train", "--resume", str(run_dir), "--batch-size", "4", "--max-steps", "10",
                     "--no-progress"]) == 1
    assert "was trained with batch_size=8, but this call has batch_size=4" in capsys.readouterr().err
    assert folder_bytes(run_dir.parent) == before  # command.json still says batch_size 8


def test_a_resume_at_or_below_the_step_done_is_one_error_and_changes_nothing(trained, capsys):
    run_dir, _ = trained
    before = folder_bytes(run_dir.parent)
    assert cli.main(["train", "--resume", str(run_dir), "--max-steps", "5", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "max_steps=5 is not allowed: checkpoint " in err
    assert "is already at step 6, so there is " \
        "nothing to train. Pass max_steps > 6" in err
    assert "tokens/s" not in err
    assert folder_bytes(run_dir.parent) == before


def test_a_missing_resume_folder_is_named_before_anything_else(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert cli.main(["train", "--resume", "runs/nope"]) == 1
    err = capsys.readouterr().err
    assert "--resume runs/nope: runs/nope does not exist." in err
    assert "--model is required" not in err
    assert cli.main(["train", "--resume", "runs/nope/latest.pt", *TINY]) == 1
    assert "runs/nope/latest.pt does not exist" in capsys.readouterr().err
    assert folder_bytes(tmp_path) == {}  # no stray runs/command.json


def test_a_resume_says_the_step_it_resumes_from_and_rewrites_command_json(trained, tmp_path, capsys):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained[0]), str(copy)], check=True)
    assert cli.main(["train", "--resume", str(copy), "--max-steps", "8", "--no-progress"]) == 0
    assert f"resuming {copy / 'checkpoints' / 'latest.pt'} from step 6" in capsys.readouterr().out
    assert json.loads((copy / "command.json").read_text())["max_steps"] == 8
    assert not list(copy.glob(".command.json*"))  # written atomically: no temp file left


def test_wandb_offline_records_the_run_in_the_run_folder(tmp_path, text_file, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["train", *TINY, "--data", str(text_file), "--max-steps", "4", "--run-dir", str(run_dir),
                     "--wandb", "offline"]) == 0
    assert "W&B: offline (mode='offline' was passed)" in capsys.readouterr().out
    records = wandb_records.wait_for_exit(next(run_dir.glob("wandb/offline-run-*/run-*.wandb")))
    rows = [r for r in wandb_records.history(records) if "train/loss" in r]
    assert [r["_step"] for r in rows] == steps_in(run_dir) == [2, 4]
    assert wandb_records.config(records)["model"] == "example:gpt-micro"


def test_torchrun_two_processes_train_and_rank_zero_reports(tmp_path, text_file):
    run_dir = tmp_path / "ddp"
    status, out, err = run_module(["train", *TINY, "--batch-size", "4", "--data", str(text_file),
                                   "--max-steps", "4", "--run-dir", str(run_dir)], torchrun=True)
    assert status == 0, err[-3000:]
    assert out.count("trained to step 4") == 1
    assert "2 process(es), global batch 8" in out
    assert steps_in(run_dir) == [2, 4]


# ---- bench ---------------------------------------------------------------------------------------
def test_bench_prints_the_table_and_writes_json(tmp_path, text_file, capsys):
    out_json = tmp_path / "bench.json"
    status = cli.main(["bench", "--model", "example:gpt-micro", "--model-config", '{"n_layer": 1, "n_embd": 32}',
                       "--data", str(text_file), "--context", "16", "--precisions", "32-true", "--steps", "2",
                       "--warmup", "1", "--repeats", "1", "--batch-size", "4", "--max-seconds", "0",
                       "--json", str(out_json)])
    captured = capsys.readouterr()
    out = captured.out
    assert status == 0
    assert "| precision |" in out and "| 32-true |" in out
    assert [r["precision"] for r in json.loads(out_json.read_text())["rows"]] == ["32-true"]
    assert "bench: 100%" in captured.err and "1/1" in captured.err and "32-true done" in captured.err  # progress
    verdict = AmpBenchmark.from_dict(json.loads(out_json.read_text())).recommendation()
    assert out.rstrip().endswith(f"\n\n{verdict}")  # the table's verdict, last (a busy machine's, or "Only 32-true ...")
    assert "no mixed precision was faster" not in verdict
    assert out.startswith("allocator ")  # a CPU benchmark process steadies glibc's allocator, or says why not


def test_bench_compares_fp32_with_every_mixed_precision_of_the_device_by_default(tmp_path, text_file, monkeypatch):
    seen = {}

    def fake_benchmark(factory, data, *, precisions, **kwargs):
        seen["precisions"] = precisions
        raise SystemExit(0)  # what was asked is all this test needs

    monkeypatch.setattr("utils.training.cli.benchmark_amp", fake_benchmark)  # as the command line calls it
    base = ["bench", "--model", "example:gpt-micro", "--data", str(text_file), "--context", "16"]
    with pytest.raises(SystemExit):
        cli.main([*base, "--device", "cpu"])
    assert seen["precisions"] == ("32-true", "bf16-mixed", "auto")  # auto: in the row of what it picks
    with pytest.raises(SystemExit):
        cli.main([*base, "--device", "cpu", "--precisions", "32-true,16-mixed"])
    assert seen["precisions"] == ("32-true", "16-mixed")


# ---- help and bad options ------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "bench"])
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert exit_.value.code == 0
    assert all(a.help and a.option_strings[0] in text for a in options)


def test_a_bad_flag_exits_with_argparse_status_and_message():
    status, _, err = run_module(["train", "--model", "example:gpt-micro", "--bogus", "1"])
    assert status == 2
    assert "python -m utils.training: error: unrecognized arguments: --bogus 1" in err


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "argument --batch-size: '0' is not an integer >= 1"),
    (["--val-fraction", "1.5"], "argument --val-fraction: '1.5' is not a number in [0, 1)"),
    (["--model", "gpt"], "argument --model: 'gpt' is not a model source: use 'example', 'example:NAME' (NAME one of gpt-tiny"),
    (["--precision", "fp8"], "argument --precision: 'fp8' is not a known precision. Use one of: auto, 32-true,"),
    (["--model-config", "[1]"], "argument --model-config: '[1]' is not a JSON object"),
    (["--wandb", "maybe"], "argument --wandb: invalid choice: 'maybe'"),
])
def test_bad_values_name_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--run-dir", "x"], "--model is required (unless --resume names a run folder with a command.json)."),
    (["--model", "example:gpt-micro"], "--run-dir is required"),
    (["--model", "example:gpt-micro", "--model-config", '{"vocab_size": 100}', "--run-dir", "x"],
     "The model's vocabulary has 100 tokens, fewer than the byte tokenizer's 256"),
    (["--model", "example:gpt-micro", "--context", "65", "--run-dir", "x"],
     "--context 65 is longer than the model's context length 64. Pass --context 64 or less."),
    (["--model", "no_such_model.py", "--run-dir", "x"], "no such file"),
])
def test_problems_found_after_parsing_exit_1_with_the_reason(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *args]) == 1
    assert message in capsys.readouterr().err
