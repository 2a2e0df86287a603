"""AMP end to end through the public API, on the CPU and (where present) on CUDA.

Each case runs the same library code on every device: ``resolve_precision(...).autocast()``,
``plan.make_scaler()`` and ``train()``. The CUDA twins are skipped on a machine without CUDA, and
expectations about precision come from the resolver or injected ``Capabilities``, never from the
machine the suite happens to run on.
"""
import functools
import math
import warnings

import pytest
import torch
from torch import nn

from utils.training import Capabilities, PrecisionWarning, resolve_precision, train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
MIXED = ["16-mixed", "bf16-mixed"]
V, T = 64, 16


def plan_for(precision, device):
    """The plan for an explicit device; fp16/bf16 on a CPU warn that they are slow, which these tests know."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        try:
            return resolve_precision(precision, device=device)
        except ValueError as e:  # bf16 on a GPU without it: the resolver refuses, as it should
            pytest.skip(str(e))


def quiet_train(model, data, **kw):
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        return train(model, data, **kw)


class TinyLM(nn.Module):
    """Embedding → one causal ``nn.TransformerEncoderLayer`` (no dropout) → head."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(V, 32), nn.Embedding(T, 32)
        self.block = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, V)

    def forward(self, x):  # (B, T) -> (B, T, V)
        h = self.emb(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.head(self.block(h, src_mask=mask, is_causal=True))


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def counting_data(n=64):
    """Sequences that count upwards mod V from a random start: learnable in a few dozen steps."""
    start = torch.randint(0, V, (n, 1), generator=torch.Generator().manual_seed(3))
    return (start + torch.arange(T + 1)) % V


# ---- the seed's four cases, on every device ------------------------------------------------------------

class TestAMPIntegration:
    @pytest.mark.parametrize("precision", MIXED)
    @pytest.mark.parametrize("device", DEVICES)
    def test_model_forward_with_autocast(self, device, precision):
        plan = plan_for(precision, device)
        torch.manual_seed(0)
        layer = nn.Linear(64, 32).to(plan.device)
        x = torch.randn(8, 64, device=plan.device)
        with plan.autocast():
            out = layer(x)  # (8, 32)
        assert out.dtype == plan.autocast_dtype
        ref = x.double() @ layer.weight.double().T + layer.bias.double()
        # Rounding x and w to the autocast dtype errs by eps/2 each, so a product by ~eps and the sum
        # by at most eps·Σ|x||w|; the output's own rounding adds eps/2·|out| (fp32 accumulation).
        eps = torch.finfo(plan.autocast_dtype).eps
        bound = eps * (x.double().abs() @ layer.weight.double().abs().T + layer.bias.double().abs()) + eps / 2 * ref.abs()
        assert ((out.double() - ref).abs() <= bound).all()
        # ...and the computation really was in 16 bits: fp32 would be ~1e-7 from the reference.
        assert (out.double() - ref).abs().max() > 1e-5

    @pytest.mark.parametrize("device", DEVICES)
    def test_grad_scaler_basic_workflow(self, device):
        plan = plan_for("16-mixed", device)
        scaler = plan.make_scaler()
        assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16
        layer = nn.Linear(4, 1, bias=False).to(plan.device)
        x = torch.full((1, 4), 0.25, device=plan.device)
        opt = torch.optim.SGD(layer.parameters(), lr=1.0)
        before = layer.weight.detach().clone()
        with plan.autocast():
            loss = layer(x).float().sum() / 1024  # d loss / d w = x / 1024 = 2**-12, exact in fp16
        scaler.scale(loss).backward()
        assert torch.equal(layer.weight.grad, torch.full((1, 4), 2.0 ** 16 * 2.0 ** -12, device=plan.device))
        scaler.unscale_(opt)
        assert torch.equal(layer.weight.grad, torch.full((1, 4), 2.0 ** -12, device=plan.device))
        scaler.step(opt)
        scaler.update()
        assert torch.equal(layer.weight.detach(), before - 2.0 ** -12)
        assert scaler.get_scale() == 2.0 ** 16  # a finite step keeps the scale (growth after 2000)
        # An overflowing step is skipped and halves the scale.
        opt.zero_grad()
        with plan.autocast():
            loss = layer(x).float().sum() * 1e4  # 1e4 · 65536 · 0.25 overflows fp16
        scaler.scale(loss).backward()
        after_first = layer.weight.detach().clone()
        scaler.step(opt)
        scaler.update()
        assert torch.equal(layer.weight.detach(), after_first) and scaler.get_scale() == 2.0 ** 15

    @pytest.mark.parametrize("cpu_bf16", [False, True])
    def test_amp_cpu_fallback(self, cpu_bf16):
        caps = Capabilities(cuda=False, cpu_bf16=cpu_bf16)  # a CPU-only runtime, whatever runs the test
        with pytest.warns(PrecisionWarning, match="CPU-only runtime") as caught:
            plan = resolve_precision("16-mixed", caps=caps)
        fallback = "bf16-mixed" if cpu_bf16 else "32-true"
        assert (plan.name, plan.device_type, plan.use_scaler) == (fallback, "cpu", False)
        assert f"using {fallback!r} instead" in str(caught[0].message)
        assert not plan.make_scaler().is_enabled()
        x = torch.randn(4, 4)
        with plan.autocast():
            assert (x @ x).dtype == (torch.bfloat16 if cpu_bf16 else torch.float32)

    @CUDA
    def test_amp_is_not_downgraded_when_cuda_is_there(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrecisionWarning)  # no fallback, so no warning
            plan = resolve_precision("16-mixed")
        assert (plan.name, plan.device_type, plan.use_scaler) == ("16-mixed", "cuda", True)

    @pytest.mark.parametrize("precision", MIXED)
    @pytest.mark.parametrize("device", DEVICES)
    def test_end_to_end_training_with_amp(self, device, precision):
        plan = plan_for(precision, device)
        amp = quiet_train(tiny_lm(), counting_data(), precision=plan, max_steps=30, batch_size=16, lr=3e-3,
                          log_every=1)
        assert amp.precision.name == precision and amp.skipped_steps == 0
        fp32_drop, amp_drop = fp32_learning(device), window_drop(amp.history)
        noise = batch_noise(tiny_lm(), counting_data(256), batch_size=16)
        # A model that does not learn moves the mean of 5 steps by ~noise·sqrt(2/5): ask for 4 sigma,
        # and for at least half of what fp32 learns from the same start on the same batches.
        assert amp_drop > 4 * noise * math.sqrt(2 / 5)
        assert amp_drop > 0.5 * fp32_drop > 0


@functools.cache
def fp32_learning(device: str) -> float:
    """How far fp32 lowers the loss in the run every AMP run is compared with (computed once per device)."""
    fp32 = quiet_train(tiny_lm(), counting_data(), precision="32-true", device=device, max_steps=30, batch_size=16,
                       lr=3e-3, log_every=1)
    return window_drop(fp32.history)


def window_drop(history, k=5):
    """Mean loss of the first k logged steps minus that of the last k."""
    losses = [h["loss"] for h in history]
    return sum(losses[:k]) / k - sum(losses[-k:]) / k


@torch.no_grad()
def batch_noise(model, data, batch_size):
    """Standard deviation of the loss across batches at fixed weights: the step-to-step noise."""
    losses = [nn.functional.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
              for b in data.split(batch_size)]
    return float(torch.stack(losses).std())
