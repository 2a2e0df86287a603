"""Tier 1 and Tier 2 on encoders, classifiers, encoder-decoders and models that take no token ids."""

import re

import pytest
import torch
from task_models import (
    BidirectionalMLM,
    DeadLayer,
    PatchClassifier,
    TinySeq2Seq,
    tiny_bert_classifier,
    tiny_bert_mlm,
    tiny_t5,
    tiny_vit,
)

from utils.models.examples import example_model
from utils.tiers.tier1 import check_gradient_flow, run_tier1
from utils.tiers.tier2 import run_tier2

HEALTHY = {
    "bidirectional-mlm": BidirectionalMLM,
    "bert-mlm": tiny_bert_mlm,
    "bert-classifier": tiny_bert_classifier,
    "encoder-classifier": lambda: example_model("encoder-classifier"),
    "t5": tiny_t5,
    "tiny-seq2seq": TinySeq2Seq,
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_tier1_passes_healthy_models_of_every_task(name):
    report = run_tier1(HEALTHY[name](), batch_sizes=(1, 2), max_seq_len=16, figures=False, precision="32-true")
    assert report.failed == [], [c.summary for c in report.failed]


@pytest.mark.parametrize("make", [BidirectionalMLM, tiny_bert_mlm])
def test_a_key_bias_under_softmax_is_inert_by_design_not_a_failure(make):
    check = check_gradient_flow(make(), max_seq_len=16, figure=False)
    inert = check.details["inert_by_design"]
    assert check.passed
    assert sorted(inert) == sorted(n for n in check.details["grad_norms"] if n.endswith("key.bias"))
    assert len(inert) == 2 and "inert by design" in check.summary
    note = next(iter(inert.values()))
    moved = float(re.search(r"moved the output by (\S+) relative", note).group(1))
    assert moved < 1e-5


def test_a_dead_layer_still_fails_gradient_flow():
    check = check_gradient_flow(DeadLayer(), max_seq_len=16, figure=False)
    assert not check.passed
    assert set(check.details["zero_gradient"]) == {"hidden.weight", "hidden.bias", "mix.weight"}
    assert check.details["inert_by_design"] == {}


def test_a_bias_the_output_depends_on_stays_a_failure_when_its_gradient_vanishes():
    model = BidirectionalMLM()

    def shrink(module, args, output):  # the value bias reaches the output, but its gradient is ~0
        return output * 1e-12 + output.detach() * (1 - 1e-12)

    model.blocks[0].attn.value.register_forward_hook(shrink)
    check = check_gradient_flow(model, max_seq_len=16, figure=False)
    assert not check.passed
    assert "blocks.0.attn.value.bias" in check.details["vanishing_gradient"]
    assert "blocks.0.attn.value.bias" not in check.details["inert_by_design"]


def test_tier1_of_t5_calls_it_with_decoder_inputs():
    report = run_tier1(tiny_t5(), batch_sizes=(1,), max_seq_len=8, figures=False, precision="32-true")
    assert report.info["task"] == "seq2seq (the config says is_encoder_decoder=True; mask id 255)"
    assert report["shape_robustness"].details["output"] == "(B, T, 256)"


@pytest.mark.parametrize("make, name", [(tiny_vit, "ViTModel"), (PatchClassifier, "PatchClassifier")])
def test_tiers_say_plainly_they_take_token_ids(make, name):
    model = make()
    for tier, label in ((run_tier1, "run_tier1"), (run_tier2, "run_tier2")):
        with pytest.raises(ValueError, match=re.escape(
                f"{label}({name}): {name} is not a token model: it has no config.vocab_size and no nn.Embedding. "
                f"The tiers, evaluate and train on text take models of token ids (B, T); found instead: {name}.")):
            tier(model, figures=False)


def test_tier1_vit_message_names_what_it_takes():
    with pytest.raises(ValueError, match=re.escape(
            "found instead: ViTModel.forward(pixel_values, bool_masked_pos, interpolate_pos_encoding, ...); its "
            "first layer embeddings.patch_embeddings.projection (Conv2d) takes images (B, 3, H, W).")):
        run_tier1(tiny_vit(), figures=False)


@pytest.mark.parametrize("make, task", [(BidirectionalMLM, "masked-lm"), (tiny_bert_mlm, "masked-lm"),
                                        (tiny_bert_classifier, "classifier"), (tiny_t5, "seq2seq")])
def test_tier2_reports_bidirectionality_as_a_property(make, task):
    report = run_tier2(make(), max_seq_len=16, figures=False)
    assert report.failed == [], [c.summary for c in report.failed]
    assert report.info["task"].startswith(task)
    substitution = report["token_substitution"]
    if task == "masked-lm":
        assert substitution.details["earlier_positions_unchanged"] is False
        assert f"(bidirectional, as a {task} model may be)" in substitution.summary


def test_tier2_attention_of_an_encoder_is_bidirectional_not_flagged():
    report = run_tier2(BidirectionalMLM(), max_seq_len=16, figures=False)
    attention = report["attention_patterns"]
    assert attention.passed and attention.details["causal"] is False
    assert "(bidirectional, as a masked-lm model may be)" in attention.summary


def test_tier2_of_t5_captures_encoder_and_decoder_attention():
    attention = run_tier2(tiny_t5(), max_seq_len=8, figures=False)["attention_patterns"]
    causal = {name: layer["causal"] for name, layer in attention.details["layers"].items()}
    assert causal == {"encoder.block.0.layer.0.SelfAttention": False,
                      "decoder.block.0.layer.0.SelfAttention": True,
                      "decoder.block.0.layer.1.EncDecAttention": False}
    assert "(bidirectional, as a seq2seq model may be)" in attention.summary


def test_a_stated_task_reaches_the_tiers():
    report = run_tier2(BidirectionalMLM(), max_seq_len=16, figures=False, task="masked-lm")
    assert report.info["task"] == "masked-lm (stated with task=; mask id 255)"
    with pytest.raises(ValueError, match=re.escape("run_tier2(BidirectionalMLM): task='causal-lm' is not allowed")):
        run_tier2(BidirectionalMLM(), max_seq_len=16, figures=False, task="causal-lm")
    assert torch.is_grad_enabled()
