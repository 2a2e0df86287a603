import os
import tempfile

# W&B never reaches the network from tests, even when a test forgets mode="offline".
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="wandb-tests-"))
