"""The command line's options (``python -m utils.training train|bench``): their types, their defaults
(the training ones from :class:`~utils.training.settings.TrainSettings`) and the parser.

Example::

    >>> build_parser().parse_args(["bench", "--steps", "5"]).steps
    5

A bad value is answered by argparse in two lines: the error (``argument --lr: '0' is not a number > 0``)
and where the options are listed.
"""

from __future__ import annotations

import argparse
import difflib

from utils.models.sizes import DEFAULT_CONTEXT
from utils.models.sources import parse_model_source
from utils.models.tasks import TASKS
from utils.training.amp.precision import ALIASES, CANONICAL, canonical_precision
from utils.training.inputs import NotAJsonObject, json_object
from utils.training.settings import STRATEGIES, TrainSettings

PROG = "python -m utils.training"  # as usage and errors name the program
BENCH_MODEL = "example:gpt-tiny"  # the benchmark's reference model
_S = TrainSettings()
TRAIN_DEFAULTS = {  # the training values come from TrainSettings; the rest are the command line's own
    "model": None, "model_config": {}, "class_name": None, "data": "default", "context": None,
    "val_fraction": 0.1, "precision": TrainSettings.precision, "device": None, "max_steps": _S.max_steps,
    "epochs": _S.epochs, "batch_size": _S.batch_size, "grad_accum": _S.grad_accum_steps, "lr": _S.lr,
    "warmup_steps": _S.warmup_steps, "checkpoint_every": _S.checkpoint_every, "log_every": _S.log_every,
    "seed": _S.seed, "run_dir": None, "resume": None, "wandb": "disabled", "wandb_project": "amp-transformer",
    "progress": _S.progress,
    "checkpoint_minutes": _S.checkpoint_minutes, "overwrite": _S.overwrite, "task": _S.task,
    "strategy": _S.strategy,
}


# ---- option types: argparse turns their errors into `usage: ... error: argument --x: ...` ---------
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}")
        return value
    return parse


def _float_where(allowed, what: str):
    """A float option type: ``allowed(value)`` must hold, else the error says the value is not ``what``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not allowed(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


_positive_float = _float_where(lambda v: v > 0, "a number > 0")
_fraction = _float_where(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_non_negative_float = _float_where(lambda v: v >= 0, "a number >= 0")


def _precision(text: str) -> str:
    """A precision; a near miss gets "did you mean", and the error lists the canonical names only
    (``--help`` lists the other spellings)."""
    try:
        canonical_precision(text)
    except ValueError as e:
        near = difflib.get_close_matches(text.strip().lower(), ALIASES, n=1)
        guess = f"; did you mean {near[0]!r}?" if near else "."
        raise argparse.ArgumentTypeError(f"{text!r} is not a known precision{guess} Use one of: auto, "
                                         f"{', '.join(CANONICAL)} (--help lists other spellings)") from e
    return text


def _model_spec(text: str) -> str:
    try:
        parse_model_source(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def _json_option(text: str) -> dict:
    try:
        return json_object(text)
    except NotAJsonObject as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _precisions(text: str) -> tuple[str, ...]:
    return tuple(_precision(p.strip()) for p in text.split(",") if p.strip()) or _precision("")


# ---- the parser ----------------------------------------------------------------------------------
def _add_model_and_data(p: argparse.ArgumentParser, d: dict, model_default: str) -> None:
    p.add_argument("--model", type=_model_spec, metavar="SPEC",
                   help="example:NAME (gpt-tiny, gpt-micro, encoder-classifier), PATH.py (a file defining "
                        "one nn.Module; it is executed) or gist:ID (a GitHub gist's .py file; executed) "
                        f"({model_default})")
    p.add_argument("--model-config", type=_json_option, metavar="JSON",
                   help="constructor arguments as JSON, e.g. '{\"n_layer\": 2}' (example models: config "
                        "overrides)")
    p.add_argument("--class-name", metavar="NAME", help="the class, builder function or module-level instance "
                   "of PATH.py or a gist to use (default: a build_model(), get_model() or create_model() "
                   "function, else the file's one nn.Module instance, else the one nn.Module class no other class "
                   "uses; train's summary says which was used)")
    p.add_argument("--data", metavar="default|PATH.txt",
                   help=f"'default': Python's bundled English help topics (~460 KB); or a UTF-8 text file. "
                        f"Tokenized as bytes (vocabulary 256) (default: {d['data']})")
    p.add_argument("--task", choices=TASKS, metavar="TASK",
                   help="what the model predicts, which sets the objective: " + ", ".join(TASKS) + " (default: "
                        "detected from its config and a probe; a classifier trains on the bundled labelled "
                        "topics)")
    p.add_argument("--context", type=_int_at_least(1), metavar="N",
                   help=f"tokens the model sees per sequence (default: the model's context length, or {DEFAULT_CONTEXT})")
    p.add_argument("--val-fraction", type=_fraction, metavar="F",
                   help=f"share of the text held out for validation, in [0, 1) (default: {d['val_fraction']})")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available; under torchrun "
                                    "cuda:LOCAL_RANK)")
    p.add_argument("--lr", type=_positive_float, help=f"learning rate (default: {d['lr']})")
    p.add_argument("--seed", type=_int_at_least(0), help=f"seed for weights and shuffling (default: {d['seed']})")
    p.add_argument("--wandb", choices=("offline", "online", "disabled"),
                   help="log to Weights & Biases: offline (saved locally; `wandb sync` later), online, or "
                        f"disabled (default: {d['wandb']})")
    p.add_argument("--wandb-project", metavar="NAME", help=f"W&B project (default: {d['wandb_project']})")


# The library's argument names -> the options that set them, so a message names what the user typed.
class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option or value answered in two lines (the error, and where the options
    are listed) instead of the whole usage first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Train or benchmark a PyTorch transformer with automatic mixed precision. Run "
                    "`train` under `torchrun --standalone --nproc_per_node=N -m utils.training train ...` to use N "
                    "processes (DistributedDataParallel).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,bench}")
    d = TRAIN_DEFAULTS
    t = sub.add_parser("train", help="train a model; checkpoints and metrics.jsonl go to --run-dir",
                       description="Train a model on a text, checkpointing to --run-dir. Options left out "
                                   "with --resume come from the run folder's command.json.")
    _add_model_and_data(t, d, "required unless --resume names a run folder")
    t.add_argument("--precision", type=_precision,
                   help=f"auto, {', '.join(CANONICAL)}; also accepted: "
                        f"{', '.join(a for a in ALIASES if a not in CANONICAL and a != 'auto')} "
                        f"(default: {d['precision']})")
    t.add_argument("--max-steps", type=_int_at_least(1), metavar="N",
                   help="optimizer steps for the whole run, those before a resume included (default: "
                        "--epochs full passes)")
    t.add_argument("--epochs", type=_int_at_least(1), metavar="N",
                   help=f"passes over the training text when --max-steps is not given (default: {d['epochs']})")
    t.add_argument("--batch-size", type=_int_at_least(1), metavar="B",
                   help=f"sequences per step per process; under torchrun the global batch is B × processes "
                        f"(default: {d['batch_size']})")
    t.add_argument("--grad-accum", type=_int_at_least(1), metavar="N",
                   help=f"micro-batches per optimizer step (default: {d['grad_accum']})")
    t.add_argument("--warmup-steps", type=_int_at_least(0), metavar="N",
                   help=f"linear learning-rate warm-up (default: {d['warmup_steps']})")
    t.add_argument("--checkpoint-every", type=_int_at_least(1), metavar="N",
                   help="also checkpoint every N steps (default: off)")
    t.add_argument("--checkpoint-minutes", type=_positive_float, metavar="M",
                   help=f"also checkpoint every M minutes of wall time, at a log step (default: "
                        f"{d['checkpoint_minutes']:g}; epoch ends, the end and a Ctrl-C/SIGTERM always save)")
    t.add_argument("--overwrite", action="store_const", const=True,
                   help="a fresh run into a --run-dir that holds a run moves the old run aside into "
                        "DIR/replaced-<time>/ (default: an error)")
    t.add_argument("--strategy", choices=STRATEGIES,
                   help=f"under torchrun: ddp (a full model per process) or fsdp (weights, gradients and optimizer "
                        f"state sharded over the processes; for a model too large for one GPU) (default: {d['strategy']})")
    t.add_argument("--log-every", type=_int_at_least(1), metavar="N",
                   help=f"read and log metrics every N steps (default: {d['log_every']})")
    t.add_argument("--run-dir", metavar="DIR",
                   help="folder for command.json, metrics.jsonl and checkpoints/ (required unless --resume; "
                        "default then: the resumed folder)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR (or a checkpoint file) exactly, "
                                                   "on any number of processes with the same global batch")
    t.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no progress bar")

    b = sub.add_parser("bench", help="time the same training in several precisions; print the table",
                       description="Train the same model from the same weights on the same batches in "
                                   "each precision, and print a Markdown table (benchmark_amp).")
    _add_model_and_data(b, d, f"default: {BENCH_MODEL}")
    b.add_argument("--precisions", type=_precisions, default=None, metavar="LIST",
                   help="comma-separated precisions to compare (default: 32-true, every mixed precision "
                        "this machine runs: bf16-mixed on a CPU, native or emulated; 16-mixed, and "
                        "bf16-mixed where supported, on a GPU; and auto, measured in the row of what it picks)")
    b.add_argument("--steps", type=_int_at_least(1), default=20, metavar="N",
                   help="timed optimizer steps per run (default: 20)")
    b.add_argument("--warmup", type=_int_at_least(0), default=5, metavar="N",
                   help="untimed steps before them (default: 5)")
    b.add_argument("--repeats", type=_int_at_least(1), default=3, metavar="N",
                   help="runs per precision, interleaved (default: 3)")
    b.add_argument("--batch-size", type=_int_at_least(1), default=d["batch_size"], metavar="B",
                   help=f"sequences per step (default: {d['batch_size']})")
    b.add_argument("--max-seconds", type=_non_negative_float, default=60.0, metavar="S",
                   help="extra interleaved rounds, up to this long, while a row has under 3 runs or noisy ones "
                        "(default: 60; 0: none)")
    b.add_argument("--json", metavar="PATH", help="also write the full results as JSON here")
    return parser
