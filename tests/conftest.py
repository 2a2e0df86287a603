import os
import sys
import tempfile

import pytest
import wandb_stand_in

# W&B never reaches the network from tests, even when a test forgets mode="offline".
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="wandb-tests-"))


@pytest.fixture
def fake_wandb(monkeypatch):
    """A wandb module with an active run that records every call (tests/wandb_stand_in.py)."""
    module = wandb_stand_in.fake_wandb_module()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module
