"""One definition of the training defaults: train(), the CLI, the notebooks and `make demo` read it."""
import inspect
import re
from dataclasses import fields
from pathlib import Path

import nbformat
import pytest
import torch

from utils.notebook import cells as nb
from utils.training import cli, train
from utils.training.settings import TrainSettings, settings_with

ROOT = Path(__file__).resolve().parents[1]


def test_train_defaults_are_the_settings_defaults():
    params = inspect.signature(train).parameters
    assert not {f.name for f in fields(TrainSettings)} & set(params)  # no second default that could drift
    assert params["settings"].default is None and params["overrides"].kind is inspect.Parameter.VAR_KEYWORD
    assert settings_with(None, {}) == TrainSettings()  # what train() runs with when given nothing
    assert params["precision"].default == TrainSettings.precision


def test_settings_and_overrides_apply_the_overrides_on_top():
    base = TrainSettings(batch_size=32, lr=1e-3)
    merged = settings_with(base, {"max_steps": 7, "lr": 2e-3})
    assert (merged.batch_size, merged.lr, merged.max_steps) == (32, 2e-3, 7)
    assert (base.lr, base.max_steps) == (1e-3, None)  # the caller's settings are left as they were


def test_train_runs_with_settings_and_overrides():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    ids = torch.randint(0, 16, (16, 6))
    result = train(model, ids, settings=TrainSettings(max_steps=5, batch_size=4, progress=False), max_steps=3,
                   precision="32-true", device="cpu", task="causal-lm")
    assert result.global_step == 3  # the override, not the settings' 5
    assert result.history[-1]["step"] == 3


def test_an_unknown_override_is_a_type_error_naming_it_and_the_closest_name():
    with pytest.raises(TypeError, match=re.escape(
            "train() got an unexpected keyword argument 'max_step'. Did you mean 'max_steps'? Its settings are "
            "the fields of TrainSettings (utils/training/settings.py): epochs, max_steps, batch_size,")):
        train(torch.nn.Linear(2, 2), torch.zeros(4, 2), max_step=10)
    with pytest.raises(TypeError, match=re.escape("unexpected keyword argument 'run_folder'. Did you mean 'run_dir'?")):
        train(torch.nn.Linear(2, 2), torch.zeros(4, 2), run_folder="runs/x")


def test_the_cli_defaults_are_the_settings_defaults():
    names = {"grad_accum": "grad_accum_steps"}  # the CLI's shorter option name
    for key in ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "warmup_steps", "checkpoint_every",
                "log_every", "seed", "progress", "task"):
        assert cli.TRAIN_DEFAULTS[key] == getattr(TrainSettings, names.get(key, key)), key
    bench = cli.build_parser().parse_args(["bench"])
    assert bench.batch_size == TrainSettings.batch_size


def test_the_notebook_settings_cells_start_from_the_settings_defaults():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cell = next(c for c in nbformat.read(path, 4).cells if "parameters" in c.metadata.get("tags", []))
        # a form that shows batch_size leaves it "auto": the runtime's size, TrainSettings' on a GPU
        assert re.search(r'^batch_size = "auto"\s+#@param', cell.source, re.M) or "batch_size" not in cell.source
        precision = re.search(r'^precision = "([^"]+)"\s+#@param', cell.source, re.M)
        assert precision is None or precision.group(1) == TrainSettings.precision, path.name
    assert nb.RUNTIME_SIZES["gpu"]["batch_size"] == TrainSettings.batch_size
    assert (nb.Settings.batch_size, nb.Settings.precision) == (TrainSettings.batch_size, TrainSettings.precision)


def test_bad_settings_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=re.escape("batch_size=0 is not allowed: it must be an integer >= 1.")):
        TrainSettings(batch_size=0).check()
    with pytest.raises(ValueError, match=re.escape("max_grad_norm=-1 is not allowed: it must be None or > 0.")):
        TrainSettings(max_grad_norm=-1).check()


def test_a_bad_task_names_the_value_and_the_tasks():
    with pytest.raises(ValueError, match=re.escape(
            "task='mlm' is not allowed: use one of 'causal-lm', 'masked-lm', 'classifier', 'seq2seq', "
            "'non-token', or None to detect it.")):
        TrainSettings(task="mlm").check()
