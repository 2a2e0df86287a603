"""Users' models whose attention is written by hand (``@``/``einsum`` and a softmax), and models that
compute their own loss: the tiers, training, resume and the benchmark on each."""
import pytest
import torch
from handwritten_models import EinsumDecoder, EinsumEncoder, MatmulGPT
from torch import nn
from user_models import TransformerLM, TupleLM

from utils.analysis import capture_attention, check_attention_patterns, run_tier2, softmax_attention


@pytest.mark.parametrize("build, causal", [(MatmulGPT, True), (EinsumDecoder, True), (EinsumEncoder, False)])
def test_hand_written_attention_is_found_with_its_causality(build, causal):
    check = check_attention_patterns(build(), figure=False)
    assert check.details["source"] == "softmax"
    assert check.details["causal"] is causal
    assert len(check.details["layers"]) == 2 and all(s["heads"] == 2 for s in check.details["layers"].values())


def test_each_softmax_is_named_after_the_module_it_ran_in():
    cap = capture_attention(EinsumDecoder(), torch.zeros(2, 8, dtype=torch.long))
    assert list(cap.maps) == ["layers.0.attn", "layers.1.attn"]
    assert tuple(cap.maps["layers.0.attn"].shape) == (2, 2, 8, 8)


def test_the_captured_softmax_is_the_models_own_attention():
    model = MatmulGPT().eval()
    ids = torch.randint(0, 64, (1, 8))
    seen = {}
    model.h[1].attn.register_forward_hook(lambda m, a, out: seen.setdefault("x", a[0]))
    cap = capture_attention(model, ids)
    attn = model.h[1].attn
    q, k, _ = (z.view(1, 8, 2, 16).transpose(1, 2) for z in attn.qkv(seen["x"]).split(32, 2))
    expected = ((q @ k.transpose(-2, -1)) / 4.0).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), -torch.inf)
    torch.testing.assert_close(cap.maps["h.1.attn"], expected.softmax(-1).detach())


def test_heads_folded_into_the_batch_are_unfolded():
    w = torch.arange(6 * 4 * 4, dtype=torch.float).view(6, 4, 4).softmax(-1)  # (B*H, T, T), B = 2
    assert torch.equal(softmax_attention(w, 2, batch_size=2), w.view(2, 3, 4, 4))


@pytest.mark.parametrize("shape, dim", [((2, 8, 64), -1), ((2, 2, 8, 8), 1), ((2, 8), -1)])
def test_a_softmax_that_is_no_attention_is_left_out(shape, dim):
    assert softmax_attention(torch.rand(shape), dim, batch_size=2) is None


def test_nn_multihead_attention_is_recorded_once_not_again_as_a_softmax():
    cap = capture_attention(TransformerLM(), torch.zeros(1, 6, dtype=torch.long))
    assert cap.source == "nn.MultiheadAttention" and len(cap.maps) == 3


class _VocabSoftmax(nn.Module):
    """No attention: a softmax over the vocabulary only."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(40, 8), nn.Linear(8, 40)

    def forward(self, ids):
        return torch.softmax(self.head(self.emb(ids)), dim=-1).log()


@pytest.mark.parametrize("build", [TupleLM, _VocabSoftmax])
def test_no_attention_is_said_only_when_there_is_none(build):
    check = check_attention_patterns(build(), figure=False)
    assert check.skipped and check.summary.startswith("No attention found")


@pytest.mark.parametrize("build, causal", [(MatmulGPT, True), (EinsumDecoder, True), (EinsumEncoder, False)])
def test_tier2_judges_hand_written_attention(build, causal):
    report = run_tier2(build(), figures=False)
    assert report.passed, report
    attention = report["attention_patterns"]
    assert not attention.skipped and attention.details["causal"] is causal
    assert report["token_substitution"].details["earlier_positions_unchanged"] is causal
