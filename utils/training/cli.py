"""``python -m utils.training``: train or benchmark a model from the command line, on one process or
under ``torchrun``.

Example::

    $ python -m utils.training train --model example:gpt-micro --data default --max-steps 200 \\
          --batch-size 16 --run-dir runs/micro
    $ python -m utils.training train --resume runs/micro --max-steps 400      # the same options again
    $ torchrun --standalone --nproc_per_node=2 -m utils.training train --model example:gpt-micro --run-dir runs/ddp
    $ python -m utils.training bench --model example:gpt-micro --precisions 32-true,bf16-mixed

This module is a program: it prints. The library it calls (``train``, ``benchmark_amp``) does not.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch

from utils.data import ByteTokenizer
from utils.models.calls import check_context
from utils.models.sizes import DEFAULT_CONTEXT, find_context_length, find_vocab_size
from utils.models.sources import load_model
from utils.models.tasks import CLASSIFIER, task_logits
from utils.training.amp.acceleration import steady_cpu_allocator
from utils.training.amp.precision import mixed_precisions_here, resolve_precision
from utils.training.benchmark.runner import benchmark_amp
from utils.training.cli_options import BENCH_MODEL, PROG, TRAIN_DEFAULTS, build_parser
from utils.training.inputs import model_task, task_data
from utils.training.loop.train import train
from utils.training.parallel.distributed import World
from utils.training.runs.checkpoint import (
    check_resume,
    claim_run_dir,
    load_checkpoint,
    resolve_checkpoint_path,
)
from utils.training.settings import TrainSettings
from utils.training.wandb_log.callback import AmpWandbCallback
from utils.training.wandb_log.session import init_wandb

COMMAND_FILE = "command.json"  # a run folder's options, so `--resume DIR` needs nothing else
# Options that must match the checkpoint's run, taken from its command.json unless given again.
RESUMED = ("model", "model_config", "class_name", "data", "context", "val_fraction", "precision",
           "batch_size", "grad_accum", "lr", "warmup_steps", "seed", "max_steps", "epochs", "log_every",
           "checkpoint_every", "checkpoint_minutes", "wandb_project", "task")


class CliError(Exception):
    """A problem with what was asked, found after parsing; printed without a traceback."""


_CLI_WORDS = [
    (re.compile(r"load_model_from_file\('([^']*)'(?:, class_name='([^']*)')?\)"),
     lambda m: f"--model {m[1]}" + (f" --class-name {m[2]}" if m[2] else "")),
    (re.compile(r"\b(device|precision|task|class_name|max_seq_len)='([^']*)'"),
     lambda m: f"{_OPTION[m[1]]} {m[2]}"),
    (re.compile(r"\b(device|precision|task|class_name|max_seq_len)=(?=[\s,.;)]|$)"), lambda m: _OPTION[m[1]]),
]
_OPTION = {"device": "--device", "precision": "--precision", "task": "--task", "class_name": "--class-name",
           "max_seq_len": "--context"}


def cli_words(text: str) -> str:
    """A library message in the command line's words, on one line: ``device='cpu'`` becomes
    ``--device cpu``, ``load_model_from_file('m.py')`` becomes ``--model m.py``, ``task=`` ``--task``.

    Example::

        >>> cli_words("Pass device='cpu' to force fp16.")
        'Pass --device cpu to force fp16.'
    """
    for pattern, replace in _CLI_WORDS:
        text = pattern.sub(replace, text)
    return " ".join(text.split())


@contextlib.contextmanager
def _warnings_as_cli_lines():
    """Warnings shown as one ``warning: ...`` line each, in the command line's words, without the
    line of our source that raised them."""
    def show(message, category, filename, lineno, file=None, line=None):
        _say(f"warning: {cli_words(str(message))}", file or sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _say(text: str, stream=None) -> None:
    """The program's output (this module is the command line; the library itself never prints)."""
    stream = stream or sys.stdout
    stream.write(f"{text}\n")
    stream.flush()


def python_command() -> str:
    """This Python as the user can call it again: the venv's interpreter relative to the working
    folder when it is inside it (``.venv/bin/python``), else its full path; never a bare ``python``,
    which fails without the venv."""
    exe = Path(sys.executable)
    return str(exe.relative_to(Path.cwd())) if exe.is_relative_to(Path.cwd()) else str(exe)


# ---- shared: the model and the data --------------------------------------------------------------
def build_model(spec: str, config: dict, class_name: str | None):
    """The model ``--model`` names; a failure in the user's own code becomes one message."""
    try:
        return load_model(spec, class_name=class_name, config=config or None)
    except FileNotFoundError as e:
        raise CliError(f"--model {spec}: no such file{_did_you_mean_file(spec)}") from e
    except (ValueError, OSError):
        raise
    except Exception as e:  # the user's file failed to import or build: no traceback, its error named
        raise CliError(f"--model {spec}: building the model failed{_where_in_user_code(e)} with "
                       f"{type(e).__name__}: {_error_text(e)}. Check the file, --class-name and --model-config.") from e


def _did_you_mean_file(spec: str) -> str:
    """``; did you mean model.py?`` for a near miss among the .py files in that folder, else ``.``"""
    path = Path(spec).expanduser()
    folder = path.parent if path.parent.is_dir() else None
    names = [p.name for p in folder.glob("*.py")] if folder is not None else []
    near = difflib.get_close_matches(path.name, names, n=1)
    return f"; did you mean {path.with_name(near[0])}?" if near else "."


class _ModelChoice(logging.Handler):
    """Collects what :func:`utils.models.user_file.load_model_from_file` logs about the class, builder or
    instance it used, and why, for the summary."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.said: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(getattr(record, "choice", record.getMessage()))

    @contextlib.contextmanager
    def listening(self):
        logger = logging.getLogger("utils.models.user_file")
        level = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)

    def line(self) -> str | None:
        """The last choice in the command line's words (``built GPT, the class --class-name GPT names``), or None."""
        return cli_words(self.said[-1]) if self.said else None


def _error_text(e: BaseException) -> str:
    return e.msg if isinstance(e, SyntaxError) else str(e)


def _where_in_user_code(e: BaseException) -> str:
    """`` at FILE, line N``: the line of the user's code that raised (a syntax error's own line), or ''."""
    if isinstance(e, SyntaxError) and e.filename:
        return f" at {e.filename}, line {e.lineno}"
    here = Path(__file__).resolve().parents[1]  # utils/: our own frames are not the user's line
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not Path(f.filename).resolve().is_relative_to(here) and "importlib" not in f.filename
              and Path(f.filename).exists()]
    return f" at {frames[-1].filename}, line {frames[-1].lineno}" if frames else ""


def load_data(spec: str, model, context: int | None, val_fraction: float, task: str | None = None):
    """The bundled data for the model's task (:func:`utils.training.inputs.task_data`): byte windows
    of the text, or for a classifier the labelled help topics; ``(train, val or None, context, task)``
    with the task as detected (or as ``--task`` states it)."""
    info = model_task(model, task, call=f"--task {task}" if task else f"{type(model).__name__}", model_call="--model")
    if info.task == CLASSIFIER and spec != "default":
        raise CliError(f"--data {spec}: the model is a sequence classifier and a text file has no labels. Use "
                       f"--data default (the bundled labelled task: which part of the Python reference a window "
                       f"comes from), or train() with your own (inputs, labels).")
    tokenizer = ByteTokenizer()
    vocab = find_vocab_size(model)
    if vocab is not None and vocab < tokenizer.vocab_size:
        raise CliError(
            f"The model's vocabulary has {vocab} tokens, fewer than the byte tokenizer's "
            f"{tokenizer.vocab_size}: byte ids up to {tokenizer.vocab_size - 1} would not fit. Use a model "
            f"with vocab_size >= {tokenizer.vocab_size}, e.g. --model example:gpt-micro, or "
            f"--model-config '{{\"vocab_size\": {tokenizer.vocab_size}}}'."
        )
    limit = find_context_length(model)
    source = "argument" if context else "model" if limit else "default"
    context = context or limit or DEFAULT_CONTEXT
    if limit is not None and context > limit:
        raise CliError(f"--context {context} is longer than the model's context length {limit}. "
                       f"Pass --context {limit} or less.")
    check_context(model, context, source, "--context N", forward=lambda m, ids: task_logits(m, ids, info))
    data = task_data(model, info, context=context, source=None if spec == "default" else Path(spec),
                     val_fraction=val_fraction)
    return data.train, data.val, context, info.task


def _start_wandb(opts: dict, config: dict, run_dir):
    """The W&B session (or None when disabled), its message printed."""
    if opts["wandb"] == "disabled":
        return None
    session = init_wandb(opts["wandb_project"], config=config, mode=opts["wandb"], run_dir=run_dir)
    _say(session.message)
    return session


# ---- train ---------------------------------------------------------------------------------------
def _command_file(checkpoint: Path) -> Path:
    return checkpoint.parent.parent / COMMAND_FILE  # <run>/checkpoints/latest.pt


def _checkpoint_of(resume: str) -> Path:
    """The checkpoint ``--resume`` names; a missing one is an error before anything else."""
    if not Path(resume).exists():
        raise CliError(f"--resume {resume}: {resume} does not exist. Give a run folder (or the checkpoint "
                       f"file in its checkpoints/ folder).")
    try:
        return resolve_checkpoint_path(resume)
    except FileNotFoundError as e:
        raise CliError(f"--resume {resume}: {resume} is a folder with no checkpoints/latest.pt in it.") from e


def train_options(args: argparse.Namespace) -> dict:
    """Defaults, then the resumed run's command.json, then what was given on this command line."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in TRAIN_DEFAULTS}
    saved = {}
    if args.resume is not None:
        path = _command_file(_checkpoint_of(args.resume))
        if path.is_file():
            saved = {k: v for k, v in json.loads(path.read_text()).items() if k in RESUMED}
    opts = {**TRAIN_DEFAULTS, **saved, **given}
    if args.resume is not None and opts["run_dir"] is None:
        opts["run_dir"] = str(_command_file(_checkpoint_of(args.resume)).parent)
    if opts["model"] is None:
        raise CliError("--model is required (unless --resume names a run folder with a command.json).")
    if opts["run_dir"] is None:
        raise CliError("--run-dir is required: the folder for metrics.jsonl and checkpoints.")
    return opts


def train_settings(opts: dict) -> TrainSettings:
    """The command line's options as the :class:`TrainSettings` ``train()`` and the resume checks take."""
    return TrainSettings(epochs=opts["epochs"], max_steps=opts["max_steps"], batch_size=opts["batch_size"],
                         lr=opts["lr"], grad_accum_steps=opts["grad_accum"], warmup_steps=opts["warmup_steps"],
                         checkpoint_every=opts["checkpoint_every"], seed=opts["seed"], log_every=opts["log_every"],
                         progress=opts["progress"], checkpoint_minutes=opts["checkpoint_minutes"],
                         task=opts["task"],  # as given: train() detects the rest as the API does, and says
                                             # "stated with task=" only when it was
                         strategy=opts["strategy"])


def resumed_step(resume, settings: TrainSettings, precision, device, model, world: World) -> int:
    """The step ``resume`` continues from, after every check ``train()`` makes on a resume
    (:func:`~utils.training.runs.checkpoint.check_resume`), made before anything is written.

    Raises:
        ValueError: the checkpoint is damaged, does not fit the model, or was trained with other settings.
    """
    path, state = load_checkpoint(resume)
    plan = resolve_precision(precision, world.default_device(device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train() warns once, when it resumes
        check_resume(path, state, settings, world_size=world.world_size, tensor_data=True, plan=plan)  # tensor data
    if state.get("sharded"):  # the shards are read by every process in train(): DCP checks them there
        return state["global_step"]
    try:
        model.load_state_dict(state["model"])  # train() loads it again; this only proves it fits
    except RuntimeError as e:
        raise ValueError(f"Checkpoint {str(path)!r} does not fit this model: {e}") from e
    return state["global_step"]


def _claim(opts: dict) -> None:
    """A fresh run (or one resumed from elsewhere) may not write over a run folder's run."""
    run_dir = Path(opts["run_dir"])
    if opts["resume"] is not None and resolve_checkpoint_path(opts["resume"]).parent.parent.resolve() == run_dir.resolve():
        return
    archived = claim_run_dir(run_dir, opts["overwrite"])  # its error names --resume and --overwrite
    if archived is not None:
        _say(f"--overwrite: the previous run in {run_dir} was moved to {archived}")


class CommandFile:
    """Writes the run's options to ``command.json`` (atomically) when training starts, not before:
    a call that fails its checks leaves the folder as it was."""

    def __init__(self, opts: dict):
        self.path = Path(opts["run_dir"]) / COMMAND_FILE
        self.options = {k: v for k, v in opts.items() if k not in ("resume", "overwrite")}

    def on_train_start(self, trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{COMMAND_FILE}.tmp")
        temp.write_text(json.dumps(self.options, indent=2) + "\n")
        os.replace(temp, self.path)


def run_train(args: argparse.Namespace) -> int:
    opts = train_options(args)
    world = World.detect()
    if not world.is_rank_zero:  # one copy of each warning, from rank 0
        warnings.simplefilter("ignore")
    torch.manual_seed(opts["seed"])
    with _ModelChoice().listening() as choice:
        model = build_model(opts["model"], opts["model_config"], opts["class_name"])
    train_ids, val_ids, context, _ = load_data(opts["data"], model, opts["context"], opts["val_fraction"],
                                               opts["task"])
    opts["context"] = context
    settings = train_settings(opts)
    step = (resumed_step(opts["resume"], settings, opts["precision"], opts["device"], model, world)
            if opts["resume"] is not None else None)
    run_dir = Path(opts["run_dir"])
    callbacks = [CommandFile(opts)]
    if world.is_rank_zero:
        _claim(opts)
        if step is not None:
            _say(f"resuming {resolve_checkpoint_path(opts['resume'])} from step {step}")
        _say(_where_checkpoints_go(opts))
    session = _start_wandb(opts, opts, run_dir) if world.is_rank_zero else None
    if session is not None:
        callbacks.append(AmpWandbCallback(precision=opts["precision"]))
    try:
        result = train(model, train_ids, val_data=val_ids, settings=settings, precision=opts["precision"],
                       device=opts["device"], callbacks=callbacks, run_dir=run_dir, resume_from=opts["resume"])
    finally:
        if session is not None:
            session.finish()
    if world.is_rank_zero:
        _say(train_summary(result, opts, world, model_choice=choice.line()))
    return exit_status(result)


def exit_status(result) -> int:
    """0 done; 130 interrupted with a checkpoint of where it stopped; 1 interrupted without one."""
    if not result.interrupted:
        return 0
    return 130 if result.checkpoint_step == result.global_step else 1


def _where_checkpoints_go(opts: dict) -> str:
    when = [f"every {opts['checkpoint_every']} steps"] if opts["checkpoint_every"] else []
    if opts["checkpoint_minutes"]:
        when.append(f"every {opts['checkpoint_minutes']:g} min")
    when.append("at epoch ends, at the end and on Ctrl-C/SIGTERM")
    return f"checkpoints: {', '.join(when)} -> {Path(opts['run_dir']) / 'checkpoints' / 'latest.pt'}"


def train_summary(result, opts: dict, world: World, model_choice: str | None = None) -> str:
    """What a person wants to know when a run ends, in a few lines; ``model_choice`` says which class,
    builder or instance of a model file was used, and why."""
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    last_val = result.last_validation
    perplexity = last_val.get("val_perplexity")
    how = f"interrupted ({result.stopped_by}) at" if result.interrupted else "trained to"
    saved = (f"checkpoint of step {result.checkpoint_step}: {result.checkpoint_path}" if result.checkpoint_path
             else "no checkpoint was saved")
    if result.interrupted and result.checkpoint_step != result.global_step:
        saved = f"NO new checkpoint (stopped mid-step); the last is the {saved}"
    lines = [
        f"{opts['model']} {how} step {result.global_step} in {result.wall_time_s:.1f} s "
        f"({world.world_size} process(es), global batch {opts['batch_size'] * world.world_size}, "
        f"{result.tokens_per_second:,.0f} tokens/s)",
        f"  final loss     {fmt(result.final_loss)}   val loss {fmt(last_val.get('val_loss'))}"
        + (f" (perplexity {perplexity:.2f})" if perplexity is not None else ""),
        f"  skipped steps  {result.skipped_steps}   final loss scale {_loss_scale(result)}",
        *([f"  model          {model_choice}"] if model_choice else []),
        f"  precision      {result.precision.describe()}",
        f"  objective      {result.objective}",
        f"  run folder     {opts['run_dir']}  (metrics.jsonl, checkpoints/latest.pt)",
        f"  saved          {saved}",
        f"  continue with  {python_command()} -m utils.training train --resume {opts['run_dir']} --max-steps N",
    ]
    return "\n".join(lines)


def _loss_scale(result) -> str:
    if result.final_loss_scale is None:
        return f"n/a (no GradScaler in {result.precision.name})"
    return f"{result.final_loss_scale:g}"


# ---- bench ---------------------------------------------------------------------------------------
def run_bench(args: argparse.Namespace) -> int:
    if World.detect().is_distributed:
        raise CliError("bench runs in one process; launch it with python, not torchrun.")
    opts = {**TRAIN_DEFAULTS, **{k: v for k, v in vars(args).items() if v is not None}}
    torch.manual_seed(opts["seed"])
    model = build_model(opts["model"] or BENCH_MODEL, opts["model_config"], opts["class_name"])
    train_ids, val_ids, context, _ = load_data(opts["data"], model, opts["context"], opts["val_fraction"],
                                               opts["task"])
    session = _start_wandb(opts, {**opts, "context": context, "command": "bench"}, None)
    try:
        # A factory, never the instance: every run builds the model from the file again.
        factory = functools.partial(build_model, opts["model"] or BENCH_MODEL, opts["model_config"], opts["class_name"])
        # auto too: its row says which it picks, and the verdict says when that ran slower than fp32
        precisions = args.precisions or ("32-true", *mixed_precisions_here(device=opts["device"]), "auto")
        if resolve_precision("32-true", opts["device"]).device.type == "cpu":  # a process that only benchmarks
            _say(steady_cpu_allocator()[1])
        bench = benchmark_amp(factory, train_ids, precisions=precisions, steps=args.steps,
                              warmup=args.warmup, repeats=args.repeats, batch_size=args.batch_size,
                              max_seconds=args.max_seconds,
                              device=opts["device"], lr=opts["lr"], eval_data=val_ids,
                              log_to_wandb=session is not None, progress=True)
    finally:
        if session is not None:
            session.finish()
    _say(f"AMP benchmark: {opts['model'] or 'example:gpt-tiny'}, context {context}, on {bench.device}\n")
    _say(bench.to_markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(bench.to_dict(), indent=2) + "\n")
        _say(f"\nFull results: {args.json}")
    _say(f"\n{bench.recommendation()}")
    return 1 if all(r.error for r in bench.rows) else 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 bad options, 130 interrupted by
    Ctrl-C or SIGTERM with a checkpoint of where it stopped; interrupted without one is 1)."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        with _sigterm_as_interrupt(), _warnings_as_cli_lines():
            return run_train(args) if args.command == "train" else run_bench(args)
    except (CliError, ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        text = str(e)  # the library's words become the options' unless the message already names one
        _say(f"{PROG} {args.command}: error: {text if text.startswith('--') else cli_words(text)}", sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say(f"interrupted after {time.perf_counter() - t0:.1f} s, before or after training: no new checkpoint "
             f"was saved", sys.stderr)
        return 1


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Outside ``train()`` (which takes signals at step boundaries) SIGTERM stops like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
