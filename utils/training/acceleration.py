"""The two switches a GPU user tries after AMP: ``torch.compile`` and TF32 matmuls.

``train(..., compile=True, tf32=True)`` and ``benchmark_amp(..., compile=(False, True), tf32=True)``
both come here, so the rules live in one place.

Example::

    >>> model = compile_model(example_model("gpt-micro"), {"backend": "eager"})   # doctest: +SKIP
    >>> tf32_decision("cpu", True)
    (False, 'TF32 off: it is a CUDA feature (compute capability >= 8.0), and the device is cpu.')
    >>> with tf32_matmuls("cuda", True):                                           # doctest: +SKIP
    ...     train(model, ids, precision="32-true")
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from utils.training.precision import PrecisionWarning

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
