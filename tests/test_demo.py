"""`make demo` (utils/demo.py): what it tells the user, read back from the files a run wrote.

The notebooks themselves run in tests/test_notebooks.py; here a stand-in writes what they would.
"""
import json
import warnings

from utils import demo
from utils.training import resolve_precision


def write_run(run_dir):
    steps = [{"type": "step", "step": 10, "loss": 3.5, "skipped_steps": 0},
             {"type": "step", "step": 20, "loss": 2.25, "skipped_steps": 1}]
    epochs = [{"type": "epoch", "epoch": 0, "val_loss": 2.5, "val_perplexity": 12.182}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps + epochs))
    rows = [{"precision": "32-true", "step_time_s": 0.0125, "speedup": 1.0, "final_loss": 2.0, "error": None},
            {"precision": "16-mixed", "step_time_s": None, "speedup": None, "final_loss": None,
             "error": "12 of 12 steps were skipped"}]
    (run_dir / "benchmark.json").write_text(json.dumps({"rows": rows}))


def test_summary_reads_the_last_step_the_last_validation_and_each_benchmark_row(tmp_path):
    write_run(tmp_path)
    assert demo.summary(tmp_path) == [
        "training: 20 steps, final train loss 2.2500, skipped steps 1",
        "validation: loss 2.5000, perplexity 12.18",
        "benchmark 32-true: step 12.5 ms, speedup 1.00x, final loss 2.0000",
        "benchmark 16-mixed: 12 of 12 steps were skipped",
    ]


def test_summary_of_an_empty_run_folder_is_empty(tmp_path):
    assert demo.summary(tmp_path) == []


def test_main_runs_every_notebook_with_the_quick_settings_and_prints_the_plan(tmp_path, monkeypatch, capsys):
    seen = {}

    def notebooks(run_dir, parameters, root):  # what papermill would leave behind
        seen.update(parameters=parameters, run_dir=run_dir)
        write_run(run_dir)
        return []

    monkeypatch.setattr(demo, "run_notebooks", notebooks)
    assert demo.main(["--quick", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = resolve_precision("auto")
    assert out.startswith(f"Precision plan for this machine: {plan.describe()}\n")
    assert seen["parameters"] == demo.QUICK_PARAMETERS and seen["run_dir"].parent == tmp_path
    assert "training: 20 steps, final train loss 2.2500, skipped steps 1\n" in out
    assert f"everything is in {seen['run_dir']}/" in out
    assert "  benchmark.json\n" in out and "  metrics.jsonl\n" in out
