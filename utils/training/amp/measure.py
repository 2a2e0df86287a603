"""How the AMP benchmark measures: step clocks, saved-activation bytes, state bytes, matmul ceilings
and model FLOPs. Each works on any device; :func:`utils.training.benchmark_amp` combines them.

Example::

    >>> clock = StepClock(torch.device("cpu"))
    >>> train(model, ids, max_steps=10, log_every=1, callbacks=[clock])   # doctest: +SKIP
    >>> clock.step_times()[5:]                                           # doctest: +SKIP
    [0.031, 0.030, 0.031, 0.030, 0.030]
    >>> saved_tensor_bytes(model, ids[:16], resolve_precision("bf16-mixed"))   # doctest: +SKIP
    SavedBytes(activations=9961472, weight_copies=393216)
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import NamedTuple

import torch
from torch import nn

from utils.models.calls import preserved_state
from utils.models.sizes import find_hidden_size, find_num_layers
from utils.training.amp.precision import Capabilities, PrecisionPlan
from utils.training.batches import move_to
from utils.training.objectives import objective_loss_fn


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock read afterwards means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class StepClock:
    """A ``train()`` callback that stamps the end of every logged step; run with ``log_every=1``.

    On CUDA the stamps are ``torch.cuda.Event`` records, read after the run; elsewhere
    ``time.perf_counter()`` after a device sync. The first interval starts at ``on_train_start``.
    ``optimizer`` keeps the run's optimizer (``train()`` builds it) for :func:`state_bytes`.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.optimizer = None
        self._stamps: list = []

    def _stamp(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        synchronize(self.device)
        return time.perf_counter()

    def on_train_start(self, trainer) -> None:
        self._stamps = [self._stamp()]

    def on_step_end(self, trainer, metrics) -> None:
        self._stamps.append(self._stamp())

    def on_train_end(self, trainer, result) -> None:
        self.optimizer = trainer.optimizer

    def step_times(self) -> list[float]:
        """Seconds between consecutive stamps: one entry per logged step.

        .. note:: On CUDA this synchronizes the device once.
        """
        pairs = list(zip(self._stamps[:-1], self._stamps[1:]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in pairs]  # elapsed_time is in ms
        return [b - a for a, b in pairs]


def state_checksum(state_dict: dict) -> str:
    """A short SHA-256 of a ``state_dict``'s names and bytes: equal checksums, identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors`` (a tied or shared tensor counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[int, int]:
    """``(parameter bytes, optimizer-state bytes)``; tied parameters count once."""
    params = tensor_bytes(model.parameters())
    if optimizer is None:
        return params, 0
    states = [v for s in optimizer.state.values() for k, v in s.items()
              if isinstance(v, torch.Tensor) and k != "step"]  # Adam's step counter is bookkeeping
    return params, tensor_bytes(states)


class SavedBytes(NamedTuple):
    """What one training forward keeps for backward, in bytes, each storage once."""

    activations: int  # tensors computed in the forward (parameters and their copies left out)
    weight_copies: int  # autocast's half-precision copies of parameters (0 in fp32)


def _copies_a_parameter(t: torch.Tensor, params: set[int]) -> bool:
    """True for a dtype cast of a parameter (or a view of one): what autocast makes of a weight."""
    base = t._base if t._base is not None else t
    fn = base.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    leaves = [getattr(f, "variable", None) for f, _ in fn.next_functions if f is not None]
    return any(v is not None and v.untyped_storage().data_ptr() in params for v in leaves)


def saved_tensor_bytes(model: nn.Module, batch, plan: PrecisionPlan, loss_fn=None) -> SavedBytes:
    """Bytes autograd saves for backward in one training forward under ``plan``'s autocast.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``, each storage once. Parameters are
    left out (they exist anyway); the half-precision weight copies autocast makes and saves are
    counted apart, in ``weight_copies``.

    Args:
        model: already on ``plan.device`` (``train()`` leaves it there).
        batch: one batch, as ``train()`` takes it.
        loss_fn: ``loss_fn(model, batch) -> scalar``, as for ``train()``; default: the loop's loss.
            Its result is only dropped, so any forward can be measured: Tier 1's memory check
            passes one that stops at the logits.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations: dict[int, int] = {}
    copies: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kind = copies if _copies_a_parameter(t, params) else activations
            kind[storage.data_ptr()] = storage.nbytes()
        return t

    batch = move_to(batch, plan.device)
    loss_fn = loss_fn or objective_loss_fn(model)  # train()'s objective (masked LM, ...), found before measuring
    with preserved_state(model), torch.enable_grad():
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), plan.autocast():
            loss = loss_fn(model, batch)
        del loss  # frees the graph and what it saved
    return SavedBytes(sum(activations.values()), sum(copies.values()))


def _time_matmul(a: torch.Tensor, b: torch.Tensor, iters: int) -> float:
    synchronize(a.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    synchronize(a.device)
    return (time.perf_counter() - t0) / iters


_PEAKS: dict[tuple[str, torch.dtype], float] = {}


def matmul_peak_flops(device, dtype: torch.dtype, *, target_s: float = 0.05) -> float:
    """The device's matmul ceiling for ``dtype`` in FLOP/s, measured once per process.

    Square matmuls start at 512 (1024 on a GPU) and double, up to 8192 on a GPU and 2048
    elsewhere, until one takes about ``target_s / 8``; then the best of 3 rounds of ``target_s``
    each is kept. Stopping early keeps it quick where a dtype is emulated (bf16 on a CPU without
    AVX512-BF16 runs ~100x below fp32); starting at 512 keeps thread start-up and scheduling
    noise, which dominate small matmuls on a busy CPU, out of the ceiling. Minima throughout,
    because other work on a shared machine only ever makes a matmul slower.
    """
    device = torch.device(device)
    key = (str(device), dtype)
    if key in _PEAKS:
        return _PEAKS[key]
    n, cap = (1024, 8192) if device.type == "cuda" else (512, 2048)
    while True:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        _time_matmul(a, b, 1)  # warm-up: kernel selection, first-touch allocation
        one = min(_time_matmul(a, b, 1) for _ in range(2))
        if one * 8 >= target_s or n >= cap:
            break
        n *= 2
    iters = max(1, math.ceil(target_s / max(one, 1e-9)))
    best = min(_time_matmul(a, b, iters) for _ in range(3))
    _PEAKS[key] = 2 * n**3 / best
    return _PEAKS[key]


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls: all but embedding tables (a lookup is not a matmul),
    unless the table is tied to an output layer. Tied parameters count once."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    used = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(p.numel() for p in model.parameters() if id(p) not in lookups or id(p) in used)


def model_flops_per_step(model: nn.Module, tokens: int, seq_len: int) -> float:
    """Training FLOPs of one step: ``6 × matmul parameters × tokens`` plus attention,
    ``12 × layers × width × seq_len`` per token (PaLM's appendix B, as nanoGPT's ``estimate_mfu``).

    The attention term needs the layer count and width from the model's config
    (:func:`~utils.models.calls.find_num_layers`, :func:`~utils.models.calls.find_hidden_size`: ``n_layer`` /
    ``num_hidden_layers``, ``n_embd`` / ``hidden_size`` / ``d_model``); without them it is left out.
    """
    layers, width = find_num_layers(model), find_hidden_size(model)
    attention = 12 * layers * width * seq_len if layers and width else 0
    return float((6 * matmul_params(model) + attention) * tokens)


def runs_natively(device, dtype: torch.dtype, caps: Capabilities | None = None) -> bool:
    """Whether ``device`` has native matmul kernels for ``dtype``, so a measured ceiling means something.

    fp32 always does; bf16 on a CPU only with AVX512-BF16/AMX/Arm BF16 (``caps.cpu_bf16``), on
    CUDA only where ``caps.cuda_bf16``; fp16 on a CPU is treated as emulated (converted to fp32 per
    kernel on most CPUs). ``caps`` defaults to :meth:`Capabilities.detect` (tests inject them).
    """
    device_type = torch.device(device).type
    if dtype == torch.float32:
        return True
    caps = Capabilities.detect() if caps is None else caps
    if device_type == "cpu":
        return dtype == torch.bfloat16 and caps.cpu_bf16
    if device_type == "cuda":
        return dtype != torch.bfloat16 or caps.cuda_bf16
    return True


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of every ``nn.Linear``, once per distinct shape."""
    return sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)})


def shapes_peak_flops(device, dtype: torch.dtype, shapes: list[tuple[int, int]], tokens: int,
                      *, target_s: float = 0.05) -> float:
    """The best FLOP/s among the model's own matmuls, ``(tokens, in) @ (in, out)`` per shape.

    The fallback ceiling when a model beats the square-matmul one of :func:`matmul_peak_flops`
    (its shapes suit the kernels better). Best of 3 rounds of about ``target_s`` per shape.
    """
    device = torch.device(device)
    best = 0.0
    for n_in, n_out in shapes:
        a = torch.randn(tokens, n_in, device=device).to(dtype)
        b = torch.randn(n_in, n_out, device=device).to(dtype)
        _time_matmul(a, b, 1)  # warm-up
        one = max(_time_matmul(a, b, 1), 1e-9)
        iters = max(1, math.ceil(target_s / one))
        seconds = min(_time_matmul(a, b, iters) for _ in range(3))
        best = max(best, 2 * tokens * n_in * n_out / seconds)
    return best
