"""Built-in example models, and loading a user's model from a file or a gist."""
import re

import pytest
import torch

from utils.model_io import find_context_length, find_vocab_size
from utils.models import example_model


@pytest.mark.parametrize("name, vocab, context, out_shape", [
    ("gpt-micro", 256, 64, (2, 5, 256)),
    ("encoder-classifier", 256, 64, (2, 2)),
])
def test_example_model_sizes_are_readable_by_model_io(name, vocab, context, out_shape):
    model = example_model(name)
    assert (find_vocab_size(model), find_context_length(model)) == (vocab, context)
    assert tuple(model(torch.randint(0, vocab, (2, 5))).shape) == out_shape


def test_gpt_tiny_is_the_reference_size():
    model = example_model("gpt-tiny")
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (4096, 128, 4, 4, 256)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    assert sum(p.numel() for p in model.parameters()) == 4_240_896


def test_gpt_is_causal():
    model = example_model("gpt-micro").eval()
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, 8] = (x[0, 8] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[0, :8], b[0, :8])
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_overrides_change_the_config():
    model = example_model("encoder-classifier", num_classes=5, n_layer=1)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 5)
    assert len(model.encoder.layers) == 1


def test_too_long_input_is_refused_with_the_context():
    with pytest.raises(ValueError, match=re.escape("length 65: this model's context is block_size=64")):
        example_model("gpt-micro")(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="gpt-huge"),
     "example_model('gpt-huge'): unknown model 'gpt-huge'. Available: 'gpt-tiny', 'gpt-micro', 'encoder-classifier'."),
    (dict(name="gpt-micro", n_lyer=2),
     "example_model('gpt-micro', n_lyer=2): unknown override 'n_lyer'. 'gpt-micro' accepts: vocab_size, "
     "block_size, n_layer, n_head, n_embd, dropout, bias."),
    (dict(name="gpt-micro", n_head=3), "example_model('gpt-micro', n_head=3): n_embd=64 must be divisible by n_head=3."),
    (dict(name="gpt-micro", dropout=1.5), "dropout=1.5 must be a float in [0, 1)"),
    (dict(name="gpt-micro", n_layer=True), "n_layer=True must be a positive int"),
    (dict(name="encoder-classifier", num_classes=0), "num_classes=0 must be a positive int"),
])
def test_bad_example_model_requests_name_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        example_model(**kwargs)
