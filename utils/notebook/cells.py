"""What the notebooks' cells call, so each cell stays a few lines over a tested package.

Example::

    >>> cfg = use_settings(precision="auto", max_steps="auto", batch_size=16, model_source="auto",
    ...                    wandb_mode="auto")           # "auto": sized for this runtime  # doctest: +SKIP
    >>> cfg = need("settings")          # in a later cell: says which cell to run when it wasn't
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from IPython.display import Image, Markdown, display

from utils.common.checks import check_choice, check_int
from utils.data import head
from utils.models.sizes import find_context_length
from utils.models.sources import load_model
from utils.models.tasks import TASKS
from utils.training.amp.precision import canonical_precision, cpu_has_native_bf16, mixed_precisions_here
from utils.training.inputs import JSON_EXAMPLE, NotAJsonObject, json_object, model_task, task_data
from utils.training.settings import TrainSettings
from utils.training.wandb_log.session import WandbWarning, init_wandb

WANDB_MODES = ("auto", "offline", "online", "disabled")  # auto: online when logged in, else offline
NOTEBOOK_MAX_STEPS = 300  # a notebook trains for a set number of steps; train() itself defaults to epochs
AUTO = "auto"  # a setting's "size it for this runtime"

# What "auto" means on each runtime: on a CPU, Run All of any notebook fits in about
# two minutes; on a GPU, the full sizes. A benchmark run is 20 timed steps on either: gpt-micro's
# runs then last ~0.2 s on a CPU, long enough for step-to-step jitter to average out.
RUNTIME_SIZES = {
    "cpu": {"model_source": "example:gpt-micro", "max_steps": 40, "batch_size": 8, "bench_steps": 20,
            "bench_warmup": 1, "bench_repeats": 3, "bench_max_seconds": 0},
    "gpu": {"model_source": "example:gpt-tiny", "max_steps": NOTEBOOK_MAX_STEPS,
            "batch_size": TrainSettings.batch_size, "bench_steps": 20, "bench_warmup": 5, "bench_repeats": 3,
            "bench_max_seconds": 60},
}

# A model from this size up makes the CPU sizes above take many minutes per cell (a 124M GPT: a
# benchmark step of 8 x 128 tokens is ~15 s on 2 cores, fp16 emulated ~5x more): on a CPU, its
# "auto" settings are resized for it once the model is built (fit_settings_to_model).
LARGE_ON_CPU_PARAMS = 20_000_000
CPU_LARGE_SIZES = {"max_steps": 10, "batch_size": 1, "bench_steps": 2, "bench_warmup": 0, "bench_repeats": 1,
                   "bench_max_seconds": 0}

# Sizes no form field sets: windows the benchmark evaluates, and the AMP doctor's one batch
# (samples, and the context it is cut to; None: the data's own).
CELL_SIZES = {
    "any": {"eval_windows": 64, "doctor_batch": 4, "doctor_context": None},  # every runtime, every model ...
    "cpu-large": {"eval_windows": 4, "doctor_batch": 1, "doctor_context": 32},  # ... but a large one on a CPU
}

# The steps a later cell may need, and how to tell the user to provide them.
_STEPS = {
    "settings": "Run the settings cell (2. Settings) and the cell after it first.",
    "model": "Run the model cell (3. Model) first.",
    "data": "Run the data cell (4. Data) first.",
    "report": "Run the cell that runs the tier first.",
    "toggle": "Run the AMP toggle cell first.",
    "wandb": "Run the Weights & Biases cell first.",
    "training": "Run the training cell first.",
    "benchmark": "Run the benchmark cell first.",
    "hostile": "Run the fp16-hostile copy cell first.",
}
_DONE: dict[str, object] = {}


class RunCellFirst(RuntimeError):
    """A cell needs the result of an earlier cell that has not run in this kernel."""


def remember(step: str, value):
    """Record a cell's result under ``step`` for later cells; returns ``value``."""
    if step not in _STEPS:
        raise ValueError(f"step={step!r} is not a notebook step. Known: {', '.join(map(repr, _STEPS))}.")
    _DONE[step] = value
    return value


def need(step: str):
    """The result of an earlier cell, or a :class:`RunCellFirst` that says which cell to run."""
    if step not in _STEPS:
        raise ValueError(f"step={step!r} is not a notebook step. Known: {', '.join(map(repr, _STEPS))}.")
    if step not in _DONE:
        raise RunCellFirst(_STEPS[step])
    return _DONE[step]


def find_repo_root(start: Path | None = None) -> Path:
    """The folder holding ``utils/`` (the notebook's folder, or one of its parents)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "utils" / "__init__.py").is_file():
            return folder
    raise FileNotFoundError(f"No repository root (a folder with utils/__init__.py) at or above {here}.")


@dataclass(frozen=True)
class Settings:
    """The notebook's settings, checked once; the training ones default to :class:`TrainSettings`'s."""

    precision: str = TrainSettings.precision
    max_steps: int = NOTEBOOK_MAX_STEPS
    batch_size: int = TrainSettings.batch_size
    model_source: str = "example"
    wandb_mode: str = AUTO
    run_dir: Path = field(default_factory=lambda: Path("runs"))
    extra: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)  # the model's (or its config object's) arguments
    class_name: str | None = None  # which class, builder or instance of a model file
    task: str | None = None  # what the model predicts; None: detected (see utils.models.tasks.detect_task)
    sizes: dict = field(default_factory=lambda: dict(CELL_SIZES["any"]))  # CELL_SIZES for this runtime and model
    auto: frozenset = frozenset()  # the settings given as "auto", which fit_settings_to_model may resize


def _positive_int(name: str, value) -> int:
    return check_int(name, value, minimum=1, rule="an integer >= 1, or 'auto' for this runtime's size")


def _on_cuda() -> bool:
    return torch.cuda.is_available()


def runtime_sizes(cuda: bool | None = None) -> dict:
    """What the settings' ``"auto"`` stands for on this runtime.

    Example::

        >>> runtime_sizes(cuda=False)["model_source"]
        'example:gpt-micro'

    Args:
        cuda: whether a CUDA GPU runs the notebook (default: ``torch.cuda.is_available()``).
    """
    if cuda is None:
        cuda = _on_cuda()
    return dict(RUNTIME_SIZES["gpu" if cuda else "cpu"])


def _sized(values: dict, sizes: dict, caps=None) -> dict:
    """``values`` with each ``"auto"`` replaced by this runtime's size."""
    out = {k: (sizes[k] if k in sizes and v == AUTO else v) for k, v in values.items()}
    if out.get("bench_precisions") == AUTO:
        # auto too: its row says which it picks, and the verdict says when that ran slower than fp32
        out["bench_precisions"] = ",".join(("32-true", *mixed_precisions_here(caps), "auto"))
    return out


def new_run_dir(base="runs") -> Path:
    """``base/<timestamp>/``, created."""
    path = Path(base) / time.strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _json_setting(name: str, text) -> dict:
    try:
        return json_object(text)
    except NotAJsonObject as e:
        why = f" ({e.reason})" if e.reason else ""
        raise ValueError(f"{name}={text!r} is not allowed: it must be a JSON object such as {JSON_EXAMPLE}, "
                         f"or empty{why}.") from None


def use_settings(*, precision=TrainSettings.precision, max_steps=AUTO, batch_size=AUTO, model_source=AUTO,
                 wandb_mode=AUTO, run_dir="", model_config="", class_name="", task="auto",
                 **extra) -> Settings:
    """Check the settings cell's values, make the run folder, set ``WANDB_MODE``, and remember them.

    Args:
        max_steps, batch_size, model_source and the ``bench_*`` extras: ``"auto"`` sizes them for
            this runtime (:func:`runtime_sizes`: small on a CPU, full on a GPU); ``bench_precisions="auto"`` is
            ``32-true``, every mixed precision this runtime runs (:func:`mixed_precisions_here`) and ``auto``.
        wandb_mode: ``"auto"`` (default: online when logged in, else offline; see ``init_wandb``),
            ``"offline"``, ``"online"`` or ``"disabled"``.
        run_dir: where this run writes; empty means a new ``runs/<timestamp>/``.
        model_config: a JSON object (text, as a Colab form field gives it) of the model's arguments,
            or of its config object's fields (``{"n_layer": 2}`` for ``GPT(GPTConfig)``); empty: none.
        class_name: which class, builder function or instance of the model file; empty: found.
        task: what the model predicts: ``"auto"`` (detected from its config and a probe) or one of
            :data:`utils.models.tasks.TASKS`; it picks the data (labelled topics for a classifier) and the
            objective (masked LM for a bidirectional model).
        extra: any other settings of the notebook, kept in ``Settings.extra``.

    Raises:
        ValueError: a value that is not allowed, named with what is.
    """
    canonical_precision(precision)  # raises the resolver's listing error for a typo
    given = {"max_steps": max_steps, "batch_size": batch_size, "model_source": model_source, **extra}
    auto = frozenset(k for k, v in given.items() if v == AUTO)
    sized = _sized(given, runtime_sizes())
    max_steps, batch_size, model_source = sized.pop("max_steps"), sized.pop("batch_size"), sized.pop("model_source")
    extra = sized
    check_choice("wandb_mode", wandb_mode, WANDB_MODES, message="{name}={value!r} is not allowed. Use {rule}.")
    if not isinstance(model_source, str) or not model_source.strip():
        raise ValueError(f"model_source={model_source!r} is not allowed: use 'example', a .py file path, or a gist id/URL.")
    config = _json_setting("model_config", model_config)
    check_choice("task", task, ("auto", *TASKS), rule=f"'auto' (detected) or one of {', '.join(map(repr, TASKS))}",
                 message="{name}={value!r} is not allowed: use {rule}.")
    folder = new_run_dir() if not run_dir else Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if wandb_mode != AUTO:  # auto leaves the choice to init_wandb (and to a WANDB_MODE already set)
        os.environ["WANDB_MODE"] = wandb_mode  # in the environment: wandb reads it at exit too
    return remember("settings", Settings(precision, _positive_int("max_steps", max_steps),
                                         _positive_int("batch_size", batch_size), model_source.strip(),
                                         wandb_mode, folder, dict(extra), config,
                                         str(class_name).strip() or None, None if task == "auto" else task,
                                         auto=auto))


def fit_settings_to_model(model) -> str:
    """Resize the settings given as ``"auto"`` for a model too large for the CPU sizes (from
    :data:`LARGE_ON_CPU_PARAMS` parameters, on a runtime without CUDA): :data:`CPU_LARGE_SIZES`,
    the benchmark's precisions cut to those that run natively, and the cells' sizes (the AMP
    doctor on one sample of 32 tokens). Returns what it did in one line, or ``""`` when nothing
    changed. Values typed into the form are kept.

    Example::

        >>> if note := fit_settings_to_model(need("model")): print(note)     # doctest: +SKIP
    """
    cfg = need("settings")
    params = sum(p.numel() for p in model.parameters())
    if params < LARGE_ON_CPU_PARAMS or _on_cuda():
        return ""
    resized = {k: v for k, v in CPU_LARGE_SIZES.items() if k in cfg.auto}
    fields = {k: resized.pop(k) for k in ("max_steps", "batch_size") if k in resized}
    extra = {**cfg.extra, **{k: v for k, v in resized.items() if k in cfg.extra}}
    if "bench_precisions" in cfg.auto:  # emulated bf16 at this size: minutes per step
        extra["bench_precisions"] = ",".join(("32-true", *(("bf16-mixed",) if cpu_has_native_bf16() else ())))
    cfg = remember("settings", replace(cfg, **fields, extra=extra, sizes=dict(CELL_SIZES["cpu-large"])))
    chosen = {**fields, **{k: extra[k] for k in (*resized, "bench_precisions") if k in extra and k in cfg.auto}}
    return (f"{params / 1e6:,.0f}M parameters on a CPU: the 'auto' settings are sized for it "
            f"({', '.join(f'{k}={v}' for k, v in chosen.items())}; the AMP doctor on "
            f"{cfg.sizes['doctor_batch']} sample of {cfg.sizes['doctor_context']} tokens).")


def doctor_batch(data, n: int | None = None):
    """The AMP doctor's batch: the first ``n`` samples (default: the settings' ``doctor_batch``) of
    token windows ``(N, T)`` or an ``(inputs, labels)`` pair, cut to the settings' ``doctor_context``
    (a window keeps one token more, for the next-token target).

    Example::

        >>> batch = doctor_batch(need("data").train)      # doctest: +SKIP
    """
    sizes = need("settings").sizes
    return short_windows(head(data, n or sizes["doctor_batch"]))


def short_windows(data):
    """All of ``data`` cut to the settings' ``doctor_context`` tokens (unchanged when it is None)."""
    context = need("settings").sizes["doctor_context"]
    if context is None:
        return data
    if isinstance(data, tuple):  # (inputs, labels): the inputs are the context
        return (data[0][:, :context], *data[1:])
    return data[:, :context + 1]


def load_settings_model():
    """A fresh model as the settings name it (``model_source``, ``class_name``, ``model_config``).

    Example::

        >>> model = remember("model", load_settings_model())     # doctest: +SKIP
    """
    cfg = need("settings")
    return load_model(cfg.model_source, class_name=cfg.class_name, config=cfg.model_config or None)


def load_settings_data(model, max_context: int = 128):
    """The bundled data for ``model``'s task (the settings' ``task``, or detected), windows of its
    context (at most ``max_context``): text for language models, the labelled help topics for a
    classifier. Its ``description`` starts with the task and how it was found.

    Example::

        >>> data = remember("data", load_settings_data(need("model")))      # doctest: +SKIP
        >>> print(data.description)                                           # doctest: +SKIP
        causal-lm (changing the last token leaves earlier positions unchanged (causal)): windows of 129 bytes of text

    Raises:
        ValueError: the model takes no token ids (the message says what it takes), or a classifier
            whose classes do not fit the labelled task.
    """
    info = model_task(model, need("settings").task, call="Settings task", model_call="3. Model")
    context = min(find_context_length(model) or max_context, max_context)
    return task_data(model, info, context=context)


def cuda_missing(what: str) -> str:
    """Empty when CUDA is available; otherwise the one line a ``requires-cuda`` cell prints instead
    of running, saying what was skipped and why.

    Example::

        >>> if not (skipped := cuda_missing("10. fp16 on the GPU")): ...   # doctest: +SKIP
    """
    if torch.cuda.is_available():
        return ""
    return (f"Skipped {what}: this runtime has no CUDA GPU (torch.cuda.is_available() is False). "
            f"On Colab: Runtime > Change runtime type > GPU, then run this cell again.")


def precision_line(requested, plan) -> str:
    """What the training cell says about its precision: what was asked, what runs, and why.

    Example::

        >>> precision_line("16-mixed", resolve_precision("16-mixed"))   # on a CPU-only runtime  # doctest: +SKIP
        "Asked for '16-mixed'; running 32-true on cpu: fp16 was requested on a CPU-only runtime, ..."
    """
    asked = canonical_precision(requested)
    if asked == plan.name:
        return f"Asked for {requested!r}; running {plan.name} on {plan.device} as asked."
    return f"Asked for {requested!r}; running {plan.name} on {plan.device}: {plan.reason}"


def start_wandb(project: str, config: dict | None = None):
    """:func:`~utils.training.init_wandb` with the settings' ``wandb_mode`` and run folder. Its
    ``message`` is what the cell prints, once: the :class:`WandbWarning` that says the same when W&B
    is not used as asked (offline because not logged in) is not shown a second time.

    Example::

        >>> print(start_wandb("amp-transformer-notebooks").message)          # doctest: +SKIP
        W&B: offline (you are not logged in to W&B; ...). The run is saved in ...
    """
    cfg = need("settings")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WandbWarning)
        return init_wandb(project, config=config, mode=cfg.wandb_mode, run_dir=cfg.run_dir)


def training_summary(result) -> str:
    """The training cell's summary: final and validation loss (perplexity for a language model,
    accuracy where measured), skipped steps, speed and the checkpoint.

    Example::

        >>> print(training_summary(result))                                  # doctest: +SKIP
        32-true: final loss 2.4061, val loss 2.3810 (perplexity 10.82), 0 skipped steps, 3,771 tokens/s, ...
    """
    val = result.last_validation
    if val:
        extra = [f"perplexity {val['val_perplexity']:.2f}" if val.get("val_perplexity") is not None else "",
                 f"accuracy {val['val_accuracy']:.1%}" if val.get("val_accuracy") is not None else ""]
        extra = ", ".join(e for e in extra if e)
        validated = f"val loss {val['val_loss']:.4f}" + (f" ({extra})" if extra else "")
    else:
        validated = "no validation (no val_data)"
    return (f"{result.precision.name}: final loss {result.final_loss:.4f}, {validated}, {result.skipped_steps} "
            f"skipped steps, {result.tokens_per_second:,.0f} tokens/s, "
            + (f"checkpoint {result.checkpoint_path}" if result.checkpoint_path else "no checkpoint (no run_dir)"))


def save_figure(fig, name: str) -> Path:
    """Save ``fig`` as ``<run_dir>/<name>.png`` (the run folder from the settings) and return the path."""
    path = Path(need("settings").run_dir) / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def show_figure(fig, name: str) -> None:
    """Save ``fig`` to the run folder and display it as an image (works headless and in any frontend)."""
    display(Image(filename=str(save_figure(fig, name))))


def show_markdown(text: str) -> None:
    """Display markdown in the notebook."""
    display(Markdown(text))
