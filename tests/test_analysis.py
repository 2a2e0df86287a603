"""Tier 2: attention captured from every kind of model, and robustness checks that fail when they should."""
import re

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from user_models import TransformerLM, TupleLM, tiny_gpt2

from utils.models.examples import example_model
from utils.tiers.attention import (
    capture_attention,
    check_attention_patterns,
    looks_trained,
    sdpa_attention_weights,
)
from utils.tiers.tier2 import (
    check_batch_consistency,
    check_embedding_noise,
    check_token_substitution,
    run_tier2,
)

matplotlib.use("Agg")

TIER2 = ["attention_patterns", "token_substitution", "embedding_noise", "batch_consistency"]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# --- recomputing SDPA's weights -------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 6), S=st.integers(1, 6), causal=st.booleans(), mask=st.sampled_from([None, "bool", "float"]),
       gqa=st.booleans(), scale=st.sampled_from([None, 0.3]))
def test_recomputed_weights_reproduce_sdpa(L, S, causal, mask, gqa, scale):
    g = torch.Generator().manual_seed(L * 7 + S)
    q = torch.randn(2, 4, L, 8, generator=g)
    k, v = torch.randn(2, 2 if gqa else 4, S, 8, generator=g), torch.randn(2, 2 if gqa else 4, S, 8, generator=g)
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(L, S, generator=g) > 0.3
        attn_mask[:, 0] = True  # every query sees at least one key
    elif mask == "float":
        attn_mask = torch.randn(2, 1, L, S, generator=g)
    if causal and mask:
        return  # SDPA itself refuses is_causal with an explicit mask
    kwargs = dict(attn_mask=attn_mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    weights = sdpa_attention_weights(q, k, **kwargs)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert weights.shape == (2, 4, L, S)
    v_full = v.repeat_interleave(2, dim=1) if gqa else v
    assert torch.allclose(weights @ v_full, expected, atol=1e-5)


# --- capturing attention from each kind of model ---------------------------------------------------

def test_capture_from_sdpa_names_the_calling_module():
    model = example_model("gpt-micro")
    cap = capture_attention(model, torch.randint(0, 256, (2, 10)))
    assert cap.source == "F.scaled_dot_product_attention"
    assert list(cap.maps) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    w = cap.maps["transformer.h.0.attn"]
    assert w.shape == (2, 2, 10, 10) and torch.allclose(w.sum(-1), torch.ones(2, 2, 10))


def test_capture_from_sdpa_imported_by_name(tmp_path):
    """``from torch.nn.functional import scaled_dot_product_attention`` is seen too."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.qkv = nn.Embedding(10, 8), nn.Linear(8, 24)

        def forward(self, ids):
            q, k, v = self.qkv(self.emb(ids)).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, T, 8)
            return sdpa(q, k, v).squeeze(1)

    cap = capture_attention(Attn(), torch.randint(0, 10, (1, 5)))
    assert list(cap.maps) == ["attention"] and cap.maps["attention"].shape == (1, 1, 5, 5)


def test_capture_from_nn_transformer_gets_every_multihead_attention():
    model = TransformerLM().eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(ids)
    cap = capture_attention(model, ids)
    assert cap.source == "nn.MultiheadAttention"
    assert list(cap.maps) == ["transformer.encoder.layers.0.self_attn", "transformer.decoder.layers.0.self_attn",
                              "transformer.decoder.layers.0.multihead_attn"]
    assert all(w.shape == (2, 2, 7, 7) for w in cap.maps.values())
    with torch.no_grad():
        assert torch.allclose(model(ids), before)  # the hooks are gone, the outputs unchanged
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_from_hugging_face_output_attentions():
    cap = capture_attention(tiny_gpt2(attn_implementation="eager"), torch.randint(0, 96, (1, 6)))
    assert cap.source == "output_attentions" and list(cap.maps) == ["layer 0", "layer 1"]
    assert cap.maps["layer 0"].shape == (1, 2, 6, 6)


def test_capture_from_hugging_face_sdpa_recomputes_the_weights():
    model = tiny_gpt2(attn_implementation="sdpa")
    ids = torch.randint(0, 96, (1, 6))
    cap = capture_attention(model, ids)
    assert cap.source == "F.scaled_dot_product_attention"
    assert list(cap.maps) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    model.set_attn_implementation("eager")
    eager = capture_attention(model, ids)
    assert torch.allclose(cap.maps["transformer.h.1.attn"], eager.maps["layer 1"], atol=1e-5)


def test_hugging_face_style_config_without_the_argument_falls_back():
    model = example_model("gpt-micro", n_layer=1)
    model.config = type("Cfg", (), {"vocab_size": 256, "block_size": 64, "output_attentions": False})()
    cap = capture_attention(model, torch.zeros(1, 4, dtype=torch.long))
    assert cap.source == "F.scaled_dot_product_attention" and list(cap.maps) == ["transformer.h.0.attn"]


def test_capture_leaves_training_mode():
    model = example_model("gpt-micro").train()
    capture_attention(model, torch.zeros(1, 4, dtype=torch.long))
    assert model.training


# --- the attention check ---------------------------------------------------------------------------

def test_gpt_attention_is_causal_and_uniform_at_init():
    check = check_attention_patterns(example_model("gpt-micro"), figure=False)
    assert check.passed and check.details["causal"] is True
    assert check.details["layers"]["transformer.h.0.attn"]["normalized_entropy"][0] > 0.9


def test_encoder_attention_is_not_causal():
    check = check_attention_patterns(example_model("encoder-classifier"), figure=False)
    assert check.passed and check.details["source"] == "nn.MultiheadAttention" and not check.details["causal"]


def test_no_attention_is_said_plainly():
    check = check_attention_patterns(TupleLM())
    assert check.passed and check.skipped and check.figure is None
    assert check.summary.startswith("No attention found: the model has no nn.MultiheadAttention")


def test_collapsed_heads_fail_and_are_named():
    """Scale the queries up so each query puts all its weight on one key."""
    model = example_model("gpt-micro", n_layer=1)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.mul_(1e4)
    check = check_attention_patterns(model, figure=False)
    assert not check.passed
    assert check.details["collapsed_heads"] == ["transformer.h.0.attn head 0", "transformer.h.0.attn head 1"]
    assert ("Collapsed (each query puts nearly all its weight on one key; untrained, this means attention "
            "logits far too large: check the query/key init scale): transformer.h.0.attn head 0, "
            "transformer.h.0.attn head 1.") in check.summary


def test_a_collapsed_head_in_a_trained_model_fails_with_the_trained_reason():
    model = example_model("gpt-micro", n_layer=1)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.mul_(1e4)
    check = check_attention_patterns(model, trained=True, figure=False)
    assert not check.passed
    assert ("Collapsed (each query puts nearly all its weight on one key; after training, the head attends "
            "to one key whatever the input): transformer.h.0.attn head 0") in check.summary


UNIFORM_NOTE = ("Uniform heads are expected before training: at random initialization the attention logits "
                "q·k/√d are near zero, so the softmax is near uniform.")


def _uniform_gpt(n_layer=1):
    """gpt-micro whose queries are all zero: every logit is 0, so every head attends exactly uniformly."""
    model = example_model("gpt-micro", n_layer=n_layer)
    for block in model.transformer.h:
        C = block.attn.c_proj.weight.shape[0]
        with torch.no_grad():
            block.attn.c_attn.weight[:C].zero_()  # the query rows of the fused q, k, v projection
            block.attn.c_attn.bias[:C].zero_()
    return model


def test_uniform_heads_before_training_pass_with_the_reason():
    check = check_attention_patterns(example_model("gpt-micro"), figure=False)
    assert check.passed
    assert check.details["trained"] is False
    assert len(check.details["uniform_heads"]) == 4  # 2 layers x 2 heads, all near uniform at init
    assert check.summary.endswith("0 collapsed, 4 uniform heads. " + UNIFORM_NOTE)


def test_uniform_heads_in_a_model_declared_trained_fail():
    check = check_attention_patterns(_uniform_gpt(), trained=True, figure=False)
    assert not check.passed
    assert check.details["trained"] is True and check.details["trained_reason"] == "given: trained=True"
    assert check.summary.endswith(
        "0 collapsed, 2 uniform heads. Uniform after training (each query spreads its weight evenly, so the "
        "head learned nothing): transformer.h.0.attn head 0, transformer.h.0.attn head 1.")


def test_declaring_a_model_untrained_keeps_uniform_heads_a_note():
    check = check_attention_patterns(_uniform_gpt(), trained=False, figure=False)
    assert check.passed and check.summary.endswith(UNIFORM_NOTE)


def test_run_tier2_passes_trained_to_the_attention_check():
    assert not run_tier2(_uniform_gpt(), trained=True, figures=False)["attention_patterns"].passed


def test_one_optimizer_step_moves_the_norms_so_the_model_counts_as_trained():
    model = _uniform_gpt(n_layer=2)
    assert looks_trained(model) == (
        False, "every normalization layer (5) still has its initial constant scale and zero bias")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 16))
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    trained, reason = looks_trained(model)
    assert trained is True
    assert reason.startswith("normalization weights have moved from their initial values (transformer.h.0.ln_1, ")
    check = check_attention_patterns(model, figure=False)
    assert not check.passed and "Uniform after training" in check.summary


class _NoNormAttention(nn.Module):
    """One nn.MultiheadAttention with zero query weights (uniform heads) and no normalization layer."""

    def __init__(self, vocab_size=32, width=16):
        super().__init__()
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, width)
        self.attn = nn.MultiheadAttention(width, num_heads=2, batch_first=True)
        self.head = nn.Linear(width, vocab_size)
        with torch.no_grad():
            self.attn.in_proj_weight[:width].zero_()
            self.attn.in_proj_bias[:width].zero_()

    def forward(self, ids):
        x = self.emb(ids)  # (B, T, width)
        return self.head(self.attn(x, x, x)[0])


def test_without_a_normalization_layer_uniform_heads_are_reported_with_how_to_fail_them():
    assert looks_trained(_NoNormAttention()) == (
        None, "no normalization layer with parameters to compare with its initial values")
    check = check_attention_patterns(_NoNormAttention(), figure=False)
    assert check.passed and check.details["trained"] is None
    assert check.summary.endswith(UNIFORM_NOTE + " Whether this model is trained could not be told (it has no "
                                  "normalization layer); pass trained=True to fail on uniform heads.")


def test_a_norm_scale_that_starts_at_zero_counts_as_untrained():
    """Some models (Gemma's RMSNorm) store the scale as an offset from 1, initialized to zeros."""
    class OffsetRMSNorm(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(width))
    model = nn.Sequential(OffsetRMSNorm(4), nn.LayerNorm(4))
    assert looks_trained(model)[0] is False
    with torch.no_grad():
        model[0].weight[1] = 0.01
    assert looks_trained(model) == (True, "normalization weights have moved from their initial values (0)")


def test_attention_weights_that_do_not_sum_to_one_fail():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)

        def forward(self, ids):
            x = self.emb(ids).unsqueeze(1)  # (B, 1, T, 8)
            mask = torch.full((ids.shape[1],) * 2, float("nan"))
            return F.scaled_dot_product_attention(x, x, x, attn_mask=mask).squeeze(1)

    check = check_attention_patterns(Leaky(), figure=False)
    assert not check.passed
    assert check.summary == "Attention weights in attention are not finite or do not sum to 1."


def test_heatmaps_cover_layers_and_heads():
    from matplotlib.figure import Figure
    check = check_attention_patterns(example_model("gpt-micro", n_layer=6, n_head=4), seq_len=8)
    assert isinstance(check.figure, Figure)
    titles = [ax.get_title() for ax in check.figure.axes if ax.get_label() != "<colorbar>"]
    assert len(titles) == 16 and titles[0] == "transformer.h.0.attn\nhead 0"
    assert titles[-1] == "transformer.h.5.attn\nhead 3"  # first to last layer


def test_heatmaps_have_one_colour_bar_and_position_labels():
    fig = check_attention_patterns(example_model("gpt-micro", n_layer=2, n_head=2), seq_len=8).figure
    *maps, bar = fig.axes
    assert bar.get_label() == "<colorbar>" and bar.get_ylabel() == "attention weight"
    assert [ax.get_ylabel() for ax in maps] == ["query position", "", "query position", ""]  # first column
    assert [ax.get_xlabel() for ax in maps] == ["", "", "key position", "key position"]  # bottom row
    assert {tuple(im.get_clim()) for ax in maps for im in ax.images} == {(0.0, 1.0)}  # one scale: causal row 0 is 1
    lo, hi = sorted(maps[0].get_xlim())
    ticks = [t for t in maps[0].get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


# --- robustness ------------------------------------------------------------------------------------

def test_substitution_shows_causality_and_its_absence():
    gpt = check_token_substitution(example_model("gpt-micro"), batch_size=4)
    assert gpt.passed and gpt.details["earlier_positions_unchanged"] is True
    bidirectional = check_token_substitution(TransformerLM().apply(_no_mask), batch_size=4)
    assert bidirectional.details["earlier_positions_unchanged"] is False
    # Detected as a masked LM: seeing later tokens is its nature, reported as a property.
    assert bidirectional.passed
    assert "earlier positions change too (bidirectional, as a masked-lm model may be)" in bidirectional.summary


def test_substitution_fails_a_causal_lm_whose_earlier_positions_see_later_tokens():
    from utils.models.tasks import TaskInfo

    leaky = TaskInfo("causal-lm", "the config says so")
    check = check_token_substitution(TransformerLM().apply(_no_mask), batch_size=4, task=leaky)
    assert not check.passed
    assert check.summary.endswith("earlier positions change too (not causal): a causal LM whose earlier positions "
                                  "see later tokens reads each answer in next-token training (task causal-lm "
                                  "(the config says so)).")


def _no_mask(module):
    if isinstance(module, TransformerLM):
        module.forward = lambda ids: module.head(module.transformer(module.emb(ids), module.emb(ids)))


def test_a_model_that_ignores_its_input_fails_substitution():
    class Constant(TupleLM):
        def forward(self, ids):
            return self.head.bias.expand(ids.shape[0], ids.shape[1], -1)
    check = check_token_substitution(Constant())
    assert not check.passed
    assert check.summary == "The output does not change when a token changes: the model ignores its input."


def test_embedding_noise_grows_with_the_noise():
    changes = check_embedding_noise(example_model("gpt-micro"), noise_levels=(0.001, 0.01, 0.1)).details["relative_change"]
    assert 0 < changes[0.001] < changes[0.01] < changes[0.1]


def test_embedding_noise_is_skipped_without_an_embedding():
    class OneHot(nn.Module):
        vocab_size = 5

        def forward(self, ids):
            return F.one_hot(ids, 5).float()
    check = check_embedding_noise(OneHot())
    assert check.skipped and check.summary == "No input embedding found (no nn.Embedding): nothing to perturb."


def test_a_model_that_mixes_the_batch_fails_consistency():
    class BatchCentred(TupleLM):
        def forward(self, ids):
            logits = super().forward(ids)[0]
            return logits - logits.mean(dim=0, keepdim=True)  # the bug: depends on the other sequences
    check = check_batch_consistency(BatchCentred())
    assert not check.passed
    assert re.match(r"Outputs depend on the rest of the batch: sequence\(s\) \[0, 1, 2\]", check.summary)


# --- the tier on every kind of model -------------------------------------------------------------

@pytest.mark.parametrize("make, source", [
    (lambda: example_model("gpt-micro"), "F.scaled_dot_product_attention"),
    (lambda: example_model("encoder-classifier"), "nn.MultiheadAttention"),
    (TransformerLM, "nn.MultiheadAttention"),
    (TupleLM, None),
    (lambda: tiny_gpt2(attn_implementation="eager"), "output_attentions"),
    (lambda: tiny_gpt2(attn_implementation="sdpa"), "F.scaled_dot_product_attention"),
], ids=["gpt-micro", "encoder-classifier", "nn.Transformer", "tuple", "hf-gpt2-eager", "hf-gpt2-sdpa"])
def test_tier2_passes_on_every_kind_of_model(make, source):
    report = run_tier2(make(), figures=False)
    assert [c.name for c in report.checks] == TIER2
    assert report.passed, report.to_markdown()
    assert report["attention_patterns"].details["source"] == source


def test_tier2_report_has_heatmaps_and_markdown():
    report = run_tier2(example_model("gpt-micro"), seq_len=16)
    assert set(report.figures) == {"attention_patterns"}
    assert report.info["seq_len"] == 16
    assert report.to_markdown().startswith("## Tier 2: GPT: PASSED")
