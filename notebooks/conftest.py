"""nbval hooks for `pytest --nbval-lax notebooks/`: CI-sized settings, CUDA-only cells skipped off a GPU.

CI sizes are appended to the cell tagged ``parameters`` (as papermill injects parameters), so the
notebooks carry no test-only branches.
"""

import ast
import os
import tempfile

import pytest

# The kernel inherits this environment: W&B never reaches the network from a test run.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="wandb-nbval-"))
os.environ.setdefault("MPLBACKEND", "Agg")

CI_PARAMETERS = {
    "model_source": "example:gpt-micro", "max_steps": 12, "batch_size": 8, "wandb_mode": "offline",
    "bench_precisions": "32-true,bf16-mixed", "bench_steps": 2, "bench_warmup": 1, "bench_repeats": 1,
    "bench_max_seconds": 0,
}


def _tags(cell) -> list:
    return cell.get("metadata", {}).get("tags", [])


def _assigned_names(source: str) -> set:
    # Colab's "#@param" comments are plain comments to Python.
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def ci_overrides(source: str, run_dir: str) -> str:
    """The assignments appended to a parameters cell: only names that cell defines."""
    names = _assigned_names(source)
    values = {**CI_PARAMETERS, "run_dir": run_dir}
    lines = [f"{k} = {v!r}" for k, v in values.items() if k in names]
    return "\n# CI-sized settings, appended by notebooks/conftest.py\n" + "\n".join(lines) + "\n"


def pytest_collection_modifyitems(config, items):
    import torch

    cuda = torch.cuda.is_available()
    runs = tempfile.mkdtemp(prefix="nbval-runs-")
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None:
            continue
        if "requires-cuda" in _tags(cell) and not cuda:
            item.add_marker(pytest.mark.skip(reason="requires-cuda: this runtime has no CUDA device"))
        if "parameters" in _tags(cell):
            notebook = os.path.splitext(os.path.basename(str(item.fspath)))[0]
            cell.source += ci_overrides(cell.source, os.path.join(runs, notebook))
