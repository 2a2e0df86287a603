"""One look at a model: ``look_at`` reads it once, and ``train()`` looks at it once."""

import re
import sys

import pytest
import torch
from torch import nn

from utils.models import sizes as sizes_module
from utils.models import tasks as tasks_module
from utils.models.examples import example_model
from utils.models.profile import EMBEDDINGS, OTHER, TOKENS, look_at
from utils.models.sizes import read_sizes
from utils.tiers import run_tier1, run_tier2
from utils.training import train
from utils.training.objectives import objective_for


def counting(monkeypatch, name: str, original) -> list:
    """Count calls of ``original`` wherever a ``utils`` module holds it under ``name``."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("utils") and getattr(module, name, None) is original:
            monkeypatch.setattr(module, name, counted)
    return calls


def test_look_at_reads_the_sizes_and_the_calling_convention():
    model = example_model("gpt-micro", n_layer=1)
    profile = look_at(model)
    assert (profile.vocab_size, profile.context_length, profile.input_kind) == (256, 64, TOKENS)
    assert profile.embedding is model.transformer.wte
    assert (profile.spec().max_seq_len, profile.spec().context_from) == (64, "model")
    assert profile.call.convention == "plain" and profile.model is model


def test_a_given_vocab_size_or_context_overrides_what_the_model_says():
    profile = look_at(nn.Embedding(100, 8), vocab_size=50)
    assert (profile.vocab_size, profile.spec().vocab_size) == (50, 50)
    assert (profile.spec().max_seq_len, profile.spec().context_from) == (64, "default")
    assert (profile.spec(max_seq_len=8).max_seq_len, profile.spec(max_seq_len=8).context_from) == (8, "argument")


def test_a_bad_vocab_size_or_task_is_refused_naming_the_call():
    with pytest.raises(ValueError, match=re.escape("look_at(Embedding): vocab_size=0 must be a positive int or None.")):
        look_at(nn.Embedding(10, 4), vocab_size=0)
    with pytest.raises(ValueError, match=re.escape("look_at(Embedding): task='lm' is not allowed")):
        look_at(nn.Embedding(10, 4), task="lm")


def test_the_input_kind_of_models_without_a_vocabulary():
    assert look_at(nn.Sequential(nn.Linear(8, 2))).input_kind == EMBEDDINGS
    assert look_at(nn.Sequential(nn.Conv2d(3, 4, 3))).input_kind == OTHER
    assert read_sizes(nn.Sequential(nn.Linear(8, 2))).input is None  # nothing to feed it token ids from


def test_the_task_is_found_once_per_profile(monkeypatch):
    probes = counting(monkeypatch, "probe_causal", tasks_module.probe_causal)
    profile = look_at(example_model("gpt-micro", n_layer=1))
    assert probes == []  # lazily: nothing probed until the task is needed
    assert (profile.task.task, profile.task.task) == ("causal-lm", "causal-lm")
    assert len(probes) == 1


def test_an_objective_passes_its_look_on_with_every_batch():
    model = example_model("gpt-micro", n_layer=1)
    profile = look_at(model)
    objective = objective_for(model, profile=profile)
    prepared = objective.prepare(torch.randint(0, 256, (2, 9)))
    assert prepared.profile is profile and objective.task == "causal-lm"


def test_train_looks_at_the_model_once(monkeypatch):
    probes = counting(monkeypatch, "probe_causal", tasks_module.probe_causal)
    vocab = counting(monkeypatch, "find_vocab_size", sizes_module.find_vocab_size)
    torch.manual_seed(0)
    data = torch.randint(0, 256, (16, 17))
    result = train(example_model("gpt-micro", n_layer=1), data[:12], val_data=data[12:], batch_size=4,
                   max_steps=3, precision="32-true", progress=False)
    assert result.global_step == 3 and "val_loss" in result.epochs[-1]  # one epoch, evaluated
    assert (len(probes), len(vocab)) == (1, 1)


@pytest.mark.parametrize("run", [run_tier1, run_tier2])
def test_a_tier_looks_at_the_model_once(monkeypatch, run):
    probes = counting(monkeypatch, "probe_causal", tasks_module.probe_causal)
    vocab = counting(monkeypatch, "find_vocab_size", sizes_module.find_vocab_size)
    report = run(example_model("gpt-micro", n_layer=1), figures=False, progress=False)
    assert report.passed and report.info["vocab_size"] == 256
    assert (len(probes), len(vocab)) == (1, 1)


def test_what_the_calls_learn_stays_on_the_look_not_in_a_module_cache():
    from user_models import (  # forward(idx, targets=None): the last position without targets
        NanoConfig,
        NanoGPT,
    )

    import utils.models.calls as calls_module

    profile = look_at(NanoGPT(NanoConfig(n_layer=1)))
    assert profile.call.last_position_only is None  # not known before the first call on many tokens
    assert profile.task.task == "causal-lm"  # the probe calls it through the look's ModelCall
    assert profile.call.last_position_only is True and profile.returns_loss is False
    assert not any(isinstance(v, dict) and v and isinstance(next(iter(v.values())), calls_module.ModelCall)
                   for v in vars(calls_module).values())


def test_the_look_probes_a_plain_forward_for_its_own_loss_once(monkeypatch):
    from handwritten_models import LossWrapper

    from utils.models import calls as calls_module

    probes = counting(monkeypatch, "_probe_returns_loss", calls_module._probe_returns_loss)
    model = LossWrapper()
    wrapper, plain = look_at(model), look_at(example_model("gpt-micro", n_layer=1))
    assert (wrapper.returns_loss, plain.returns_loss) == (True, False)
    assert len(probes) == 2  # one each, at the look
    assert (wrapper.returns_loss, wrapper.task.task, plain.task.task) == (True, "causal-lm", "causal-lm")
    # the task's detection asks the look, never the models again; it probes the network inside once
    assert [p[0] for p in probes[2:]] == [model.net]
