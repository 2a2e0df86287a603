"""Task detection, the causality probe, and the objective each task trains with."""

import re

import pytest
import torch
from task_models import (
    BidirectionalMLM,
    PatchClassifier,
    TinySeq2Seq,
    tiny_bert_classifier,
    tiny_bert_mlm,
    tiny_t5,
    tiny_vit,
)
from torch import nn

from utils.data import TOPIC_GROUPS, make_topic_dataset
from utils.models.examples import example_model
from utils.models.input_kind import expected_input
from utils.models.tasks import (
    BYTE_MASK_ID,
    IGNORE_INDEX,
    detect_task,
    earlier_positions_unchanged,
    probe_causal,
    shift_right,
    task_logits,
)
from utils.training.batches import as_batches, forward_loss
from utils.training.objectives import mask_tokens, objective_for


class Unlabelled(nn.Module):
    """Hides a model's class name (and so its Hugging Face head) from the detection: only the probe decides."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids).logits


@pytest.mark.parametrize("make, task", [
    (lambda: example_model("gpt-micro"), "causal-lm"),
    (BidirectionalMLM, "masked-lm"),
    (lambda: example_model("encoder-classifier"), "classifier"),
    (TinySeq2Seq, "seq2seq"),
    (PatchClassifier, "non-token"),
    (tiny_bert_mlm, "masked-lm"),
    (tiny_bert_classifier, "classifier"),
    (tiny_t5, "seq2seq"),
    (tiny_vit, "non-token"),
    (lambda: nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                            dim_feedforward=32, batch_first=True), "non-token"),
])
def test_each_kind_of_model_is_detected(make, task):
    assert detect_task(make()).task == task


def test_the_probe_alone_tells_a_bert_from_a_gpt():
    bert = detect_task(Unlabelled(tiny_bert_mlm()))
    assert bert.task == "masked-lm"
    assert bert.reason == "changing the last token changes earlier positions (bidirectional)"
    assert probe_causal(example_model("gpt-micro"), torch.randint(0, 256, (2, 8))) is True


def test_a_bert_with_is_decoder_is_causal():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, is_decoder=True))
    assert detect_task(model).task == "causal-lm"
    assert probe_causal(Unlabelled(model), torch.randint(0, 64, (2, 8))) is True


def test_insisting_on_next_token_for_a_bidirectional_model_is_an_error():
    with pytest.raises(ValueError, match=re.escape(
            "detect_task(BidirectionalMLM): task='causal-lm' is not allowed for BidirectionalMLM: changing the "
            "last token changes earlier positions (bidirectional), so next-token training would let it read "
            "each answer. Use task='masked-lm' (or None to detect).")):
        detect_task(BidirectionalMLM(), "causal-lm")


def test_an_unknown_task_is_an_error_listing_the_tasks():
    with pytest.raises(ValueError, match=re.escape(
            "detect_task(GPT): task='mlm' is not allowed: use one of 'causal-lm', 'masked-lm', 'classifier', "
            "'seq2seq', 'non-token', or None to detect it.")):
        detect_task(example_model("gpt-micro"), "mlm")


def test_a_stated_task_is_taken_without_probing():
    info = detect_task(BidirectionalMLM(), "seq2seq")
    assert (info.task, info.reason, info.decoder_start_token_id) == ("seq2seq", "stated with task=", 0)


def test_mask_id_comes_from_the_config_else_the_reserved_byte():
    bert = tiny_bert_mlm()
    assert detect_task(bert).mask_token_id == BYTE_MASK_ID == 255
    bert.config.mask_token_id = 7
    assert detect_task(bert).mask_token_id == 7
    assert detect_task(BidirectionalMLM(vocab_size=100)).mask_token_id is None  # no room for byte 255
    assert not any(255 in chr(c).encode(errors="surrogatepass") for c in range(0x110000))  # never in UTF-8


def test_expected_input_names_the_first_layer_of_a_non_token_model():
    assert expected_input(tiny_vit()) == (
        "ViTModel.forward(pixel_values, bool_masked_pos, interpolate_pos_encoding, ...); its first layer "
        "embeddings.patch_embeddings.projection (Conv2d) takes images (B, 3, H, W)")
    assert detect_task(PatchClassifier()).expected_input == (
        "PatchClassifier.forward(images); its first layer patches (Conv2d) takes images (B, 3, H, W)")


def test_earlier_positions_unchanged_reads_only_positions_before_the_change():
    y = torch.zeros(2, 4, 3)
    y2 = y.clone()
    y2[0, 3], y2[1, 1] = 1.0, 1.0
    assert earlier_positions_unchanged(y, y2, torch.tensor([3, 1])) is True
    assert earlier_positions_unchanged(y, y2, torch.tensor([3, 2])) is False
    assert earlier_positions_unchanged(y, y2, torch.tensor([0, 0])) is None


def test_seq2seq_is_called_with_the_ids_shifted_right_as_decoder_inputs():
    assert shift_right(torch.tensor([[5, 6, 7]]), start_id=0).tolist() == [[0, 5, 6]]
    t5 = tiny_t5().eval()
    ids = torch.randint(1, 255, (2, 6))
    info = detect_task(t5)
    expected = t5(input_ids=ids, decoder_input_ids=shift_right(ids, 0)).logits
    assert torch.equal(task_logits(t5, ids, info), expected)


# ---- objectives ----------------------------------------------------------------------------------

def test_mask_tokens_follows_bert_80_10_10_on_15_percent():
    ids = torch.randint(0, 200, (64, 256))
    inputs, labels = mask_tokens(ids, 255, 256, generator=torch.Generator().manual_seed(0))
    picked = labels != IGNORE_INDEX
    assert 0.14 < picked.float().mean() < 0.16
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(inputs[~picked], ids[~picked])  # unpicked positions are never touched
    share = picked.sum().item()
    masked = (inputs[picked] == 255).sum().item() / share
    kept = (inputs[picked] == ids[picked]).sum().item() / share  # kept, plus a random id equal by chance
    assert 0.77 < masked < 0.83 and 0.08 < kept < 0.12


def test_masked_lm_loss_is_on_masked_positions_only():
    model = BidirectionalMLM().eval()
    objective = objective_for(model)
    batch = torch.randint(0, 200, (4, 33))
    prepared = objective.prepare(batch, generator=torch.Generator().manual_seed(1))
    loss, logits, targets = forward_loss(model, prepared)
    picked = targets != IGNORE_INDEX
    ids = batch[:, :-1]
    by_hand = nn.functional.cross_entropy(logits[picked], ids[picked])
    assert logits.shape[:2] == ids.shape  # no shift: position t predicts token t
    assert torch.allclose(loss, by_hand)
    assert 0 < picked.sum() < picked.numel() // 3


def test_a_bidirectional_model_is_never_given_next_token_targets():
    prepared = objective_for(BidirectionalMLM()).prepare(torch.arange(66).view(2, 33) % 200)
    picked = prepared.targets != IGNORE_INDEX
    # Every target is the token at its own position (hidden in the input), never the next one.
    assert torch.equal(prepared.targets[picked], (torch.arange(66).view(2, 33) % 200)[:, :-1][picked])
    assert (prepared.args[0][picked] != prepared.targets[picked]).any()


def test_seq2seq_rebuilds_the_whole_window_through_labels():
    model = TinySeq2Seq()
    batch = torch.randint(1, 200, (2, 17))
    prepared = objective_for(model).prepare(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prepared.kwargs["labels"], batch[:, :-1])
    assert torch.equal(prepared.targets, batch[:, :-1])
    assert (prepared.kwargs["input_ids"] == 255).any()
    loss, logits, targets = forward_loss(model, prepared)
    assert logits.shape[:2] == targets.shape == (2, 16)  # aligned with the labels, not shifted


def test_dict_batch_labels_of_a_masked_lm_are_not_shifted_again():
    # Regression: dict batches with 3-D logits used to be shifted always (logits[:, :-1] vs labels[:, 1:]).
    model = tiny_bert_mlm().eval()
    ids = torch.randint(0, 200, (2, 8))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3] = ids[:, 3]
    prepared = objective_for(model).prepare({"input_ids": ids, "labels": labels})
    loss, logits, targets = forward_loss(model, prepared)
    assert torch.equal(targets, labels)
    assert logits.shape[1] == 8
    assert torch.allclose(loss, nn.functional.cross_entropy(logits[:, 3], ids[:, 3]), atol=1e-5)


def test_a_classifier_refuses_unlabelled_token_ids():
    objective = objective_for(example_model("encoder-classifier"))
    with pytest.raises(ValueError, match=re.escape(
            "train_data holds unlabelled token ids, but EncoderClassifier is a sequence classifier (one output "
            "per sequence, logits (2, 2)): it needs labels. Pass (inputs, labels) batches or dicts with "
            "'labels', e.g. utils.data.make_topic_dataset().")):
        objective.prepare(torch.randint(0, 200, (2, 9)))


def test_a_non_token_model_is_told_it_takes_no_token_ids():
    with pytest.raises(ValueError, match=re.escape(
            "train_data holds token ids, but PatchClassifier takes no token ids: PatchClassifier.forward(images); "
            "its first layer patches (Conv2d) takes images (B, 3, H, W). Pass your own batches and loss_fn=.")):
        objective_for(PatchClassifier()).prepare(torch.randint(0, 200, (2, 9)))


def test_masking_without_a_mask_id_asks_for_one():
    objective = objective_for(BidirectionalMLM(vocab_size=100))
    with pytest.raises(ValueError, match=re.escape(
            "BidirectionalMLM is trained as masked-lm, which hides tokens, but it has no config.mask_token_id "
            "and its vocabulary (100) does not hold the byte tokenizer's reserved id 255. Pass mask_token_id=")):
        objective.prepare(torch.randint(0, 100, (2, 9)))
    with pytest.raises(ValueError, match=re.escape(
            "objective_for(BidirectionalMLM): mask_token_id=100 is not allowed: it must be an id in 0..99")):
        objective_for(BidirectionalMLM(vocab_size=100), mask_token_id=100)
    assert objective_for(BidirectionalMLM(vocab_size=100), mask_token_id=99).info.mask_token_id == 99


def test_topic_dataset_labels_windows_by_their_group_of_help_topics():
    from pydoc_data.topics import topics

    data = make_topic_dataset(context=32, val_fraction=0.1)
    x, y = data.train
    assert data.classes == tuple(TOPIC_GROUPS)
    first_statement = topics[TOPIC_GROUPS["statements"][0]].encode()[:32]
    assert bytes(x[0].tolist()) == first_statement and int(y[0]) == 0
    assert set(y.tolist()) == {0, 1, 2, 3}
    train_text = {bytes(r.tolist()) for r in x}
    assert not any(bytes(r.tolist()) in train_text for r in data.val[0][:50])  # disjoint splits


def test_labelled_pairs_batch_as_input_label_pairs():
    x, y = torch.arange(20).view(10, 2), torch.arange(10)
    batches = as_batches((x, y), batch_size=4, seed=0, argument="train_data")
    inputs, labels = next(batches.epoch(0))
    assert torch.equal(inputs[:, 0] // 2, labels)  # each row keeps its own label through the shuffle
    assert len(batches) == 2
