import json
import re
import types
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from user_models import TransformerLM

from utils.models.examples import example_model
from utils.training import PrecisionWarning, Trainer, TrainSettings, resolve_precision, train
from utils.training.batches import as_batches
from utils.training.loop import meter as meter_module
from utils.training.loop import trainer as loop_module
from utils.training.loop.train import default_optimizer
from utils.training.runs.checkpoint import load_checkpoint

V, T = 64, 16


class TinyLM(nn.Module):
    """Embedding → one nn.TransformerEncoderLayer (causal) → head; dropout on to exercise RNG restore."""

    def __init__(self, dropout=0.1, returns="tensor"):
        super().__init__()
        self.emb, self.pos = nn.Embedding(V, 32), nn.Embedding(T, 32)
        self.block = nn.TransformerEncoderLayer(32, 2, 64, dropout=dropout, batch_first=True)
        self.head = nn.Linear(32, V)
        self.returns = returns

    def forward(self, x):
        h = self.emb(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        logits = self.head(self.block(h, src_mask=mask, is_causal=True))
        return (logits, h) if self.returns == "tuple" else logits


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw)


def data(n=64, seed=1):
    return torch.randint(0, V, (n, T + 1), generator=torch.Generator().manual_seed(seed))


def pattern_data(n=64):
    """Sequences that count upwards mod V: learnable in a few dozen steps."""
    start = torch.randint(0, V, (n, 1), generator=torch.Generator().manual_seed(3))
    return (start + torch.arange(T + 1)) % V


def run(model, train_data, **kw):
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        return train(model, train_data, **kw)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# ---- precisions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_loss_falls_in_fp32_and_bf16(precision):
    result = run(tiny(dropout=0.0), pattern_data(), precision=precision, device="cpu", max_steps=40,
                 batch_size=16, lr=3e-3, log_every=5)
    assert result.precision.name == precision
    assert result.history[0]["loss"] > result.final_loss + 0.5
    assert result.skipped_steps == 0 and result.final_loss_scale is None


def test_bf16_mixed_really_autocasts_the_forward():
    seen = []
    model = tiny()
    # Training forwards only: train() first probes the model's task in eval mode, outside autocast.
    model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
    run(model, data(), precision="bf16-mixed", device="cpu", max_steps=1, batch_size=8)
    assert seen == [torch.bfloat16]


def overflow_loss(model, batch):
    """Upstream gradient of 10 per logit: times the initial scale 65536 it overflows fp16."""
    return model(batch[:, :-1]).float().sum() * 10


def test_fp16_overflow_skips_steps_backs_off_scale_and_holds_the_schedule():
    model = tiny(dropout=0.0)
    result = run(model, data(), precision="16-mixed", device="cpu", max_steps=16, batch_size=4,
                 loss_fn=overflow_loss, log_every=1, warmup_steps=100, lr=1e-3)
    k = result.skipped_steps
    # The scaled gradients overflow fp16 until the scale has halved k times; then every step applies.
    assert 3 <= k < 16
    assert [h["skipped"] for h in result.history] == [True] * k + [False] * (16 - k)
    assert [h["skipped_steps"] for h in result.history] == list(range(1, k + 1)) + [k] * (16 - k)
    assert [h["loss_scale"] for h in result.history][:k] == [65536.0 / 2 ** i for i in range(1, k + 1)]
    assert result.final_loss_scale == 65536.0 / 2 ** k
    # Warm-up advanced only on the applied steps: lr = 1e-3 * (applied + 1) / 100.
    assert result.history[-1]["lr"] == pytest.approx(1e-3 * (16 - k + 1) / 100)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_skipped_steps_leave_weights_untouched():
    model = tiny(dropout=0.0)
    before = params(model)
    result = run(model, data(), precision="16-mixed", device="cpu", max_steps=3, batch_size=4,
                 loss_fn=overflow_loss, log_every=1)
    assert result.skipped_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_no_lr_scheduler_order_warning_when_steps_are_skipped():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny(dropout=0.0), data(), precision="16-mixed", device="cpu", max_steps=3, batch_size=4,
              loss_fn=overflow_loss, progress=False)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_true_precisions_cast_the_weights():
    model = tiny()
    run(model, data(), precision="bf16-true", device="cpu", max_steps=2, batch_size=8)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---- accumulation, outputs, data forms ----------------------------------------------------------

def test_gradient_accumulation_matches_the_big_batch():
    big, small = tiny(dropout=0.0), tiny(dropout=0.0)
    # SGD keeps the update linear in the gradient, so the two runs can be compared tightly.
    run(big, data(), precision="32-true", max_steps=3, batch_size=16,
        optimizer=torch.optim.SGD(big.parameters(), lr=0.5))
    run(small, data(), precision="32-true", max_steps=3, batch_size=4, grad_accum_steps=4,
        optimizer=torch.optim.SGD(small.parameters(), lr=0.5))
    moved = max((a - b).abs().max() for a, b in zip(big.parameters(), tiny(dropout=0.0).parameters()))
    assert moved > 1e-3
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_tuple_output_and_pair_batches_train_as_a_tensor_output_on_whole_sequences():
    """(logits, extra) is read as its logits, and (inputs, targets) pairs as the shifted sequence."""
    sequences = list(data(32).split(8))
    pairs = [(x[:, :-1], x[:, 1:]) for x in sequences]
    tuple_model, plain_model = tiny(returns="tuple", dropout=0.0), tiny(dropout=0.0)
    got = run(tuple_model, pairs, precision="32-true", epochs=2, log_every=1)
    want = run(plain_model, sequences, precision="32-true", epochs=2, log_every=1)
    assert got.global_step == 8 and [h["loss"] for h in got.history] == [h["loss"] for h in want.history]
    assert all(torch.equal(a, b) for a, b in zip(tuple_model.parameters(), plain_model.parameters()))


def test_classifier_pairs_report_the_accuracy_of_the_models_predictions():
    torch.manual_seed(0)
    model = example_model("encoder-classifier")
    ids = torch.randint(0, 100, (32, 12), generator=torch.Generator().manual_seed(0))
    labels = ids[:, 0] % 2  # learnable: the parity of the first token (memorised in a few epochs)
    pairs = [(ids[i:i + 8], labels[i:i + 8]) for i in range(0, 32, 8)]
    result = run(model, pairs, val_data=pairs, precision="32-true", epochs=4, lr=3e-3)
    model.eval()
    with torch.no_grad():
        by_hand = (model(ids).argmax(-1) == labels).float().mean().item()
    assert result.epochs[-1]["val_accuracy"] == pytest.approx(by_hand)
    assert by_hand >= 0.9  # far above chance (0.5): learned
    assert result.epochs[-1]["val_perplexity"] is None


def test_hugging_face_gpt2_with_dict_batches_uses_its_own_loss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = pattern_data(32)[:, :T]
    batches = [{"input_ids": b, "labels": b, "attention_mask": torch.ones_like(b)} for b in ids.split(8)]
    seen = []
    model.register_forward_hook(lambda m, a, kw, out: seen.append(out.loss is not None), with_kwargs=True)
    result = run(model, batches, val_data=batches, precision="32-true", epochs=3, lr=3e-3, log_every=1)
    assert all(seen) and result.final_loss < result.history[0]["loss"]
    assert result.epochs[-1]["val_perplexity"] == pytest.approx(torch.tensor(result.epochs[-1]["val_loss"]).exp().item())


def test_torch_nn_transformer_model_trains():
    torch.manual_seed(0)
    result = run(TransformerLM(vocab_size=V), pattern_data(), precision="32-true", max_steps=20, batch_size=16,
                 lr=3e-3, log_every=5)
    assert result.final_loss < result.history[0]["loss"]


# ---- run folder, resume, interrupt ------------------------------------------------------------

def test_run_folder_holds_every_logged_step_and_epochs(tmp_path):
    result = run(tiny(), data(), val_data=data(16, seed=2), precision="32-true", epochs=2, batch_size=8,
                 log_every=3, run_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps] == [3, 6, 8, 9, 12, 15, 16]
    assert steps == result.history
    assert {"loss", "lr", "grad_norm", "loss_scale", "skipped", "skipped_steps", "tokens_per_s", "epoch"} <= set(steps[0])
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["val_loss"] > 0 for e in epochs)
    assert (tmp_path / "checkpoints" / "latest.pt").is_file() and (tmp_path / "checkpoints" / "best.pt").is_file()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_resume_is_bit_exact(tmp_path, precision):
    straight = tiny()
    run(straight, data(), precision=precision, device="cpu", max_steps=12, batch_size=8)
    resumed = tiny()
    run(resumed, data(), precision=precision, device="cpu", max_steps=5, batch_size=8, run_dir=tmp_path)
    fresh = tiny(seed=123)  # resuming must not depend on the new model's initial weights
    result = run(fresh, data(), precision=precision, device="cpu", max_steps=12, batch_size=8,
                 resume_from=tmp_path, run_dir=tmp_path, log_every=1)
    assert result.global_step == 12 and [h["step"] for h in result.history][-7:] == list(range(6, 13))
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), fresh.parameters()))


def test_resume_with_a_shuffling_dataloader_is_bit_exact(tmp_path):
    def loader():
        return DataLoader(TensorDataset(data()), batch_size=8, shuffle=True)

    def collate_free(model, batch):
        (x,) = batch
        return nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    straight, resumed = tiny(), tiny()
    torch.manual_seed(7)
    run(straight, loader(), precision="32-true", max_steps=11, loss_fn=collate_free, seed=7)
    run(resumed, loader(), precision="32-true", max_steps=3, loss_fn=collate_free, seed=7, run_dir=tmp_path)
    run(resumed, loader(), precision="32-true", max_steps=11, loss_fn=collate_free, seed=7, resume_from=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def test_keyboard_interrupt_returns_partial_result_with_checkpoint(tmp_path):
    class StopAt3:
        def on_step_end(self, trainer, metrics):
            if trainer.global_step == 3:
                raise KeyboardInterrupt

    result = run(tiny(), data(), precision="32-true", max_steps=10, batch_size=8, log_every=1,
                 callbacks=[StopAt3()], run_dir=tmp_path)
    assert result.interrupted and result.global_step == 3
    path, state = load_checkpoint(tmp_path)
    assert state["global_step"] == 3 and result.checkpoint_path == str(path)
    again = run(tiny(), data(), precision="32-true", max_steps=10, batch_size=8, resume_from=tmp_path)
    assert again.global_step == 10 and not again.interrupted


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        loss = nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        return loss * float("nan") if len(calls) == 4 else loss

    with pytest.raises(FloatingPointError, match=re.escape("The loss became non-finite at step 4 in 32-true.")):
        run(tiny(), data(), precision="32-true", max_steps=10, batch_size=8, loss_fn=poisoned, log_every=1,
            checkpoint_every=2, run_dir=tmp_path)
    _, state = load_checkpoint(tmp_path)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_truncated_checkpoint_is_an_error_naming_the_file(tmp_path):
    run(tiny(), data(), precision="32-true", max_steps=2, batch_size=8, run_dir=tmp_path)
    path = tmp_path / "checkpoints" / "latest.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=re.escape(f"Checkpoint {str(path)!r} cannot be read; it is truncated or corrupt")):
        run(tiny(), data(), precision="32-true", max_steps=4, batch_size=8, resume_from=path)


def test_checkpoint_of_another_model_is_an_error(tmp_path):
    run(tiny(), data(), precision="32-true", max_steps=2, batch_size=8, run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"does not fit this model"):
        run(example_model("gpt-micro", vocab_size=V), data(), precision="32-true", max_steps=4, batch_size=8,
            resume_from=tmp_path)


def test_resume_with_another_batch_size_is_an_error(tmp_path):
    run(tiny(), data(), precision="32-true", max_steps=2, batch_size=8, run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"was trained with batch_size=8, but this call has batch_size=4"):
        run(tiny(), data(), precision="32-true", max_steps=4, batch_size=4, resume_from=tmp_path)


def test_resume_from_a_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"resume_from={str(tmp_path)!r} is a folder with no checkpoints/latest.pt")):
        run(tiny(), data(), max_steps=1, resume_from=tmp_path)


def test_not_our_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"is not a checkpoint written by utils.training.train"):
        run(tiny(), data(), max_steps=1, resume_from=path)


# ---- callbacks and bad input --------------------------------------------------------------------

def test_callbacks_see_hooks_in_order_with_the_trainer_state():
    events = []

    class Recorder:
        def on_train_start(self, trainer):
            events.append(("start", trainer.global_step, trainer.precision.name))

        def on_step_end(self, trainer, metrics):
            events.append(("step", metrics["step"], trainer.scaler.is_enabled()))

        def on_validation_end(self, trainer, metrics):
            events.append(("val", round(metrics["val_loss"], 3) > 0))

        def on_train_epoch_end(self, trainer, model):
            events.append(("epoch", trainer.current_epoch, model is trainer.model))

        def on_train_end(self, trainer, result):
            events.append(("end", result.global_step))

    run(tiny(), data(32), val_data=data(8), precision="32-true", epochs=1, batch_size=8, log_every=2,
        callbacks=[Recorder()])
    assert events == [("start", 0, "32-true"), ("step", 2, False), ("step", 4, False), ("val", True),
                      ("epoch", 0, True), ("end", 4)]


def test_progress_bar_shows_the_precision_the_steps_and_the_loss(capsys):
    result = run(tiny(), data(16), precision="32-true", max_steps=2, batch_size=8, log_every=1, progress=True)
    bar = capsys.readouterr().err.split("\r")[-1]  # tqdm redraws its line on stderr; the last is final
    assert bar.startswith("train [32-true]: 100%") and "| 2/2 [" in bar
    assert f"loss={result.history[-1]['loss']:.4f}" in bar


def test_no_progress_bar_when_progress_is_off(capsys):
    run(tiny(), data(16), precision="32-true", max_steps=2, batch_size=8, progress=False)
    assert "train [" not in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size=0 is not allowed: it must be an integer >= 1."),
    ({"grad_accum_steps": 0}, "grad_accum_steps=0 is not allowed: it must be an integer >= 1."),
    ({"max_steps": 0}, "max_steps=0 is not allowed: it must be None or an integer >= 1."),
    ({"lr": -1.0}, "lr=-1.0 is not allowed: it must be a number > 0."),
    ({"precision": "fp61"}, "precision='fp61' is not a known precision."),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run(tiny(), data(), **kwargs)


def test_empty_data_is_an_error():
    with pytest.raises(ValueError, match=re.escape("train_data is a tensor of shape (0, 17): expected token ids of shape (N, T)")):
        run(tiny(), torch.zeros(0, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("train_data is empty: it yields no batches.")):
        run(tiny(), [])


def test_token_ids_beyond_the_vocabulary_are_named():
    bad = data()
    bad[3, 5] = V + 7
    with pytest.raises(ValueError, match=re.escape(f"train_data holds token id {V + 7}, outside the model's vocabulary: its input embedding has {V} rows")):
        run(tiny(), bad, batch_size=64)


def test_targets_that_do_not_fit_the_logits_are_named():
    x = data(8)
    with pytest.raises(ValueError, match=re.escape("targets of shape (8, 5) do not fit logits of shape (8, 16, 64)")):
        run(tiny(), [(x[:, :-1], x[:, :5])])


def test_model_without_trainable_parameters_is_an_error():
    model = tiny()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=re.escape("model has no trainable parameters")):
        run(model, data())


def test_throughput_excludes_validation_time(monkeypatch):
    """On a clock the test controls: each training forward takes 1 s, each validation batch 10 s."""
    clock = [0.0]
    for module in (loop_module, meter_module):  # the run's clock and the log window's
        monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class TimedEval(TinyLM):
        def forward(self, x):
            clock[0] += 1.0 if self.training else 10.0
            return super().forward(x)

    torch.manual_seed(0)
    result = run(TimedEval(), data(16), val_data=data(32), precision="32-true", epochs=1, batch_size=8, log_every=1)
    assert result.wall_time_s == 2 + 4 * 10  # 2 training steps, 4 validation batches
    assert result.tokens_per_second == pytest.approx(16 * T / 2)  # 16 sequences of T tokens in 2 s of training
    assert [h["tokens_per_s"] for h in result.history] == pytest.approx([8 * T, 8 * T])


# ---- the Trainer owns its state ---------------------------------------------------------------------
def make_trainer(model, precision, max_steps):
    """A Trainer as train() builds one (no run folder), on the same data and settings."""
    settings = TrainSettings(max_steps=max_steps, batch_size=8, warmup_steps=4, progress=False, log_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)  # fp16 on a CPU; init_scale under 32-true
        plan = resolve_precision(precision, "cpu")
        scaler = plan.make_scaler(init_scale=2.0**8)
    optimizer = default_optimizer(model, settings.lr, settings.weight_decay, "cpu")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / settings.warmup_steps))
    batches = as_batches(data(), settings.batch_size, settings.seed, "train_data")
    return Trainer(model, plan, optimizer, scheduler, scaler, batches, None, settings)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_a_trainer_loaded_from_anothers_state_dict_continues_to_the_uninterrupted_runs_weights(precision):
    torch.manual_seed(5)
    straight = make_trainer(tiny(), precision, max_steps=6)
    straight.fit()  # 6 steps, over the end of the first epoch (8 batches of 8), dropout on
    torch.manual_seed(5)
    first = make_trainer(tiny(), precision, max_steps=3)
    first.fit()
    state = first.state_dict()
    torch.manual_seed(123)  # another RNG state, and other initial weights: load_state_dict must restore both
    second = make_trainer(tiny(seed=9), precision, max_steps=6)
    second.load_state_dict(state)
    assert (second.global_step, second.position.batch_in_epoch) == (3, 3)
    second.fit()
    assert second.global_step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert second.scaler.state_dict() == straight.scaler.state_dict()  # the scale and its growth tracker
    assert second.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
