import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import wandb_stand_in

# W&B never reaches the network from tests, even when a test forgets mode="offline".
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="wandb-tests-"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: two workers on two cores, one thread each
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the subprocesses, notebook kernels, it starts


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n 2 --dist loadgroup`` (``make test``) a file's tests run on one worker, in
    order: its module fixtures are built once, a notebook's cells share one kernel. A test or module
    marked ``xdist_group`` keeps its group: ``"torchrun"`` (launches torchrun: one launch at a time)
    and ``"browser"`` (JupyterLab and Chromium: one at a time)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        path = Path(item.path).resolve()
        browser = path.parent.name == "browser"
        item.add_marker(pytest.mark.xdist_group("browser" if browser else path.relative_to(config.rootpath).as_posix()))


@pytest.fixture
def fake_wandb(monkeypatch):
    """A wandb module with an active run that records every call (tests/wandb_stand_in.py)."""
    module = wandb_stand_in.fake_wandb_module()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module
