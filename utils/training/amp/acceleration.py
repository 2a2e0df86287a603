"""The switches a user tries after AMP: ``torch.compile``, TF32 matmuls, and on a CPU a steady allocator.

``train(..., compile=True, tf32=True)`` and ``benchmark_amp(..., compile=(False, True), tf32=True)``
both come here, so the rules live in one place. :func:`steady_cpu_allocator` is a process-wide
opt-in: call it once, first thing, before a CPU training run or benchmark.

Example::

    >>> model = compile_model(example_model("gpt-micro"), {"backend": "eager"})   # doctest: +SKIP
    >>> tf32_decision("cpu", True)
    (False, 'TF32 off: it is a CUDA feature (compute capability >= 8.0), and the device is cpu.')
    >>> with tf32_matmuls("cuda", True):                                           # doctest: +SKIP
    ...     train(model, ids, precision="32-true")
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import warnings

import torch
from torch import nn

from utils.training.amp.precision import PrecisionWarning

TF32_MIN_CAPABILITY = (8, 0)  # Ampere (A100, RTX 30xx) and later have TF32 tensor cores


def compile_model(model: nn.Module, compile) -> nn.Module:
    """Apply ``torch.compile`` to ``model`` in place (``nn.Module.compile``) and return it.

    In place, so ``state_dict`` keys, checkpoints and the optimizer's parameters stay those of the
    plain model. Compiling happens lazily, in the first forward (the first training step).

    Args:
        model: the module to compile.
        compile: ``False`` (nothing happens), ``True`` (``torch.compile``'s defaults: inductor), or a
            dict of ``torch.compile`` keyword arguments, e.g. ``{"backend": "eager"}`` or
            ``{"mode": "max-autotune"}``.

    Raises:
        ValueError: ``compile`` is neither a bool nor a dict.

    .. note::
        Inductor on a CPU needs a C++ compiler (``g++``/``clang``); without one the first step
        raises a ``torch._dynamo`` ``BackendCompilerFailed``. ``{"backend": "eager"}`` runs
        anywhere (it traces but does not generate code).
    """
    if compile is False:
        return model
    if compile is True:
        options = {}
    elif isinstance(compile, dict):
        options = dict(compile)
    else:
        raise ValueError(f"compile={compile!r} is not allowed: use False, True, or a dict of torch.compile "
                         f"keyword arguments such as {{'backend': 'eager'}}.")
    model.compile(**options)
    return model


def uncompile(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_model`: the module's next forward runs eagerly again.

    ``nn.Module.compile`` keeps the compiled call in ``_compiled_call_impl``; clearing it is the
    one way back that leaves the module (and its ``state_dict``) otherwise as it was.
    """
    model._compiled_call_impl = None
    return model


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def tf32_decision(device, requested: bool, *, capability: tuple[int, int] | None = None) -> tuple[bool, str]:
    """``(on, reason)``: whether fp32 matmuls run in TF32 for ``requested`` on ``device``.

    Args:
        device: where the run happens.
        requested: the caller's ``tf32=`` flag.
        capability: the GPU's compute capability; read from CUDA when None (tests inject it).
    """
    device = torch.device(device)
    if not requested:
        return False, "TF32 off (not requested): fp32 matmuls run in full fp32."
    if device.type != "cuda":
        return False, f"TF32 off: it is a CUDA feature (compute capability >= 8.0), and the device is {device.type}."
    capability = capability or _capability(device)
    if capability is None or tuple(capability) < TF32_MIN_CAPABILITY:
        return False, (f"TF32 off: this GPU's compute capability is {capability}, and TF32 needs >= "
                       f"{TF32_MIN_CAPABILITY[0]}.{TF32_MIN_CAPABILITY[1]} (Ampere or later).")
    return True, (f"TF32 on: fp32 matmuls and convolutions use TF32 tensor cores (compute capability "
                  f"{capability[0]}.{capability[1]}), ~10 mantissa bits instead of 23.")


@contextlib.contextmanager
def tf32_matmuls(device, requested: bool, *, capability: tuple[int, int] | None = None):
    """Turn TF32 on for the block where :func:`tf32_decision` allows it, and restore the flags after.

    Requested where it cannot be honoured, it warns (:class:`PrecisionWarning`) and runs in fp32.
    """
    on, reason = tf32_decision(device, requested, capability=capability)
    if requested and not on:
        warnings.warn(f"tf32=True is ignored: {reason}", PrecisionWarning, stacklevel=3)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if on:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield on
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# glibc's mallopt() parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
STEADY_MMAP_THRESHOLD = 32 * 2**20
_allocator = {"state": "default"}


def _glibc():
    """The C library when it is glibc (it has ``mallopt``), else None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def steady_cpu_allocator(*, libc=None) -> tuple[bool, str]:
    """Keep freed CPU tensor memory inside the process (glibc ``mallopt``), process-wide.

    By default glibc serves each large tensor (over ~128 KiB-32 MiB) with a fresh ``mmap`` and
    returns it on free, so every training step pays page faults for its activations, logits and
    gradients; measured on a 2-core cloud VM with gpt-tiny (batch 8), that made fp32 steps ~20%
    slower and their run-to-run spread 12-22% instead of ~5%. This raises the mmap threshold to
    32 MiB and stops trimming, as PyTorch's CPU performance guide does with jemalloc or tcmalloc:
    the process keeps its peak memory instead of handing it back (as CUDA's caching allocator does).

    Args:
        libc: the C library to configure (tests inject one); default: this process's, when glibc.

    Returns:
        ``(applied, reason)``; ``applied`` is False where the C library is not glibc (macOS,
        Windows, musl), where ``LD_PRELOAD``-ed jemalloc/tcmalloc already do this job.
    """
    libc = _glibc() if libc is None else libc
    if libc is None:
        return False, "allocator unchanged: mallopt is a glibc (Linux) feature, and this C library is not glibc."
    settings = ((_M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, 2**31 - 1),
                (_M_TOP_PAD, 64 * 2**20))
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):
        return False, "allocator unchanged: glibc's mallopt refused the settings."
    _allocator["state"] = "steady"
    return True, ("allocator steady: glibc keeps freed memory (mmap threshold 32 MiB, no trimming), so steps "
                  "stop paying page faults for their tensors.")


def cpu_allocator_state() -> str:
    """``"steady"`` after :func:`steady_cpu_allocator` took effect in this process, else ``"default"``."""
    return _allocator["state"]
