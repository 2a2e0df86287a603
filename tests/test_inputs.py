"""The one setup of what a run trains on, shared by the command line and the notebooks."""
import re

import pytest
from task_models import PatchClassifier

from utils.models.examples import example_model
from utils.training.inputs import NotAJsonObject, json_object, model_task, task_data


def test_json_object_takes_text_a_dict_or_nothing():
    assert json_object('{"n_layer": 2}') == {"n_layer": 2}
    assert json_object("  ") == {}
    given = {"n_head": 4}
    assert json_object(given) == given and json_object(given) is not given  # a copy: the caller's stays as it was


def test_json_object_says_whether_the_text_is_not_json_or_not_an_object():
    with pytest.raises(NotAJsonObject, match=re.escape("'[1]' is not a JSON object such as '{\"n_layer\": 2}'")) as e:
        json_object("[1]")
    assert e.value.reason == ""
    with pytest.raises(NotAJsonObject, match=re.escape("'{x' is not JSON (")) as e:
        json_object("{x")
    assert "Expecting" in e.value.reason


def test_model_task_refuses_a_model_that_takes_no_token_ids_naming_where_it_came_from():
    with pytest.raises(ValueError, match=re.escape("--model: PatchClassifier is not a token model")):
        model_task(PatchClassifier(), call="PatchClassifier", model_call="--model")


def test_task_data_gives_a_language_model_windows_one_token_longer_than_its_context():
    model = example_model("gpt-micro")
    info = model_task(model, call="GPT", model_call="--model")
    data = task_data(model, info, context=16)
    assert info.task == "causal-lm"
    assert data.train.shape[1] == 17
    assert data.description.startswith("causal-lm") and data.description.endswith("windows of 17 bytes of text")


def test_task_data_gives_a_classifier_as_many_labels_as_inputs():
    model = example_model("encoder-classifier", num_classes=4)
    info = model_task(model, "classifier", call="task='classifier'", model_call="--model")
    inputs, labels = task_data(model, info, context=8).train
    assert inputs.shape == (labels.shape[0], 8) and set(labels.tolist()) == {0, 1, 2, 3}
