"""One definition of the training defaults: train(), the CLI, the notebooks and `make demo` read it."""
import inspect
import re
from dataclasses import fields
from pathlib import Path

import nbformat
import pytest

from utils.notebook import cells as nb
from utils.training import cli, train
from utils.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[1]


def test_train_defaults_are_the_settings_defaults():
    params = inspect.signature(train).parameters
    for f in fields(TrainSettings):
        assert params[f.name].default == f.default, f.name
    assert params["precision"].default == TrainSettings.precision


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
