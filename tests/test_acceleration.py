"""torch.compile and TF32 switches: one home (utils.training.amp.acceleration), used by train() and the benchmark."""
import re
import subprocess
import sys

import pytest
import torch

from utils.models.examples import example_model
from utils.training import PrecisionWarning, train
from utils.training.amp import acceleration
from utils.training.amp.acceleration import (
    compile_model,
    cpu_allocator_state,
    steady_cpu_allocator,
    tf32_decision,
    tf32_matmuls,
)


def ids(rows=16, seq=17):
    return torch.randint(0, 256, (rows, seq), generator=torch.Generator().manual_seed(0))


def micro():
    torch.manual_seed(0)
    return example_model("gpt-micro", n_layer=1, block_size=16)


def test_train_with_compile_reaches_the_plain_loss_and_keeps_state_dict_keys():
    plain = train(micro(), ids(), max_steps=3, batch_size=4, precision="32-true", device="cpu", progress=False)
    model = micro()
    keys = list(model.state_dict())
    compiled = train(model, ids(), max_steps=3, batch_size=4, precision="32-true", device="cpu", progress=False,
                     compile={"backend": "eager"})
    assert compiled.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    assert list(model.state_dict()) == keys  # compiled in place: no "_orig_mod." prefixes in checkpoints


def test_a_bad_compile_value_repeats_the_call():
    with pytest.raises(ValueError, match=re.escape("compile='inductor' is not allowed: use False, True, or a dict")):
        compile_model(micro(), "inductor")


@pytest.mark.parametrize("device, capability, on", [("cpu", None, False), ("cuda", (7, 5), False),
                                                    ("cuda", (8, 0), True), ("cuda", (9, 0), True)])
def test_tf32_needs_a_cuda_gpu_of_compute_capability_8(device, capability, on):
    got, reason = tf32_decision(device, True, capability=capability)
    assert got is on
    assert reason.startswith("TF32 on" if on else "TF32 off")


def test_tf32_not_requested_stays_off_and_says_so():
    assert tf32_decision("cuda", False, capability=(9, 0)) == (
        False, "TF32 off (not requested): fp32 matmuls run in full fp32.")


def test_tf32_is_switched_on_inside_the_block_and_restored_after():
    before = torch.backends.cuda.matmul.allow_tf32
    with tf32_matmuls("cuda", True, capability=(8, 6)) as on:
        assert on and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_tf32_asked_for_where_it_cannot_apply_warns_and_changes_nothing():
    before = torch.backends.cuda.matmul.allow_tf32
    with pytest.warns(PrecisionWarning, match=re.escape("tf32=True is ignored: TF32 off: this GPU's compute "
                                                        "capability is (7, 5)")):
        with tf32_matmuls("cuda", True, capability=(7, 5)) as on:
            assert not on and torch.backends.cuda.matmul.allow_tf32 == before


def test_train_asked_for_tf32_on_a_cpu_warns_and_trains_in_fp32():
    with pytest.warns(PrecisionWarning, match=re.escape("tf32=True is ignored: TF32 off: it is a CUDA feature")):
        result = train(micro(), ids(), max_steps=1, batch_size=4, precision="32-true", device="cpu",
                       progress=False, tf32=True)
    assert result.precision.name == "32-true" and result.final_loss > 0


def test_the_benchmarks_fp32_row_says_whether_tf32_was_on():
    import warnings

    from utils.training import benchmark_amp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        bench = benchmark_amp(micro, ids(), precisions=("32-true",), steps=1, warmup=0, repeats=1, batch_size=4,
                              device="cpu", max_seconds=0, tf32=True)
    assert bench.row("32-true").reason.endswith(tf32_decision("cpu", True)[1])
    assert bench.settings["tf32"] is True


# ---- steady CPU allocator ----------------------------------------------------------------------

_MAPPED_BYTES = """
import ctypes, sys, torch
from utils.training.amp.acceleration import _glibc, steady_cpu_allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = _glibc()
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "steady":
    assert steady_cpu_allocator()[0]
before = libc.mallinfo2().hblkhd
held = torch.empty(16 * 2**20, dtype=torch.uint8)  # 16 MiB: above glibc's default mmap threshold
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(acceleration._glibc() is None or not hasattr(acceleration._glibc(), "mallinfo2"),
                    reason="glibc >= 2.33 only (mallopt, mallinfo2)")
def test_the_steady_allocator_serves_large_tensors_from_the_heap_not_fresh_mappings():
    def mapped(mode):  # a fresh process each: the setting is process-wide
        out = subprocess.run([sys.executable, "-c", _MAPPED_BYTES, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert mapped("default") >= 16 * 2**20  # glibc's own choice: a fresh mmap, unmapped again on free
    assert mapped("steady") == 0


def test_the_steady_allocator_changes_nothing_where_it_cannot_and_says_why(monkeypatch):
    class Refusing:
        def mallopt(self, param, value):
            return 0

    assert steady_cpu_allocator(libc=Refusing()) == (False, "allocator unchanged: glibc's mallopt refused the settings.")
    monkeypatch.setattr(acceleration, "_glibc", lambda: None)
    monkeypatch.setattr(acceleration, "_allocator", {"state": "default"})  # whatever ran before in this process
    applied, reason = steady_cpu_allocator()
    assert not applied and reason.startswith("allocator unchanged: mallopt is a glibc (Linux) feature")
    assert cpu_allocator_state() == "default"
