"""AMP helpers kept from the seed project, on top of :mod:`utils.training.precision`."""

from __future__ import annotations


def compute_effective_precision(requested_precision, use_amp, cuda_available, use_gpu) -> str:
    """Map the seed's boolean AMP toggle to a legacy precision string.

    This is the boolean-toggle mapping of the seed project, kept exactly:

    - ``use_amp is None``: the toggle is unset, so ``requested_precision`` is returned unchanged;
    - ``use_amp`` true, CUDA available and ``use_gpu`` true: ``"16"`` (fp16 mixed);
    - anything else: ``"32"``.

    Example::

        >>> compute_effective_precision("bf16", use_amp=None, cuda_available=False, use_gpu=False)
        'bf16'
        >>> compute_effective_precision("32", use_amp=True, cuda_available=True, use_gpu=True)
        '16'

    .. note::
        New code should call :func:`utils.training.resolve_precision`, which also knows bf16, CPU
        autocast and why it chose what it chose. The string returned here is one it accepts
        (``"16"`` means ``"16-mixed"``, ``"32"`` means ``"32-true"``).
    """
    if use_amp is None:
        return requested_precision
    if use_amp and cuda_available and use_gpu:
        return "16"
    return "32"
