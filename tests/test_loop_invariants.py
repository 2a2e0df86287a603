"""What the training loop must keep true whatever its internals look like, tested through ``train()``:
clipping sees the true (unscaled) gradients in every precision, and a resumed run is the run that
was never stopped, in its loss scale, growth tracker, learning-rate schedule, skipped-step count, RNG
and weights."""
import math
import warnings

import pytest
import torch
from torch import nn

from utils.training import PrecisionWarning, resolve_precision, train
from utils.training.runs.checkpoint import load_checkpoint

V, T = 64, 16


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def quiet_train(model, data, **kw):
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        return train(model, data, **kw)


def plan_for(precision, device):
    """The plan for an explicit device; fp16/bf16 on a CPU warn that they are slow, which these tests know."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        try:
            return resolve_precision(precision, device=device)
        except ValueError as e:  # bf16 on a GPU without it: the resolver refuses, as it should
            pytest.skip(str(e))


# ---- gradient clipping sees the true (unscaled) gradients in every precision -----------------------------

# One row of inputs, each a multiple of 1/8 (exact in fp16 and bf16). With loss = sum(w · x) / 64
# the gradient is x / 64 whatever the precision, and with w = 0 one SGD step (lr 1) moves w by
# exactly the clipped gradient.
CLIP_X = [((i % 8) - 3.5) / 4 for i in range(64)]  # ±0.125 .. ±0.875
RAW_NORM = math.sqrt(sum((x / 64) ** 2 for x in CLIP_X))  # by hand: sqrt(21) / 64 ≈ 0.0716
# Tolerance: clip_grad_norm_ divides by (norm + 1e-6), 1.4e-5 relative at this norm, and float32
# rounding adds a few 1e-7; the bugs this must see are off by factors of 2**16 (clipping the scaled
# gradient) or RAW_NORM / max_grad_norm (not clipping): 2e-5 relative separates them.
CLIP_REL = 2e-5
ALL_PRECISIONS = ["32-true", "bf16-mixed", "16-mixed"]


def linear_step(precision, device, max_grad_norm):
    """One train() step of a zero-initialized Linear(64 -> 1) under SGD(lr=1); the weight delta and the log."""
    plan = plan_for(precision, device)
    model = nn.Linear(64, 1, bias=False)
    nn.init.zeros_(model.weight)
    x = torch.tensor([CLIP_X])  # (1, 64)

    def loss_fn(net, batch):
        return net(batch).float().sum() / 64  # (1, 1) -> scalar; 65536/64 · 0.875 fits fp16

    result = quiet_train(model, [x], precision=plan, max_steps=1, log_every=1, loss_fn=loss_fn,
                         optimizer=torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=max_grad_norm)
    assert result.skipped_steps == 0, "the step must apply for the delta to mean anything"
    delta = model.weight.detach().double().cpu().flatten()  # it started at zero
    return delta, result.history[0]


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_one_sgd_step_moves_the_weights_by_exactly_max_grad_norm(device, precision):
    c = 2.0 ** -10  # 73x below the gradient's norm
    delta, log = linear_step(precision, device, max_grad_norm=c)
    assert float(delta.norm()) == pytest.approx(c, rel=CLIP_REL)
    # Clipping scales, never turns: the step points down the gradient.
    direction = torch.tensor(CLIP_X, dtype=torch.float64) / math.sqrt(sum(x * x for x in CLIP_X))
    torch.testing.assert_close(delta / delta.norm(), -direction, rtol=0, atol=1e-6)
    # The logged norm is the unscaled one, so fp16 reads as fp32 does (not 65536x more).
    assert log["grad_norm"] == pytest.approx(RAW_NORM, rel=CLIP_REL)


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_max_grad_norm_none_does_not_clip(device, precision):
    delta, log = linear_step(precision, device, max_grad_norm=None)
    assert float(delta.norm()) == pytest.approx(RAW_NORM, rel=CLIP_REL)  # lr 1 · the raw gradient
    assert log["grad_norm"] == pytest.approx(RAW_NORM, rel=CLIP_REL)


@pytest.mark.parametrize("device", DEVICES)
def test_max_grad_norm_above_the_norm_leaves_the_step_alone(device):
    delta, _ = linear_step("16-mixed", device, max_grad_norm=1.0)
    assert float(delta.norm()) == pytest.approx(RAW_NORM, rel=CLIP_REL)


# ---- resume: the run that was never stopped ------------------------------------------------------------

class DropoutLM(nn.Module):
    """Embedding → dropout → head: dropout draws from the RNG at every step, so a resume that does not
    restore the RNG takes other masks and ends on other weights."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 32)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(32, V)

    def forward(self, x):  # (B, T) -> (B, T, V)
        return self.head(self.drop(self.emb(x)))


def model(seed=0):
    torch.manual_seed(seed)
    return DropoutLM()


def token_ids(n=64):
    return torch.randint(0, V, (n, T + 1), generator=torch.Generator().manual_seed(1))


def summed_logits(net, batch):
    """Upstream gradient 1 per logit: times loss scales from 65536 down to a few hundred, the fp16
    backward overflows, so the run starts with a string of skipped steps and a falling scale."""
    return net(batch[:, :-1]).float().sum()


def run_fp16(net, max_steps, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        result = train(net, token_ids(), precision="16-mixed", device="cpu", max_steps=max_steps, batch_size=4,
                       lr=1e-3, warmup_steps=100, loss_fn=summed_logits, log_every=1, progress=False, **kw)
    return result, torch.get_rng_state()


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
    """One uninterrupted fp16 run, and the same run stopped two applied steps after its skips and resumed."""
    straight_dir, resumed_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    probe, _ = run_fp16(model(), max_steps=30)
    skipped = probe.skipped_steps
    assert 2 <= skipped <= 20, f"the setup needs a few skipped steps at the start, got {skipped}"
    stop, total = skipped + 2, skipped + 6  # resume with a growth tracker of 2 and a warm-up in flight
    straight = run_fp16(model(), max_steps=total, run_dir=straight_dir)
    run_fp16(model(), max_steps=stop, run_dir=resumed_dir)
    # A new process would start from other weights and another RNG state: the checkpoint must not care.
    resumed = run_fp16(model(seed=123), max_steps=total, run_dir=resumed_dir, resume_from=resumed_dir)
    return {"skipped": skipped, "stop": stop, "total": total,
            "straight": (*straight, load_checkpoint(straight_dir)[1]),
            "resumed": (*resumed, load_checkpoint(resumed_dir)[1])}


def test_the_resumed_run_counts_the_skipped_steps_of_before(straight_and_resumed):
    runs = straight_and_resumed
    (a, _, _), (b, _, _) = runs["straight"], runs["resumed"]
    assert a.skipped_steps == b.skipped_steps == runs["skipped"]
    assert [h["skipped_steps"] for h in b.history][-4:] == [runs["skipped"]] * 4


def test_the_resumed_run_keeps_the_loss_scale_and_growth_tracker(straight_and_resumed):
    runs = straight_and_resumed
    (a, _, ckpt_a), (b, _, ckpt_b) = runs["straight"], runs["resumed"]
    # Halved once per skipped step, by hand: no step of the resumed run may overflow again.
    assert a.final_loss_scale == b.final_loss_scale == 65536.0 / 2 ** runs["skipped"]
    assert not any(h["skipped"] for h in b.history[-4:])
    # The growth tracker counts the applied steps since the last skip, across the resume.
    assert ckpt_a["scaler"]["_growth_tracker"] == ckpt_b["scaler"]["_growth_tracker"] == runs["total"] - runs["skipped"]
    assert ckpt_a["scaler"] == ckpt_b["scaler"]


def test_the_resumed_run_continues_the_warm_up(straight_and_resumed):
    runs = straight_and_resumed
    (a, _, ckpt_a), (b, _, ckpt_b) = runs["straight"], runs["resumed"]
    applied = runs["total"] - runs["skipped"]
    # Linear warm-up over 100 steps that only applied steps advance: lr = 1e-3 · (applied + 1) / 100.
    assert b.history[-1]["lr"] == a.history[-1]["lr"] == pytest.approx(1e-3 * (applied + 1) / 100, rel=1e-12)
    assert ckpt_a["scheduler"]["last_epoch"] == ckpt_b["scheduler"]["last_epoch"] == applied


def test_the_resumed_run_logs_what_the_straight_run_logged(straight_and_resumed):
    (a, _, _), (b, _, _) = straight_and_resumed["straight"], straight_and_resumed["resumed"]
    keys = ("step", "loss", "lr", "loss_scale", "skipped", "skipped_steps", "grad_norm")

    def logged(history):  # a skipped step's gradient norm is NaN, and NaN != NaN: compare its repr
        return [{k: repr(h[k]) for k in keys} for h in history]

    assert logged(b.history) == logged(a.history)


def test_the_resumed_run_ends_on_the_same_weights_and_rng(straight_and_resumed):
    (a, rng_a, ckpt_a), (b, rng_b, ckpt_b) = straight_and_resumed["straight"], straight_and_resumed["resumed"]
    assert a.global_step == b.global_step == straight_and_resumed["total"]
    assert ckpt_a["model"].keys() == ckpt_b["model"].keys()
    assert all(torch.equal(ckpt_a["model"][k], ckpt_b["model"][k]) for k in ckpt_a["model"])
    assert torch.equal(rng_a, rng_b)  # the same dropout masks were drawn, in the same order


def test_the_resumed_run_moved_the_weights(straight_and_resumed):
    """Guards the test above: equal weights prove nothing if no step after the resume changed them."""
    _, _, ckpt = straight_and_resumed["resumed"]
    start = model().state_dict()
    assert any(not torch.equal(start[k], ckpt["model"][k]) for k in start)
