"""The one place that decides how a run uses floating-point precision.

Everything else (the training loop, the W&B callback, the benchmark, the notebooks' AMP toggle) asks
:func:`resolve_precision` and acts on the :class:`PrecisionPlan` it returns.

Example::

    >>> plan = resolve_precision("auto")
    >>> plan.name, plan.reason                     # doctest: +SKIP
    ('bf16-mixed', 'bf16 runs natively on this CPU (AVX512-BF16); whether it is faster than fp32 depends on ...')
    >>> scaler = plan.make_scaler()
    >>> with plan.autocast():
    ...     y = model(x)                           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
import warnings
from dataclasses import dataclass, field

import torch

from utils.common.checks import is_int

# Lightning's names, their legacy forms, Accelerate's, and the seed project's.
ALIASES: dict[str, str] = {
    "32-true": "32-true", "32": "32-true", "fp32": "32-true", "float32": "32-true", "no": "32-true",
    "16-mixed": "16-mixed", "16": "16-mixed", "fp16": "16-mixed", "16_mixed": "16-mixed",
    "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed", "bf16_mixed": "bf16-mixed",
    "16-true": "16-true", "16_true": "16-true",
    "bf16-true": "bf16-true", "bf16_true": "bf16-true",
    "auto": "auto",
}
ACCEPTED = tuple(ALIASES) + (32, 16)



@dataclass(frozen=True)
class PrecisionFacts:
    """What a canonical precision means, whatever the machine: the dtype the matmuls run in, the
    dtype the weights are held in, whether forward passes autocast, and whether our loop scales
    the loss (a ``GradScaler``; only ``16-mixed``: fp16 weights, as in ``16-true``, cannot be unscaled)."""

    name: str
    compute_dtype: torch.dtype
    param_dtype: torch.dtype
    autocast: bool
    use_scaler: bool

    @property
    def fp16(self) -> bool:
        """fp16 compute: a narrow range that overflows, so a loss scale (where a trainer keeps one) matters."""
        return self.compute_dtype == torch.float16


FACTS: dict[str, PrecisionFacts] = {f.name: f for f in (
    PrecisionFacts("32-true", torch.float32, torch.float32, autocast=False, use_scaler=False),
    PrecisionFacts("16-mixed", torch.float16, torch.float32, autocast=True, use_scaler=True),
    PrecisionFacts("bf16-mixed", torch.bfloat16, torch.float32, autocast=True, use_scaler=False),
    PrecisionFacts("16-true", torch.float16, torch.float16, autocast=False, use_scaler=False),
    PrecisionFacts("bf16-true", torch.bfloat16, torch.bfloat16, autocast=False, use_scaler=False),
)}
CANONICAL = tuple(FACTS)  # ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


def precision_facts(precision) -> PrecisionFacts:
    """The :class:`PrecisionFacts` of any accepted spelling except ``"auto"`` (which depends on the machine).

    Example::

        >>> precision_facts("bf16").compute_dtype, precision_facts("16_true").fp16
        (torch.bfloat16, True)

    Raises:
        ValueError: an unknown spelling, or ``"auto"``; the message says what to pass instead.
    """
    name = canonical_precision(precision)
    if name == "auto":
        raise ValueError(f"precision={precision!r} has no fixed facts: it depends on the machine. Call "
                         f"resolve_precision({precision!r}) for this machine's plan.")
    return FACTS[name]


def is_emulated(name: str, device_type: str, caps: Capabilities) -> bool:
    """True when ``device_type`` runs ``name``'s compute dtype without native support, so slower
    than fp32: fp16 on a CPU, bf16 on a CPU without native bf16, bf16 on a GPU without it."""
    dtype = FACTS[name].compute_dtype
    if dtype == torch.float32:
        return False
    if device_type == "cpu":
        return dtype == torch.float16 or not caps.cpu_bf16
    return device_type == "cuda" and dtype == torch.bfloat16 and not caps.cuda_bf16


class PrecisionWarning(UserWarning):
    """A precision request was changed, or honoured at a known cost."""


@dataclass(frozen=True)
class Capabilities:
    """What the runtime can do. Injectable so every branch of the resolver runs on any machine."""

    cuda: bool = False
    cuda_count: int = 0
    cuda_bf16: bool = False
    cuda_name: str = ""
    mps: bool = False
    cpu_bf16: bool = False
    cpu_bf16_isa: str = ""  # what gives the CPU its bf16, e.g. "AVX512-BF16, AMX" ("" when unknown)

    @classmethod
    def detect(cls) -> Capabilities:
        cuda = torch.cuda.is_available()
        mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
        return cls(
            cuda=cuda,
            cuda_count=torch.cuda.device_count() if cuda else 0,
            cuda_bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
            cuda_name=torch.cuda.get_device_name() if cuda else "",
            mps=mps,
            cpu_bf16=cpu_has_native_bf16(),
            cpu_bf16_isa=", ".join(cpu_bf16_features()),
        )


# /proc/cpuinfo flag -> its name in the plan's reason
_BF16_FLAGS = {"x86": {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}, "arm": {"bf16": "Arm BF16"}}


@functools.lru_cache(maxsize=1)
def cpu_bf16_features() -> tuple[str, ...]:
    """The CPU features that run bf16 matmuls natively, as the plan names them (``("AVX512-BF16",
    "AMX")``); empty without any, or where there is no cheap probe (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: no cheap probe, so assume no native bf16
        return ()
    arch = "arm" if platform.machine().lower() in ("aarch64", "arm64") else "x86"
    return tuple(name for flag, name in _BF16_FLAGS[arch].items() if flag in flags)


def cpu_has_native_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (x86 AVX512-BF16 or AMX, Arm BF16)."""
    return bool(cpu_bf16_features())


def mixed_precisions_here(caps=None, device=None) -> tuple[str, ...]:
    """Every mixed precision this runtime runs: bf16 on a CPU (native or emulated: a benchmark row's
    reason says which); fp16 on a GPU, and bf16 where the GPU has it. What the notebooks' and
    ``python -m utils.training bench``'s default benchmark compares with ``32-true``.

    Args:
        caps: default :meth:`Capabilities.detect`.
        device: None (the best available) or the device asked for; ``"cpu"`` on a GPU machine
            gives the CPU's answer.

    Example::

        >>> mixed_precisions_here(Capabilities(cuda=True, cuda_count=1, cuda_bf16=True))  # doctest: +SKIP
        ('16-mixed', 'bf16-mixed')
    """
    caps = caps or Capabilities.detect()
    if caps.cuda and (device is None or torch.device(device).type == "cuda"):
        return ("16-mixed", "bf16-mixed") if caps.cuda_bf16 else ("16-mixed",)
    return ("bf16-mixed",)


@dataclass(frozen=True)
class PrecisionPlan:
    """How a run uses precision: what to autocast to, what dtype the weights hold, and why.

    Example::

        >>> plan = resolve_precision("16-mixed", device="cpu")
        >>> scaler = plan.make_scaler()            # GradScaler("cpu", enabled=True)
        >>> with plan.autocast():
        ...     loss = model(x).float().mean()     # doctest: +SKIP
    """

    name: str
    device_type: str
    device: torch.device
    autocast_dtype: torch.dtype | None
    param_dtype: torch.dtype
    use_scaler: bool
    reason: str
    requested: object = field(default="auto", compare=False)
    emulated: bool = field(default=False, compare=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for forward passes; a no-op when there is nothing to autocast."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def make_scaler(self, **kwargs) -> torch.amp.GradScaler:
        """``torch.amp.GradScaler(device_type, enabled=use_scaler, **kwargs)``: a no-op unless ``16-mixed``.

        Example::

            >>> plan = resolve_precision("16-mixed", device="cpu")          # doctest: +SKIP
            >>> plan.make_scaler(init_scale=2.0**10, growth_interval=500).get_scale()   # doctest: +SKIP
            1024.0

        Args:
            **kwargs: GradScaler settings, checked first: ``init_scale`` (> 0, default 2**16),
                ``growth_factor`` (> 1, default 2.0), ``backoff_factor`` (between 0 and 1, default
                0.5), ``growth_interval`` (an integer >= 1, default 2000).

        Raises:
            ValueError: an unknown setting or a bad value; the message names it and what is allowed.

        .. note:: Settings given to a plan without loss scaling are checked, then ignored with a
            :class:`PrecisionWarning`.
        """
        check_scaler_kwargs(kwargs)
        if kwargs and not self.use_scaler:
            warnings.warn(f"GradScaler settings {kwargs} have no effect under {self.name}: it uses no loss "
                          f"scaling (only 16-mixed does).", PrecisionWarning, stacklevel=2)
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler, **kwargs)

    def describe(self) -> str:
        """One line for people: ``"bf16-mixed on cpu: <reason>"``."""
        return f"{self.name} on {self.device}: {self.reason}"


# What each GradScaler setting accepts: (check, what is allowed).
_SCALER_SETTINGS = {
    "init_scale": (lambda v: _is_number(v) and 0 < v < math.inf, "a finite number > 0"),
    "growth_factor": (lambda v: _is_number(v) and 1 < v < math.inf, "a finite number > 1"),
    "backoff_factor": (lambda v: _is_number(v) and 0 < v < 1, "a number between 0 and 1 (exclusive)"),
    "growth_interval": (lambda v: is_int(v, minimum=1), "an integer >= 1"),
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_scaler_kwargs(kwargs: dict) -> None:
    """Check GradScaler settings before torch sees them (torch asserts, or accepts nonsense).

    Raises:
        ValueError: an unknown setting, or a value outside what the setting allows.
    """
    for key, value in kwargs.items():
        if key not in _SCALER_SETTINGS:
            allowed = ", ".join(_SCALER_SETTINGS)
            raise ValueError(f"GradScaler setting {key}={value!r} is not known. Allowed: {allowed}.")
        check, allowed = _SCALER_SETTINGS[key]
        if not check(value):
            raise ValueError(f"GradScaler setting {key}={value!r} is not allowed: it must be {allowed}.")


def canonical_precision(precision) -> str:
    """Map any accepted spelling to its canonical name (or ``"auto"``).

    Raises:
        ValueError: the value is not an accepted spelling; the message lists what is.
    """
    key = None
    if isinstance(precision, bool):  # bool is an int: True must not pass as 1
        key = None
    elif isinstance(precision, int) and precision in (16, 32):
        key = str(precision)
    elif isinstance(precision, str):
        key = precision.strip().lower()
    if key not in ALIASES:
        allowed = ", ".join(repr(a) for a in ACCEPTED)
        raise ValueError(f"precision={precision!r} is not a known precision. Accepted: {allowed}.")
    return ALIASES[key]


def _parse_device(device, caps: Capabilities) -> torch.device:
    if device is None:
        if caps.cuda:
            return torch.device("cuda", 0)
        return torch.device("mps") if caps.mps else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device={device!r} is not a device. Use None (best available), 'cpu', 'cuda', "
            f"'cuda:N', 'mps' or a torch.device."
        ) from e
    if dev.type == "cuda":
        index = dev.index or 0
        if not caps.cuda or index >= caps.cuda_count:
            raise ValueError(
                f"device={device!r} is not available: this runtime has {caps.cuda_count} CUDA device(s)."
            )
        return torch.device("cuda", index)
    if dev.type == "mps" and not caps.mps:
        raise ValueError(f"device={device!r} is not available: MPS is not present on this runtime.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not supported. Use 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return dev


def _auto(device_type: str, caps: Capabilities) -> tuple[str, str]:
    if device_type == "cuda":
        if caps.cuda_bf16:
            return "bf16-mixed", f"{caps.cuda_name or 'This GPU'} supports bf16: same range as fp32, no loss scaling needed."
        return "16-mixed", f"{caps.cuda_name or 'This GPU'} has no bf16, so fp16 autocast with a GradScaler."
    if device_type == "mps":
        return "32-true", "On Apple MPS, autocast gains are inconsistent; fp32 is the safe default (ask for 16-mixed to try it)."
    # Facts only: whether bf16 beats fp32 on a CPU depends on the model (small ones lose to the
    # casts), so speed is left to what measures it (Tier 1's speed check, benchmark_amp).
    if caps.cpu_bf16:
        return "bf16-mixed", (f"bf16 runs natively on this CPU ({caps.cpu_bf16_isa or 'AVX512-BF16/AMX'}); "
                              f"whether it is faster than fp32 depends on the model: Tier 1's speed check and "
                              f"the benchmark measure it.")
    return "32-true", "This CPU has no native bf16 (no AVX512-BF16/AMX): bf16 would be emulated, so fp32."


def _decide(name: str, dev: torch.device, explicit_device: bool, caps: Capabilities) -> tuple[str, str]:
    """Return (canonical name, reason) for a request on a device; warn or raise where it must."""
    if name == "auto":
        return _auto(dev.type, caps)
    if dev.type == "cuda" and name.startswith("bf16") and not caps.cuda_bf16:
        raise ValueError(
            f"precision={name!r} needs bf16, which {caps.cuda_name or 'this GPU'} does not support. "
            f"Use precision='16-mixed' (fp16 with a GradScaler) instead."
        )
    if dev.type == "cpu" and name.startswith("16"):
        if explicit_device:
            warnings.warn(
                f"precision={name!r} on device='cpu' is honoured but slow: fp16 matmuls on a CPU run far "
                f"below fp32 speed. Use 'bf16-mixed' or '32-true' for real work.",
                PrecisionWarning, stacklevel=3,
            )
            return name, "fp16 on the CPU was asked for explicitly (slow; useful to exercise GradScaler)."
        fallback = ("bf16" + name[2:]) if caps.cpu_bf16 else "32-true"
        warnings.warn(
            f"precision={name!r} was requested, but this is a CPU-only runtime where fp16 is far slower "
            f"than fp32; using {fallback!r} instead. Pass device='cpu' to force fp16.",
            PrecisionWarning, stacklevel=3,
        )
        return fallback, f"fp16 was requested on a CPU-only runtime, where it is slow; {fallback} is used instead."
    if dev.type == "cpu" and name.startswith("bf16") and not caps.cpu_bf16:
        warnings.warn(
            f"precision={name!r} is honoured, but this CPU has no native bf16: expect it to be slower "
            f"than '32-true'.", PrecisionWarning, stacklevel=3,
        )
        return name, "bf16 was asked for; this CPU emulates it, so it saves memory but not time."
    return name, f"{name} was asked for and {dev.type} supports it."


def resolve_precision(precision="auto", device=None, *, caps: Capabilities | None = None) -> PrecisionPlan:
    """Decide the precision plan for a run.

    Example::

        >>> resolve_precision("bf16").name
        'bf16-mixed'
        >>> resolve_precision("16-mixed", device="cpu").use_scaler   # honoured, with a warning
        True

    Args:
        precision: ``"auto"`` (default), a Lightning name (``"32-true"``, ``"16-mixed"``,
            ``"bf16-mixed"``, ``"16-true"``, ``"bf16-true"``), a legacy form (``"32"``, ``"16"``,
            ``"bf16"``, ``32``, ``16``), Accelerate's (``"no"``, ``"fp16"``, ``"bf16"``), ``"fp32"``
            or ``"16_true"``; case-insensitive.
        device: None (default: cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"`` or a ``torch.device``.
        caps: the runtime's :class:`Capabilities`; detected when None (tests inject them).

    Raises:
        ValueError: an unknown precision, a device that is not there, or bf16 on a GPU without it.

    .. note::
        fp16 on a CPU-only runtime with ``device=None`` falls back to bf16 (or fp32) with a
        :class:`PrecisionWarning`; with an explicit ``device="cpu"`` it is honoured (and slow).
    """
    name = canonical_precision(precision)
    caps = Capabilities.detect() if caps is None else caps
    dev = _parse_device(device, caps)
    name, reason = _decide(name, dev, device is not None, caps)
    return plan_for(name, dev, reason, requested=precision, emulated=is_emulated(name, dev.type, caps))


def plan_for(name: str, device: torch.device, reason: str, *, requested=None, emulated: bool = False) -> PrecisionPlan:
    """The plan for canonical precision ``name`` on ``device``, without the resolver's checks and warnings.

    For code that measures what a precision *would* do (Tier 1's memory check) where
    :func:`resolve_precision` would warn about its speed; everything else calls the resolver.

    Example::

        >>> plan_for("bf16-mixed", torch.device("cpu"), "measured").autocast_dtype
        torch.bfloat16
    """
    facts = precision_facts(name)
    return PrecisionPlan(
        name=facts.name,
        device_type=device.type,
        device=device,
        autocast_dtype=facts.compute_dtype if facts.autocast else None,
        param_dtype=facts.param_dtype,
        use_scaler=facts.use_scaler,
        reason=reason,
        requested=name if requested is None else requested,
        emulated=emulated,
    )


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
        New code should call :func:`resolve_precision`, which also knows bf16, CPU
        autocast and why it chose what it chose. The string returned here is one it accepts
        (``"16"`` means ``"16-mixed"``, ``"32"`` means ``"32-true"``).
    """
    if use_amp is None:
        return requested_precision
    if use_amp and cuda_available and use_gpu:
        return "16"
    return "32"
