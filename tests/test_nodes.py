"""Past one machine: two torchrun "nodes" (one process each) meeting at a c10d rendezvous on this machine,
as two machines would at the first one's address."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.training.parallel.launch import free_port

ROOT = Path(__file__).resolve().parents[1]


def node_command(port: int, run_dir: Path, strategy: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test-{strategy}",
            "-m", "utils.training", "train", "--model", "example:gpt-micro",
            "--model-config", '{"n_layer": 1, "n_embd": 32, "n_head": 2}', "--context", "16", "--device", "cpu",
            "--precision", "32-true", "--max-steps", "3", "--batch-size", "4", "--log-every", "1",
            "--run-dir", str(run_dir), "--strategy", strategy, "--no-progress"]


# FSDP only: the rendezvous of two agents is what two nodes add, and FSDP also needs both nodes'
# shards in one shared run folder; DDP over two processes is held by test_ddp.py and test_cli.py.
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_two_nodes_on_one_machine_train_together(strategy, tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(node_command(port, tmp_path / "run", strategy), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=240)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    head = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert (head["world_size"], head["global_step"]) == (2, 3)
    assert bool(head["sharded"]) == (strategy == "fsdp")
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["type"] == "step"] == [1, 2, 3]
