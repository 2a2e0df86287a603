"""The one home for reading model outputs and what a model takes."""
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from utils.models.calls import get_attentions, get_logits, get_loss, preserved_state
from utils.models.sizes import (
    DEFAULT_CONTEXT,
    find_context_length,
    find_hidden_size,
    find_input_embedding,
    find_num_layers,
    find_vocab_size,
    input_spec,
    model_device,
)

LOGITS = torch.randn(2, 3, 5)


@pytest.mark.parametrize("output", [
    LOGITS, (LOGITS, "cache"), [LOGITS], {"logits": LOGITS, "loss": torch.tensor(1.0)},
])
def test_get_logits_from_tensor_tuple_and_dict(output):
    assert get_logits(output) is LOGITS


def test_get_logits_and_loss_from_a_model_output():
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.CausalLMOutput(loss=torch.tensor(2.0), logits=LOGITS)
    assert get_logits(out) is LOGITS and float(get_loss(out)) == 2.0


def test_get_logits_names_what_it_got():
    with pytest.raises(TypeError, match=re.escape("Cannot find logits in a model output of type dict")):
        get_logits({"hidden": LOGITS})


def test_get_loss_is_none_for_plain_outputs():
    assert get_loss(LOGITS) is None and get_loss((LOGITS,)) is None and get_loss({"logits": LOGITS}) is None


def test_get_attentions_from_dicts_and_model_outputs():
    maps = (torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3))
    assert get_attentions({"logits": LOGITS, "attentions": maps}) == maps
    assert get_attentions({"logits": LOGITS, "attentions": ()}) is None  # HF with SDPA returns none
    assert get_attentions((LOGITS, maps)) is None and get_attentions(LOGITS) is None


class Positional(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embedding = nn.Embedding(12, 4)
        self.token_embedding = nn.Embedding(30, 4)


@dataclass
class Cfg:
    vocab_size: int = 99
    block_size: int = 17


def test_sizes_from_embeddings_when_there_is_no_config():
    model = Positional()
    assert find_input_embedding(model) is model.token_embedding
    assert (find_vocab_size(model), find_context_length(model)) == (30, 12)


@pytest.mark.parametrize("config", [Cfg(), {"vocab_size": 99, "block_size": 17}])
def test_sizes_from_a_config_dataclass_or_dict(config):
    model = Positional()
    model.config = config
    assert (find_vocab_size(model), find_context_length(model)) == (99, 17)


def test_sizes_from_hugging_face_configs():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_positions=24, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    bert = transformers.BertConfig(vocab_size=60, max_position_embeddings=40, hidden_size=8,
                                   num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    bert = transformers.BertForSequenceClassification(bert)
    assert (find_vocab_size(gpt2), find_context_length(gpt2)) == (50, 24)
    assert find_input_embedding(gpt2) is gpt2.transformer.wte
    assert (find_vocab_size(bert), find_context_length(bert)) == (60, 40)


@pytest.mark.parametrize("config, expected", [
    ({"n_layer": 3, "n_embd": 48}, (3, 48)),  # GPT-2 / nanoGPT names
    ({"num_hidden_layers": 5, "hidden_size": 64, "num_layers": 9}, (5, 64)),  # Hugging Face names first
    ({"num_layers": 2, "d_model": 32}, (2, 32)),  # T5 / nn.Transformer-style names
    ({"n_layer": True, "n_embd": 0}, (None, None)),  # a flag and a zero are not sizes
])
def test_layers_and_width_from_a_config(config, expected):
    model = Positional()
    model.config = config
    assert (find_num_layers(model), find_hidden_size(model)) == expected


def test_layers_and_width_are_none_without_a_config():
    assert (find_num_layers(Positional()), find_hidden_size(Positional())) == (None, None)


def test_no_context_limit_is_none():
    assert find_context_length(nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 5))) is None


def test_input_spec_prefers_arguments_then_the_model_then_the_default():
    model = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 5))
    assert input_spec(model) == input_spec(model, 5, None)
    assert input_spec(model).max_seq_len == DEFAULT_CONTEXT and input_spec(model).context_from == "default"
    assert input_spec(Positional()).context_from == "model"
    spec = input_spec(Positional(), vocab_size=7, max_seq_len=9)
    assert (spec.vocab_size, spec.max_seq_len, spec.context_from) == (7, 9, "argument")


def test_input_spec_random_ids_are_reproducible_and_in_range():
    spec = input_spec(Positional())
    a = spec.random_ids(3, 8, torch.Generator().manual_seed(1))
    assert torch.equal(a, spec.random_ids(3, 8, torch.Generator().manual_seed(1)))
    assert a.shape == (3, 8) and int(a.max()) < 30 and a.device == model_device(Positional())


def test_input_spec_needs_a_vocabulary():
    with pytest.raises(ValueError, match=re.escape(
            "run_tier1(Linear): Linear is not a token model: it has no config.vocab_size and no nn.Embedding. "
            "The tiers, evaluate and train on text take models of token ids (B, T); found instead: "
            "Linear.forward(input); its first layer (root) (Linear) takes float vectors (..., 2). For such a "
            "model, call train() with your own batches and loss_fn=. (If it does take token ids, pass "
            "vocab_size=.)")):
        input_spec(nn.Linear(2, 2), call="run_tier1(Linear)")


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=0), "input_spec(model): vocab_size=0 must be a positive int or None."),
    (dict(max_seq_len=2.5), "input_spec(model): max_seq_len=2.5 must be a positive int or None."),
])
def test_input_spec_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        input_spec(Positional(), **kwargs)


def test_model_device_of_a_parameterless_model_is_cpu():
    assert model_device(nn.ReLU()) == torch.device("cpu")


def test_preserved_state_restores_modes_and_grads():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    model.train()
    model[1].eval()
    before = torch.ones(2, 2)
    model[0].weight.grad = before
    with preserved_state(model):
        model.eval()
        model[0].weight.grad = None
        model[0](torch.ones(1, 2)).sum().backward()
    assert model.training and model[0].training and not model[1].training
    assert model[0].weight.grad is before and model[0].bias.grad is None


def test_model_io_is_the_old_name_of_model_calls():
    import utils.models.calls

    assert utils.models.calls.predict is utils.models.calls.predict and utils.models.calls.get_logits is get_logits


def test_a_wrapper_shares_its_modules_calling_convention():
    from utils.models.calls import model_call

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, idx, labels=None):
            return self.emb(idx)

    model = LM()
    assert model_call(nn.DataParallel(model)) == model_call(model)  # no cache: read alike, through the wrapper
    assert (model_call(model).convention, model_call(model).target_arg) == ("targets", "labels")
