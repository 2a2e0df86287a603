"""Users' models whose attention is written by hand (``@``/``einsum`` and a softmax), and models that
compute their own loss: the tiers, training, resume and the benchmark on each."""
import re
import textwrap

import pytest
import torch
import torch.nn.functional as F
from handwritten_models import (
    BrokenLossClassifier,
    EinsumDecoder,
    EinsumEncoder,
    LossOnlyLM,
    LossWrapper,
    MatmulGPT,
)
from torch import nn
from user_models import TransformerLM, TupleLM

from utils.models.calls import check_context, find_logits_network, returns_loss
from utils.models.tasks import detect_task, task_logits
from utils.tiers.attention import capture_attention, check_attention_patterns, softmax_attention
from utils.tiers.tier1 import run_tier1
from utils.tiers.tier2 import run_tier2
from utils.training import benchmark_amp, cli, evaluate, resolve_precision, suite_loss_fn, train
from utils.training.batches import OwnLossError

DATA = torch.randint(0, 64, (16, 17), generator=torch.Generator().manual_seed(0))  # windows of 16 + 1


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


# ---- a forward that returns its loss -------------------------------------------------------------

def wrapper():
    torch.manual_seed(0)
    return LossWrapper()


def test_a_loss_returning_forward_is_recognised_and_its_network_found():
    model = wrapper()
    assert returns_loss(model) and not returns_loss(model.net)
    assert find_logits_network(model) == ("net", model.net)


@pytest.mark.parametrize("run", [run_tier1, run_tier2])
def test_the_tiers_check_a_loss_wrapper_through_its_network_and_say_so(run):
    report = run(wrapper(), figures=False)
    assert report.passed, report
    assert report.info["checked_through"].startswith("LossWrapper.forward returns its loss, not logits: "
                                                     "checked through model.net (EinsumDecoder)")
    assert report.info["model"] == "EinsumDecoder"


def test_the_task_of_a_loss_wrapper_is_its_networks():
    info = detect_task(LossWrapper(EinsumEncoder()))
    assert info.task == "masked-lm" and "LossWrapper.forward returns its own loss; model.net" in info.reason


def test_training_a_loss_wrapper_uses_its_loss_on_the_whole_windows():
    model = wrapper()
    expected = float(model(DATA[:4]).detach())  # what the wrapper says of the first batch, unshifted by the loop
    result = train(model, DATA[:4], precision="32-true", device="cpu", max_steps=1, batch_size=4, lr=1e-3,
                   log_every=1, progress=False)
    assert result.objective.startswith("own loss: LossWrapper.forward returns the loss; windows are passed whole")
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_training_a_loss_wrapper_lowers_its_loss():
    result = train(wrapper(), DATA, precision="32-true", device="cpu", max_steps=12, batch_size=8, lr=1e-2,
                   log_every=1, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.3


def test_a_loss_wrapper_is_evaluated_through_its_network():
    model = wrapper()
    scores = evaluate(model, DATA[:8], resolve_precision("32-true", "cpu"))
    logits = model.net(DATA[:8, :-1])
    assert scores["val_loss"] == pytest.approx(float(F.cross_entropy(logits.transpose(1, 2), DATA[:8, 1:])), rel=1e-5)
    assert scores["val_accuracy"] == pytest.approx(float((logits.argmax(-1) == DATA[:8, 1:]).float().mean()))


def test_a_loss_wrapper_resumes_where_it_stopped(tmp_path):
    train(wrapper(), DATA, precision="32-true", device="cpu", max_steps=2, batch_size=4, progress=False,
          run_dir=tmp_path)
    resumed_model, straight_model = wrapper(), wrapper()
    resumed = train(resumed_model, DATA, precision="32-true", device="cpu", max_steps=4, batch_size=4,
                    progress=False, run_dir=tmp_path, resume_from=tmp_path)
    train(straight_model, DATA, precision="32-true", device="cpu", max_steps=4, batch_size=4, progress=False)
    assert resumed.global_step == 4
    for (name, a), b in zip(resumed_model.state_dict().items(), straight_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_benchmark_trains_a_loss_wrapper_and_scores_its_network():
    bench = benchmark_amp(wrapper, DATA, precisions=("32-true", "bf16-mixed"), steps=1, warmup=0, repeats=1,
                          max_seconds=0, batch_size=4, device="cpu", eval_data=DATA[:4])
    assert [r.error for r in bench.rows] == [None, None]
    assert bench.rows[0].eval_accuracy is not None


def test_a_loss_model_with_no_network_inside_is_one_message():
    with pytest.raises(ValueError, match=re.escape(
            "run_tier1(LossOnlyLM): LossOnlyLM.forward returns a loss (a scalar), not logits, and none of its "
            "submodules maps token ids (B, T) to logits (B, T, V).")) as raised:
        run_tier1(LossOnlyLM())
    assert "pass the network your wrapper calls" in str(raised.value)


def test_a_loss_model_with_no_network_inside_still_trains_and_evaluates_on_its_loss():
    torch.manual_seed(0)
    model = LossOnlyLM()
    scores = evaluate(model, DATA[:8], resolve_precision("32-true", "cpu"), batch_size=8)
    assert scores["val_loss"] == pytest.approx(float(model(DATA[:8])), rel=1e-6) and scores["val_accuracy"] is None
    result = train(model, DATA, precision="32-true", device="cpu", max_steps=2, batch_size=8, progress=False)
    assert result.global_step == 2


# ---- a model's own loss that raises inside its library -------------------------------------------

LABELLED = (DATA[:8, :8], torch.arange(8) % 3)


def test_a_models_own_loss_that_raises_is_named_with_the_way_around():
    with pytest.raises(OwnLossError, match=re.escape(
            "BrokenLossClassifier's own loss raised ValueError: Target size (torch.Size([4])) must be the same "
            "as input size (torch.Size([4, 3])). BrokenLossClassifier.forward runs without labels=, so the "
            "failure is in the loss the model computes itself")) as raised:
        train(BrokenLossClassifier(), LABELLED, precision="32-true", device="cpu", max_steps=1, batch_size=4,
              progress=False)
    assert "Pass loss_fn=suite_loss_fn(model)" in str(raised.value)
    assert isinstance(raised.value.__cause__, ValueError)  # the library's own error, chained


class _BrokenForward(BrokenLossClassifier):
    """Fails in its forward, with or without labels: not the loss's fault."""

    def forward(self, ids, labels=None):
        raise RuntimeError("the forward itself is broken")


def test_a_forward_that_fails_without_labels_too_keeps_its_own_error():
    with pytest.raises(RuntimeError, match="the forward itself is broken"):
        train(_BrokenForward(), LABELLED, precision="32-true", device="cpu", max_steps=1, batch_size=4,
              progress=False)


def test_the_suites_loss_is_the_cross_entropy_of_the_logits():
    torch.manual_seed(0)
    model = BrokenLossClassifier()
    ids, labels = LABELLED
    loss = suite_loss_fn(model)(model, (ids, labels))
    torch.testing.assert_close(loss, F.cross_entropy(model(ids)["logits"], labels))


def test_the_suites_loss_trains_a_model_whose_own_loss_raises():
    model = BrokenLossClassifier()
    result = train(model, LABELLED, precision="32-true", device="cpu", max_steps=10, batch_size=8, lr=3e-2,
                   loss_fn=suite_loss_fn(model), log_every=1, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


# ---- the command line calls a model as the API does -----------------------------------------------

T5_FILE = textwrap.dedent("""
    from transformers import T5Config, T5ForConditionalGeneration


    class TinyT5(T5ForConditionalGeneration):
        def __init__(self):
            super().__init__(T5Config(vocab_size=256, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                      dropout_rate=0.0, decoder_start_token_id=0))
""")


@pytest.mark.parametrize("task", [[], ["--task", "seq2seq"]], ids=["detected", "stated"])
def test_cli_trains_a_hugging_face_t5_from_its_file(tmp_path, capsys, task):
    pytest.importorskip("transformers")
    path = tmp_path / "t5_model.py"
    path.write_text(T5_FILE)
    status = cli.main(["train", "--model", str(path), *task, "--context", "16", "--batch-size", "4",
                       "--max-steps", "2", "--no-progress", "--precision", "32-true", "--wandb", "disabled",
                       "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "objective      seq2seq: rebuild the window from a copy" in out
    how = "stated with task=" if task else "the config says is_encoder_decoder=True"
    assert f"the model makes its decoder inputs [{how}]" in out  # told as the API tells it


def test_the_context_check_calls_an_encoder_decoder_with_its_decoder_inputs():
    from task_models import tiny_t5

    model = tiny_t5()
    info = detect_task(model)
    check_context(model, 16, "argument", "--context N", forward=lambda m, ids: task_logits(m, ids, info))
    with pytest.raises(ValueError, match=re.escape("and on 2 tokens too, so the length is not the cause")):
        check_context(model, 16, "argument", "--context N")  # called as a plain model: not the length's fault


class _NeedsEvenLength(EinsumDecoder):
    def forward(self, x):
        if x.shape[1] % 2 and x.shape[1] >= 8:
            raise ValueError("odd length")
        return super().forward(x)


def test_the_context_is_blamed_when_a_shorter_sequence_runs():
    with pytest.raises(ValueError, match=re.escape(
            "_NeedsEvenLength.forward failed on a sequence of 9 tokens (ValueError: odd length). The context "
            "length 9 is as given. Pass a length the model takes with --context N.")):
        check_context(_NeedsEvenLength(), 9, "argument", "--context N")


# ---- notebook 02 on a user's file of hand-written attention ---------------------------------------

# Two papermill runs, the two things the notebook shows differently: a bidirectional model's own
# attention, and a loss wrapper's network; every convention's verdict is checked above through run_tier2.
@pytest.mark.parametrize("class_name, causality", [("EinsumEncoder", "(bidirectional"), ("LossWrapper", "(causal)")])
def test_notebook_02_judges_the_attention_of_a_users_file(tmp_path, class_name, causality):
    import shutil
    from pathlib import Path

    import nbformat

    papermill = pytest.importorskip("papermill")
    root = Path(__file__).resolve().parents[1]
    model_file = shutil.copy(Path(__file__).with_name("handwritten_models.py"), tmp_path / "model.py")
    out = tmp_path / "02.ipynb"
    papermill.execute_notebook(
        str(root / "notebooks" / "02_analyze.ipynb"), str(out), cwd=str(root / "notebooks"), progress_bar=False,
        parameters={"model_source": str(model_file), "class_name": class_name, "run_dir": str(tmp_path / "run")})
    shown = [o.get("data", {}).get("text/markdown", "") for c in nbformat.read(out, as_version=4).cells
             if c.cell_type == "code" and c.source.startswith("#@title 4. Run Tier 2") for o in c.outputs]
    attention = next(line for line in "".join(shown).splitlines() if "attention_patterns" in line)
    assert "2 attention layer(s), 4 heads, from softmax " + causality in attention
    through = "checked through model.net (EinsumDecoder)" in "".join(shown)
    assert through is (class_name == "LossWrapper")
