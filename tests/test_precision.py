import io
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.training import Capabilities, PrecisionPlan, PrecisionWarning, resolve_precision
from utils.training.amp import precision as precision_module
from utils.training.amp.precision import ACCEPTED, ALIASES, CANONICAL, canonical_precision

CPU_BF16 = Capabilities(cpu_bf16=True)
CPU_PLAIN = Capabilities(cpu_bf16=False)
A100 = Capabilities(cuda=True, cuda_count=1, cuda_bf16=True, cuda_name="NVIDIA A100", cpu_bf16=True)
T4 = Capabilities(cuda=True, cuda_count=1, cuda_bf16=False, cuda_name="Tesla T4")
MAC = Capabilities(mps=True)


@pytest.mark.parametrize(
    "alias, expected",
    [
        ("32-true", "32-true"), ("32", "32-true"), (32, "32-true"), ("fp32", "32-true"), ("no", "32-true"),
        ("16-mixed", "16-mixed"), ("16", "16-mixed"), (16, "16-mixed"), ("fp16", "16-mixed"),
        ("bf16-mixed", "bf16-mixed"), ("bf16", "bf16-mixed"), ("BF16", "bf16-mixed"), ("Bf16-Mixed", "bf16-mixed"),
        ("16-true", "16-true"), ("16_true", "16-true"), ("bf16-true", "bf16-true"), ("AUTO", "auto"),
    ],
)
def test_every_alias_maps_to_its_canonical_name(alias, expected):
    assert canonical_precision(alias) == expected


@pytest.mark.parametrize("bad", ["fp8", "bf17", "", "16-mix", True, 8, None, 16.0])
def test_unknown_precision_error_repeats_the_value_and_lists_accepted(bad):
    allowed = ", ".join(repr(a) for a in ACCEPTED)
    with pytest.raises(ValueError, match=re.escape(f"precision={bad!r} is not a known precision. Accepted: {allowed}.")):
        resolve_precision(bad, caps=CPU_BF16)


def test_typo_error_lists_the_canonical_names():
    with pytest.raises(ValueError) as err:
        resolve_precision("bf61-mixed", caps=CPU_BF16)
    for name in CANONICAL:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize(
    "caps, expected, device_type",
    [(A100, "bf16-mixed", "cuda"), (T4, "16-mixed", "cuda"), (CPU_BF16, "bf16-mixed", "cpu"),
     (CPU_PLAIN, "32-true", "cpu"), (MAC, "32-true", "mps")],
)
def test_auto_picks_by_device_and_says_why(caps, expected, device_type):
    plan = resolve_precision("auto", caps=caps)
    assert (plan.name, plan.device_type) == (expected, device_type)
    assert len(plan.reason) > 20


def test_plan_fields_for_fp16_mixed_on_gpu():
    plan = resolve_precision("16-mixed", caps=T4)
    assert plan == PrecisionPlan("16-mixed", "cuda", torch.device("cuda", 0), torch.float16, torch.float32,
                                 True, plan.reason)


@pytest.mark.parametrize("name, autocast, param", [
    ("bf16-mixed", torch.bfloat16, torch.float32), ("bf16-true", None, torch.bfloat16),
    ("16-true", None, torch.float16), ("32-true", None, torch.float32)])
def test_dtypes_of_each_precision(name, autocast, param):
    plan = resolve_precision(name, caps=A100)
    assert (plan.autocast_dtype, plan.param_dtype, plan.use_scaler) == (autocast, param, False)


def test_bf16_on_gpu_without_bf16_names_the_gpu_and_suggests_fp16():
    msg = ("precision='bf16-mixed' needs bf16, which Tesla T4 does not support. "
           "Use precision='16-mixed' (fp16 with a GradScaler) instead.")
    with pytest.raises(ValueError, match=re.escape(msg)):
        resolve_precision("bf16", caps=T4)


def test_fp16_on_cpu_only_runtime_falls_back_to_bf16_with_warning():
    with pytest.warns(PrecisionWarning, match=re.escape("precision='16-mixed' was requested, but this is a CPU-only runtime")) as rec:
        plan = resolve_precision("fp16", caps=CPU_BF16)
    assert plan.name == "bf16-mixed" and not plan.use_scaler
    assert "using 'bf16-mixed' instead" in str(rec[0].message)


def test_fp16_on_cpu_without_native_bf16_falls_back_to_fp32():
    with pytest.warns(PrecisionWarning, match="using '32-true' instead"):
        assert resolve_precision("16-mixed", caps=CPU_PLAIN).name == "32-true"


def test_fp16_on_explicit_cpu_is_honoured_with_slow_warning():
    with pytest.warns(PrecisionWarning, match=re.escape("precision='16-mixed' on device='cpu' is honoured but slow")):
        plan = resolve_precision("16-mixed", device="cpu", caps=CPU_BF16)
    assert (plan.name, plan.use_scaler, plan.autocast_dtype) == ("16-mixed", True, torch.float16)


def test_bf16_on_cpu_without_native_bf16_is_honoured_with_warning():
    with pytest.warns(PrecisionWarning, match="no native bf16"):
        assert resolve_precision("bf16-mixed", caps=CPU_PLAIN).name == "bf16-mixed"


@pytest.mark.parametrize("device, msg", [
    ("cuda", "device='cuda' is not available: this runtime has 0 CUDA device(s)."),
    ("cuda:1", "device='cuda:1' is not available: this runtime has 0 CUDA device(s)."),
    ("mps", "device='mps' is not available: MPS is not present on this runtime."),
    ("gpu", "device='gpu' is not a device."),
])
def test_missing_or_bad_device_is_named(device, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        resolve_precision("auto", device=device, caps=CPU_BF16)


def test_second_gpu_requires_two_gpus():
    with pytest.raises(ValueError, match=re.escape("device='cuda:1' is not available: this runtime has 1 CUDA device(s).")):
        resolve_precision("auto", device="cuda:1", caps=A100)
    two = Capabilities(cuda=True, cuda_count=2, cuda_bf16=True)
    assert resolve_precision("auto", device=torch.device("cuda:1"), caps=two).device == torch.device("cuda", 1)


def test_default_device_prefers_cuda_then_mps_then_cpu():
    assert resolve_precision(caps=Capabilities(cuda=True, cuda_count=1, mps=True)).device_type == "cuda"
    assert resolve_precision(caps=MAC).device_type == "mps"
    assert resolve_precision(caps=CPU_PLAIN).device_type == "cpu"


def test_plan_autocast_really_autocasts_a_matmul_on_cpu():
    plan = resolve_precision("bf16-mixed", device="cpu", caps=CPU_BF16)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with plan.autocast():
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32


def test_fp32_plan_autocast_is_a_no_op():
    with resolve_precision("32-true", caps=CPU_BF16).autocast():
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.float32


def test_make_scaler_is_enabled_only_for_fp16_mixed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        fp16 = resolve_precision("16-mixed", device="cpu", caps=CPU_BF16).make_scaler()
    assert fp16.is_enabled() and fp16.get_scale() == 65536.0
    assert not resolve_precision("bf16", caps=CPU_BF16).make_scaler().is_enabled()


@pytest.mark.parametrize("machine, flags, native", [
    ("x86_64", "fpu avx2 avx512f", False), ("x86_64", "fpu avx2 avx512_bf16", True), ("x86_64", "amx_tile amx_bf16", True),
    ("aarch64", "fp asimd bf16", True), ("aarch64", "fp asimd", False),
])
def test_native_cpu_bf16_is_read_from_the_cpu_flags_and_decides_auto(monkeypatch, machine, flags, native):
    monkeypatch.setattr(precision_module, "open", lambda *a, **k: io.StringIO(f"flags\t: {flags}\n"), raising=False)
    monkeypatch.setattr(precision_module.platform, "machine", lambda: machine)
    precision_module.cpu_bf16_features.cache_clear()
    try:
        caps = Capabilities.detect()
        assert caps.cpu_bf16 is native
        assert resolve_precision("auto", device="cpu").name == ("bf16-mixed" if native else "32-true")
    finally:
        precision_module.cpu_bf16_features.cache_clear()  # the next call reads this machine again


def test_auto_with_no_caps_resolves_what_this_machine_detects():
    caps = Capabilities.detect()
    assert (caps.cuda, caps.cuda_count) == (torch.cuda.is_available(), torch.cuda.device_count())
    plan, by_caps = resolve_precision("auto"), resolve_precision("auto", caps=caps)
    assert (plan.name, plan.device) == (by_caps.name, by_caps.device)


DEVICES = st.one_of(
    st.sampled_from([None, "cpu", "cuda", "mps", torch.device("cpu"), torch.device("mps")]),
    st.integers(0, 4).map(lambda i: f"cuda:{i}"),
    st.integers(0, 4).map(lambda i: torch.device("cuda", i)),
)


def expected_device(device, caps):
    """Where a request should land, by hand; None when the resolver must refuse the device."""
    if device is None:
        return torch.device("cuda", 0) if caps.cuda else torch.device("mps" if caps.mps else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        return torch.device("cuda", index) if index < caps.cuda_count else None
    return None if dev.type == "mps" and not caps.mps else dev


@settings(max_examples=500, deadline=None)
@given(
    request=st.sampled_from(sorted(ALIASES) + [16, 32]),
    cuda_count=st.integers(0, 4), cuda_bf16=st.booleans(), cpu_bf16=st.booleans(), mps=st.booleans(),
    device=DEVICES,
)
def test_resolver_invariants(request, cuda_count, cuda_bf16, cpu_bf16, mps, device):
    caps = Capabilities(cuda=cuda_count > 0, cuda_count=cuda_count, cuda_bf16=cuda_count > 0 and cuda_bf16,
                        cpu_bf16=cpu_bf16, mps=mps)
    where = expected_device(device, caps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        try:
            plan = resolve_precision(request, device=device, caps=caps)
        except ValueError as e:
            if where is None:  # a device that is not there: named, with what there is
                assert f"device={device!r} is not available" in str(e)
                return
            # The only other refusal: bf16 asked for on a GPU without it.
            assert where.type == "cuda" and not caps.cuda_bf16 and "bf16" in str(e)
            return
    assert where is not None, f"device={device!r} should have been refused with {caps}"
    assert plan.device == where and plan.device_type == where.type
    assert plan.name in CANONICAL
    assert plan.use_scaler == (plan.name == "16-mixed")
    assert (plan.autocast_dtype is not None) == plan.name.endswith("-mixed")
    if plan.device_type == "cpu" and device is None:
        assert not plan.name.startswith("16"), "fp16 must never be chosen implicitly on a CPU"
    if plan.device_type == "cuda" and plan.name.startswith("bf16"):
        assert caps.cuda_bf16
    if canonical_precision(request) == "auto":
        assert plan.name == {"cuda": "bf16-mixed" if caps.cuda_bf16 else "16-mixed", "mps": "32-true",
                             "cpu": "bf16-mixed" if cpu_bf16 else "32-true"}[plan.device_type]
    elif plan.device_type != "cpu" or device is not None:  # honoured as asked off the implicit CPU
        assert plan.name == canonical_precision(request)
