"""Tier 1's costs: the memory a training step needs against the device's, and inference latency
under fp32 and the AMP plan.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch
from torch import nn

from utils.common.figures import new_figure
from utils.models.calls import ModelCall, preserved_state
from utils.models.profile import ModelProfile
from utils.models.sizes import model_device
from utils.models.tasks import TaskInfo, task_logits
from utils.tiers.inputs import DEFAULT_BATCH_SIZES, checked_inputs
from utils.tiers.report import Check
from utils.training.amp.measure import runs_natively, saved_tensor_bytes, synchronize
from utils.training.amp.precision import PrecisionPlan, plan_for, precision_facts, resolve_precision


def check_memory(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    plan: PrecisionPlan | None = None,
    figure: bool = True,
    measured_batch_sizes: tuple[int, ...] | None = None,
    seed: int = 0,
    task=None,
    profile: ModelProfile | None = None,
) -> Check:
    """Parameters, gradients, Adam state and activations, by batch size and by precision.

    ``measured_batch_sizes`` (default: all of ``batch_sizes``) are measured in fp32; the others are
    scaled from the largest measured one by the batch ratio (activations are per sample).

    Activations are the tensors autograd saves for backward in one train-mode forward at full
    length, measured with ``saved_tensors_hooks`` (so it works on any device). fp32 is measured at
    every batch size; the 16-bit comparison (``plan`` when it autocasts, else ``bf16-mixed``) is
    measured at batches 1 and 2 of a short length and scaled to fp32's sizes (16-bit is slow on most CPUs). Fails when fp32 training at the smallest
    batch size would not fit the device's memory.

    Example::

        >>> check_memory(example_model("gpt-micro")).details["activation_bytes"]["32-true"]   # doctest: +SKIP
        {1: 1703936, 2: 3407872, 4: 6815744}
    """
    spec, info, calling = checked_inputs(model, profile, task, vocab_size, max_seq_len, f"check_memory({type(model).__name__})")
    gen = torch.Generator().manual_seed(seed)
    # parameters() yields a tied weight once, so it is counted once.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    fp32_plan = _measuring_plan("32-true", spec.device)
    measured = {b: _activation_bytes(model, spec.random_ids(b, spec.max_seq_len, gen), fp32_plan, info, calling)
                for b in (measured_batch_sizes or batch_sizes)}
    fp32 = {b: measured.get(b, _per_sample(measured, b)) for b in batch_sizes}
    activations = {"32-true": fp32}
    # The 16-bit precision worth comparing: the plan's when it autocasts (e.g. 16-mixed on a GPU
    # without bf16), otherwise bf16-mixed, to show what it would save here.
    half = plan.name if plan is not None and plan.autocast_dtype is not None else "bf16-mixed"
    activations[half] = _scaled_activations(model, spec, fp32, _measuring_plan(half, spec.device), gen, info, calling)
    training = {name: {b: _training_bytes(name, trainable, param_bytes + buffer_bytes, act)
                       for b, act in acts.items()} for name, acts in activations.items()}
    available = _device_memory_bytes(spec.device)
    details = {"parameters": sum(p.numel() for p in model.parameters()), "trainable": trainable,
               "fp32_measured_at": sorted(measured),
               "parameter_bytes": param_bytes, "buffer_bytes": buffer_bytes,
               "activation_bytes": activations, "training_bytes_adam": training,
               "device_memory_bytes": available}
    fig = _memory_figure(training) if figure else None
    smallest = training["32-true"][min(batch_sizes)]
    if available and smallest > available:
        return Check("memory_footprint", False,
                     f"fp32 training at batch {min(batch_sizes)} needs about {_mib(smallest)}, more than "
                     f"the {_mib(available)} of {spec.device}.", details, fig)
    big = max(batch_sizes)
    return Check("memory_footprint", True,
                 f"{details['parameters']:,} parameters ({_mib(param_bytes)}); fp32 training with Adam at "
                 f"batch {big} x {spec.max_seq_len} needs about {_mib(training['32-true'][big])}, "
                 f"{half} about {_mib(training[half][big])}.", details, fig)


def _per_sample(measured: dict[int, int], batch_size: int) -> int:
    """Activation bytes at ``batch_size``, scaled from the largest measured batch."""
    b = max(measured)
    return measured[b] * batch_size // b


def _measuring_plan(name: str, device: torch.device) -> PrecisionPlan:
    """``name``'s plan on ``device`` from :func:`plan_for`: the memory check reports what a precision
    would hold on this device even where :func:`resolve_precision` would warn about its speed."""
    return plan_for(name, device, reason="Tier 1's memory check measures it.")


def _scaled_activations(model: nn.Module, spec, fp32: dict, plan: PrecisionPlan, gen, info, calling: ModelCall) -> dict[int, int]:
    """Activation bytes under ``plan``'s autocast, from two short measurements instead of full ones
    (16-bit matmuls can be 100x slower than fp32 on a CPU without native support).

    Batches of 1 and 2 give the per-sample ratio to fp32 and a constant part (the cached 16-bit
    weight copies autocast keeps for backward); fp32's full-size measurements are scaled by them.
    """
    short = spec.random_ids(2, min(spec.max_seq_len, 16), gen)
    fp32_plan = _measuring_plan("32-true", spec.device)
    f1, f2 = (_activation_bytes(model, short[:n], fp32_plan, info, calling) for n in (1, 2))
    l1, l2 = (_activation_bytes(model, short[:n], plan, info, calling) for n in (1, 2))
    ratio = (l2 - l1) / max(f2 - f1, 1)
    constant = max(l1 - ratio * f1, 0)
    return {b: int(ratio * v + constant) for b, v in fp32.items()}


def _activation_bytes(model: nn.Module, ids: torch.Tensor, plan: PrecisionPlan, info: TaskInfo, calling: ModelCall) -> int:
    """Bytes autograd saves in one train-mode forward of ``ids`` to the logits (no loss), parameters
    left out. Autocast's 16-bit weight copies count here too: like activations, they are memory a
    training step holds beyond the weights (the constant part :func:`_scaled_activations` finds)."""
    saved = saved_tensor_bytes(model, ids, plan, loss_fn=lambda m, x: task_logits(m, x, info, calling))
    return saved.activations + saved.weight_copies


def _training_bytes(precision: str, trainable: int, weight_bytes: int, activation_bytes: int) -> int:
    """Weights + gradients + Adam's two moments + activations, for one training step."""
    size = precision_facts(precision).param_dtype.itemsize  # "-true": weights, gradients, moments in 16 bits
    return weight_bytes * size // 4 + trainable * size * 3 + activation_bytes


def _device_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _memory_figure(training: dict):
    fig = new_figure()
    ax = fig.add_subplot()
    for name, by_batch in training.items():
        ax.plot(list(by_batch), [v / 2**20 for v in by_batch.values()], marker="o", label=name)
    _batch_size_axis(ax, [b for by_batch in training.values() for b in by_batch])
    ax.set_ylabel("MiB (weights + grads + Adam + activations)")
    ax.set_title("Training memory by batch size and precision")
    ax.legend()
    return fig


def _batch_size_axis(ax, batch_sizes) -> None:
    """Ticks at the measured batch sizes only (a count has no 1.5); a log2 axis when they span 8x or more."""
    from matplotlib.ticker import NullLocator

    ticks = sorted(set(batch_sizes))
    if ticks[-1] >= 8 * ticks[0]:
        ax.set_xscale("log", base=2)  # 1, 2, 4, ..., 64 evenly spaced instead of crowded at the left
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.xaxis.set_minor_locator(NullLocator())  # the log axis would add unlabelled ticks between
    ax.set_xlabel("batch size")


# ----------------------------------------------------------------------------------------------
# Speed


def check_inference_speed(
    model: nn.Module,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    seq_len: int | None = None,
    plan: PrecisionPlan | None = None,
    repeats: int = 5,
    warmup: int = 1,
    figure: bool = True,
    seed: int = 0,
    task=None,
    profile: ModelProfile | None = None,
) -> Check:
    """Forward latency (median and p95, ms) and throughput (tokens/s) by batch size, in fp32 and
    under ``plan`` (default: ``resolve_precision("auto")`` on the model's device) when it differs.

    Example::

        >>> speed = check_inference_speed(example_model("gpt-micro"), batch_sizes=(1, 8))
        >>> sorted(speed.details["fp32"])
        ['latency_ms_median', 'latency_ms_p95', 'tokens_per_s']

    .. note::
        A ``-true`` plan runs on a copy of the model cast to 16 bits (twice the weights' memory
        for a moment). On a CPU without native bf16, bf16 runs many times slower than fp32: a plan
        whose dtype is emulated on the device is timed at the smallest batch size only, and the
        summary says so.
    """
    spec, info, calling = checked_inputs(model, profile, task, vocab_size, max_seq_len, f"check_inference_speed({type(model).__name__})")
    plan = plan if plan is not None else resolve_precision("auto", device=spec.device)
    t = min(seq_len or 128, spec.max_seq_len)
    gen = torch.Generator().manual_seed(seed)
    inputs = {b: spec.random_ids(b, t, gen) for b in batch_sizes}
    results = {"fp32": _time_forwards(model, inputs, None, repeats, warmup, info, calling)}
    small, big = min(batch_sizes), max(batch_sizes)
    emulated = plan.name != "32-true" and not runs_natively(spec.device, plan.autocast_dtype or plan.param_dtype)
    if plan.name != "32-true":
        target = model if plan.param_dtype == torch.float32 else copy.deepcopy(model).to(plan.param_dtype)
        timed = {small: inputs[small]} if emulated else inputs  # emulated: many times slower, one batch says it
        results[plan.name] = _time_forwards(target, timed, plan, repeats, warmup, info, calling)
    details = {"seq_len": t, "repeats": repeats, "plan": plan.describe(), **results}
    if plan.name != "32-true":
        details["plan_emulated"] = emulated
    fig = _latency_figure(results) if figure else None
    fp32_tps = results["fp32"]["tokens_per_s"][big]
    summary = (f"fp32: {results['fp32']['latency_ms_median'][min(batch_sizes)]:.3g} ms at batch "
               f"{min(batch_sizes)}, {fp32_tps:,.0f} tokens/s at batch {big} (length {t}).")
    if plan.name == "32-true":
        summary += f" The AMP plan is fp32 here: {plan.reason}"
    else:
        at = small if emulated else big
        ratio = results[plan.name]["tokens_per_s"][at] / results["fp32"]["tokens_per_s"][at]
        summary += f" {plan.name}: {ratio:.2f}x fp32's throughput at batch {at}"
        summary += f" (emulated on this {spec.device.type}: timed at batch {small} only)." if emulated else "."
        if ratio < 1:  # a measurement on this model, not a property of the device
            summary += (" Slower than fp32 on this model (inference); benchmark_amp measures training before "
                        "you pick.")
    return Check("inference_speed", True, summary, details, fig)


def _time_forwards(model: nn.Module, inputs: dict, plan: PrecisionPlan | None, repeats: int, warmup: int,
                   info: TaskInfo, calling: ModelCall) -> dict:
    """Forward latency per batch size: ``repeats`` timed calls after ``warmup`` untimed ones, each
    one call between two device synchronizations (``torch.utils.benchmark.Timer.timeit`` would run
    two more untimed calls before each: three times the cost for a large model on a CPU)."""
    device = model_device(model)
    autocast = plan.autocast if plan is not None else (lambda: torch.autocast(device.type, enabled=False))
    lat_median, lat_p95, tps = {}, {}, {}
    with preserved_state(model), torch.inference_mode():
        model.eval()
        for b, ids in inputs.items():
            for _ in range(warmup):
                with autocast():
                    task_logits(model, ids, info, calling)
            times = [_timed_forward(model, ids, info, calling, autocast, device) for _ in range(repeats)]
            median = statistics.median(times)
            lat_median[b], tps[b] = 1e3 * median, ids.numel() / median
            # p95 between samples (inclusive method); with one sample, that sample
            lat_p95[b] = 1e3 * (statistics.quantiles(times, n=20, method="inclusive")[-1] if repeats > 1 else times[0])
    return {"latency_ms_median": lat_median, "latency_ms_p95": lat_p95, "tokens_per_s": tps}


def _timed_forward(model: nn.Module, ids: torch.Tensor, info: TaskInfo, calling: ModelCall, autocast, device: torch.device) -> float:
    """Seconds of one forward, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    with autocast():
        task_logits(model, ids, info, calling)
    synchronize(device)
    return time.perf_counter() - start


def _latency_figure(results: dict):
    fig = new_figure()
    ax = fig.add_subplot()
    for name, r in results.items():
        batches = list(r["latency_ms_median"])
        ax.plot(batches, list(r["latency_ms_median"].values()), marker="o", label=f"{name} median")
        ax.plot(batches, list(r["latency_ms_p95"].values()), linestyle="--", label=f"{name} p95")
    _batch_size_axis(ax, [b for r in results.values() for b in r["latency_ms_median"]])
    ax.set_ylabel("forward latency (ms)")
    ax.set_title("Inference latency by batch size")
    ax.legend()
    return fig
