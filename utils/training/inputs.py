"""What a run trains on, set up one way for the command line and the notebooks: the model's arguments
given as JSON text, the model's task, and the bundled data for that task.

Example::

    >>> model = load_model("example:gpt-micro", config=json_object('{"n_layer": 1}'))   # doctest: +SKIP
    >>> info = model_task(model, call="GPT", model_call="--model")                     # doctest: +SKIP
    >>> data = task_data(model, info, context=64)                                       # doctest: +SKIP
    >>> data.description                                                                # doctest: +SKIP
    'causal-lm (...): windows of 65 bytes of text'

The command line (:mod:`utils.training.cli`) and the notebook cells (:mod:`utils.notebook.cells`)
word the errors in their own terms (``--model-config``, the settings form); what is checked is here.
"""

from __future__ import annotations

import json

from torch import nn

from utils.data import TaskDataset, make_task_dataset
from utils.models.input_kind import not_a_token_model_error
from utils.models.tasks import (
    CLASSIFIER,
    NON_TOKEN,
    TaskInfo,
    detect_task,
    find_num_classes,
)

JSON_EXAMPLE = "'{\"n_layer\": 2}'"  # what a JSON object of model arguments looks like, in errors


class NotAJsonObject(ValueError):
    """Text that should hold a JSON object does not: ``reason`` is the JSON parser's complaint when it is
    not JSON at all, empty when it is JSON but not an object (``[1]``)."""

    def __init__(self, text, reason: str = ""):
        self.text, self.reason = text, reason
        super().__init__(f"{text!r} is not JSON ({reason})" if reason
                         else f"{text!r} is not a JSON object such as {JSON_EXAMPLE}")


def json_object(text) -> dict:
    """The JSON object ``text`` holds, as a notebook form field or ``--model-config`` gives it: a dict
    is taken as it is, empty text means none (``{}``).

    Example::

        >>> json_object('{"n_layer": 2}'), json_object(""), json_object({"n_head": 4})
        ({'n_layer': 2}, {}, {'n_head': 4})

    Raises:
        NotAJsonObject: not JSON, or JSON but not an object (a ``ValueError``).
    """
    if isinstance(text, dict):
        return dict(text)
    if not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise NotAJsonObject(text, str(e)) from e
    if not isinstance(value, dict):
        raise NotAJsonObject(text)
    return value


def model_task(model: nn.Module, task: str | None = None, *, call: str, model_call: str) -> TaskInfo:
    """What ``model`` predicts (``task`` as stated, or detected: :func:`utils.models.tasks.detect_task`);
    a model that takes no token ids is refused here, since the bundled data is token ids.

    Args:
        call: how the task was given, repeated in detection errors (``"--task seq2seq"``, ``"Settings task"``).
        model_call: where the model came from, repeated in the refusal (``"--model"``, ``"3. Model"``).

    Raises:
        ValueError: the task is not one of the tasks, does not fit the model, or the model takes no token ids.
    """
    info = detect_task(model, task, call=call)
    if info.task == NON_TOKEN:
        raise not_a_token_model_error(model, model_call)
    return info


def task_data(model: nn.Module, info: TaskInfo, *, context: int, source=None, val_fraction: float = 0.1) -> TaskDataset:
    """The bundled data for the model's task (:func:`utils.data.make_task_dataset`), windows of ``context``
    tokens: text for a language model, the labelled help topics for a classifier (its classes checked).
    The ``description`` starts with the task and how it was found.

    Raises:
        ValueError: as :func:`utils.data.make_task_dataset` (a classifier given a text, or too few classes).
    """
    classes = find_num_classes(model) if info.task == CLASSIFIER else None
    data = make_task_dataset(info.task, context=context, source=source, val_fraction=val_fraction,
                             num_classes=classes)
    return data._replace(description=f"{info.describe()}: {data.description}")
