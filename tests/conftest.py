import os
import sys
import tempfile
from collections import OrderedDict

import pytest
import torch
import wandb_stand_in
from xdist.scheduler import LoadFileScheduling

# W&B never reaches the network from tests, even when a test forgets mode="offline".
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="wandb-tests-"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: two workers on two cores, one thread each
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the subprocesses, notebook kernels, it starts


# Tests that must not run beside each other share one scope under xdist: one worker runs them in turn.
# A new test file that launches torchrun goes in "torchrun".
SHARED_SCOPES = {
    "torchrun": ("tests/test_ddp.py::", "tests/test_cli.py::test_torchrun_", "tests/test_nodes.py::"),  # one torchrun launch at a time
    "browser": ("tests/browser/",),  # one JupyterLab and Chromium at a time
}


# The scopes that take longest (each 15-50 s on a 2-core machine: JupyterLab, process groups, papermill)
# start first, so neither worker is left with one of them at the end while the other idles; the rest
# follow xdist's order (most tests first). `pytest --durations=0` shows when this list needs a change.
LONGEST_FIRST = ("browser", "torchrun", "tests/test_fsdp.py", "tests/test_run_safety.py", "tests/test_notebooks.py",
                 "tests/test_handwritten_models.py", "tests/test_cli.py", "tests/test_launch.py",
                 "notebooks/03_train_amp.ipynb", "tests/test_layout.py", "notebooks/04_benchmark_amp.ipynb",
                 "tests/test_acceleration.py", "tests/test_loop.py", "tests/test_local_use.py")


class ByFile(LoadFileScheduling):
    """``pytest -n 2 --dist loadfile`` (``make test``): a file's tests run on one worker, in order (its
    module fixtures are built once; a notebook's cells share one kernel), and so do the SHARED_SCOPES;
    the LONGEST_FIRST scopes are handed out first."""

    def _split_scope(self, nodeid: str) -> str:
        shared = (scope for scope, prefixes in SHARED_SCOPES.items() if nodeid.startswith(prefixes))
        return next(shared, super()._split_scope(nodeid))

    def _assign_work_unit(self, node) -> None:
        rank = {scope: i for i, scope in enumerate(LONGEST_FIRST)}
        self.workqueue = OrderedDict(sorted(self.workqueue.items(), key=lambda unit: rank.get(unit[0], len(rank))))
        super()._assign_work_unit(node)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    # xdist_group marks would say this, but xdist 3.8's loadgroup cannot rename nodes under pytest 9
    return ByFile(config, log) if config.getvalue("dist") == "loadfile" else None


@pytest.fixture
def fake_wandb(monkeypatch):
    """A wandb module with an active run that records every call (tests/wandb_stand_in.py)."""
    module = wandb_stand_in.fake_wandb_module()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module
