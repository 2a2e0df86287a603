"""train, evaluate, resume and benchmark_amp with the objective each task needs."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from task_models import (
    BidirectionalMLM,
    PatchClassifier,
    TinySeq2Seq,
    tiny_bert_classifier,
    tiny_bert_mlm,
    tiny_t5,
)

from utils.data import ByteTokenizer, load_corpus, make_lm_dataset, make_topic_dataset
from utils.models.examples import example_model
from utils.models.tasks import IGNORE_INDEX, shift_right
from utils.training import benchmark_amp, evaluate, plan_memory, train
from utils.training.amp.measure import saved_tensor_bytes
from utils.training.amp.precision import resolve_precision
from utils.training.objectives import mask_tokens, objective_loss_fn

TEXT = load_corpus()[:20_000]


@pytest.fixture(scope="module")
def windows():
    return make_lm_dataset(TEXT, ByteTokenizer(), context=16)


@pytest.fixture(scope="module")
def topics():
    data = make_topic_dataset(context=16)
    return (data.train[0][:64], data.train[1][:64]), (data.val[0][:16], data.val[1][:16])


class Recorder(torch.nn.Module):
    """Wraps a model and keeps the token ids of every forward call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, input_ids):
        self.seen.append(input_ids.detach().clone())
        return self.inner(input_ids)


def test_a_bidirectional_model_is_trained_on_masked_tokens_not_the_next_one(windows):
    model = Recorder(BidirectionalMLM())
    result = train(model, windows.train[:32], max_steps=2, batch_size=8, precision="32-true", progress=False)
    assert result.objective.startswith("masked-lm: 15% of positions hidden (80% -> id 255")
    trained = torch.cat(model.seen[-2:])  # the two training batches (detection probes come first)
    assert trained.shape[1] == 16  # the window's first 16 tokens: no input/target shift
    assert 0.05 < (trained == 255).float().mean() < 0.2  # the mask id, which text never holds


def test_training_a_bidirectional_model_next_token_is_refused(windows):
    with pytest.raises(ValueError, match=re.escape(
            "train(BidirectionalMLM): task='causal-lm' is not allowed for BidirectionalMLM: changing the last "
            "token changes earlier positions (bidirectional), so next-token training would let it read each "
            "answer. Use task='masked-lm' (or None to detect).")):
        train(BidirectionalMLM(), windows.train[:16], max_steps=1, task="causal-lm", progress=False)


def test_a_causal_model_still_trains_next_token(windows):
    result = train(example_model("gpt-micro"), windows.train[:16], max_steps=1, batch_size=8,
                   precision="32-true", progress=False)
    assert result.objective.startswith("causal-lm: predict the next token")


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("make", [tiny_bert_mlm, tiny_t5, TinySeq2Seq])
def test_token_tasks_train_in_every_precision(make, precision, windows):
    result = train(make(), windows.train[:8], val_data=windows.val[:4], max_steps=2, batch_size=4,
                   precision=precision, device="cpu", progress=False)
    assert result.precision.name == resolve_precision(precision, device="cpu").name
    assert math.isfinite(result.final_loss) and 4.0 < result.final_loss < 7.0  # about ln(256) = 5.5 at init
    assert result.epochs[-1]["val_accuracy"] is not None


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_classifiers_train_on_labelled_topics_in_every_precision(precision, topics):
    train_pairs, val_pairs = topics
    result = train(tiny_bert_classifier(), train_pairs, val_data=val_pairs, max_steps=2, batch_size=8,
                   precision=precision, device="cpu", progress=False)
    assert result.objective.startswith("classifier: one label per sequence")
    assert 0.0 <= result.epochs[-1]["val_accuracy"] <= 1.0
    assert abs(result.final_loss - math.log(4)) < 0.5


def test_a_classifier_given_unlabelled_text_is_told_it_needs_labels(windows):
    with pytest.raises(ValueError, match=re.escape("train_data holds unlabelled token ids, but EncoderClassifier")):
        train(example_model("encoder-classifier"), windows.train[:16], max_steps=1, progress=False)


def test_a_non_token_model_trains_with_its_own_batches_and_loss_fn():
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    result = train(PatchClassifier(), batches, max_steps=2, loss_fn=loss_fn, precision="32-true", progress=False)
    assert result.global_step == 2 and result.objective is None
    plain = train(PatchClassifier(), batches, max_steps=2, precision="32-true", progress=False)  # pairs, no loss_fn
    assert plain.objective.startswith("none: the model takes no token ids")


def test_a_non_token_model_given_text_is_told_it_takes_no_token_ids(windows):
    with pytest.raises(ValueError, match=re.escape(
            "train_data holds token ids, but PatchClassifier takes no token ids: PatchClassifier.forward(images)")):
        train(PatchClassifier(), windows.train[:8], max_steps=1, progress=False)


# ---- evaluate against a hand computation -----------------------------------------------------------

def test_classifier_accuracy_is_per_sequence(topics):
    _, (x, y) = topics
    model = tiny_bert_classifier().eval()
    scores = evaluate(model, (x, y), resolve_precision("32-true"), batch_size=8)
    with torch.no_grad():
        predicted = model(x).logits.argmax(-1)
    assert scores["val_accuracy"] == pytest.approx((predicted == y).float().mean().item())
    assert scores["val_perplexity"] is None


def test_masked_lm_accuracy_counts_the_hidden_positions_only(windows):
    model = BidirectionalMLM().eval()
    data = windows.val[:8]
    scores = evaluate(model, data, resolve_precision("32-true"), batch_size=4)
    masks, correct, count, loss = torch.Generator().manual_seed(0), 0, 0, 0.0
    with torch.no_grad():
        for batch in data.split(4):
            inputs, labels = mask_tokens(batch[:, :-1], 255, 256, generator=masks)
            logits = model(inputs)
            picked = labels != IGNORE_INDEX
            correct += int((logits.argmax(-1)[picked] == labels[picked]).sum())
            count += int(picked.sum())
            loss += float(F.cross_entropy(logits[picked], labels[picked], reduction="sum"))
    assert scores["val_accuracy"] == pytest.approx(correct / count)
    assert scores["val_loss"] == pytest.approx(loss / count, rel=1e-5)


def test_seq2seq_accuracy_is_aligned_with_the_labels_never_shifted_twice():
    # Regression: dict batches with 3-D logits were always shifted (logits[:, :-1] vs labels[:, 1:]).
    model = tiny_t5().eval()
    ids = torch.randint(1, 250, (4, 12), generator=torch.Generator().manual_seed(3))
    batches = [{"input_ids": ids, "labels": ids}]
    scores = evaluate(model, batches, resolve_precision("32-true"), batch_size=4)
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=shift_right(ids, 0)).logits
    aligned = (logits.argmax(-1) == ids).float().mean().item()
    shifted = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()
    assert scores["val_accuracy"] == pytest.approx(aligned)
    assert aligned != pytest.approx(shifted)


# ---- resume and benchmark ------------------------------------------------------------------------

def test_a_resumed_masked_lm_run_matches_an_uninterrupted_one(windows, tmp_path):
    data = windows.train[:32]
    torch.manual_seed(0)
    whole = train(BidirectionalMLM(), data, max_steps=4, batch_size=8, precision="32-true", log_every=1,
                  run_dir=tmp_path / "whole", progress=False)
    torch.manual_seed(0)
    train(BidirectionalMLM(), data, max_steps=2, batch_size=8, precision="32-true", log_every=1,
          run_dir=tmp_path / "split", progress=False)
    torch.manual_seed(1)  # a different fresh model: the checkpoint must restore everything
    resumed = train(BidirectionalMLM(), data, max_steps=4, batch_size=8, precision="32-true", log_every=1,
                    run_dir=tmp_path / "split", resume_from=tmp_path / "split", progress=False)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-6)


def test_benchmark_amp_trains_a_masked_lm_with_its_objective(windows):
    bench = benchmark_amp(BidirectionalMLM, windows.train[:32], precisions=("32-true", "bf16-mixed"), steps=2,
                          warmup=1, repeats=1, max_seconds=0, batch_size=4, device="cpu", eval_data=windows.val[:4])
    assert [r.error for r in bench.rows] == [None, None]
    for row in bench.rows:
        assert 4.0 < row.final_loss < 7.0


def test_the_precision_report_runs_an_encoder_decoder_with_its_objective(windows):
    from utils.training import compare_precisions

    model = tiny_t5()
    report = compare_precisions(model, windows.train[:2], precision="bf16-mixed")
    inputs = labels = windows.train[:2, :-1].contiguous()
    hidden, _ = mask_tokens(inputs, 255, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same hidden positions, rebuilt through labels: the fp32 loss by hand
        by_hand = model.eval()(input_ids=hidden, labels=labels).loss
    assert report.loss_fp32 == pytest.approx(float(by_hand), rel=1e-4)


def test_plan_memory_of_a_masked_lm_counts_its_sizes_by_hand(windows):
    model, batch = BidirectionalMLM(), windows.train[:2]
    plan = plan_memory(model, batch, precisions=("32-true",))
    row, params = plan.row("32-true"), sum(p.numel() for p in model.parameters())
    assert row.weight_bytes == row.gradient_bytes == params * 4 and row.optimizer_bytes == 2 * params * 4
    assert plan.sequence_length == 16  # the window minus the token a causal LM would predict
    assert row.output_grad_bytes_per_sample == 2 * 4 * 16 * 256  # logits (16, V=256) and their gradient, fp32
    by_hand = saved_tensor_bytes(model, batch, resolve_precision("32-true", "cpu"), loss_fn=objective_loss_fn(model))
    assert row.activation_bytes_per_sample == by_hand.activations / 2 > 0  # measured under its masked objective
