"""`make demo`'s summary, read back from a run folder written by the real writers."""
import json
import warnings

import torch

from utils.models.examples import example_model
from utils.notebook import demo
from utils.notebook.demo import CPU_PARAMETERS, QUICK_PARAMETERS, summary
from utils.training import resolve_precision, train
from utils.training.benchmark.results import AmpBenchmark, AmpRow
from utils.training.settings import TrainSettings


def write_run(run_dir):
    """What the notebooks leave in a run folder, written by the real writers."""
    ids = torch.randint(0, 256, (12, 9), generator=torch.Generator().manual_seed(0))
    result = train(example_model("gpt-micro", n_layer=1), ids, val_data=ids[:4], precision="32-true", device="cpu",
                   max_steps=3, batch_size=4, log_every=1, progress=False, run_dir=run_dir)
    bench = AmpBenchmark(rows=[AmpRow("32-true", step_time_s=0.0125, speedup=1.0, final_loss=2.5),
                               AmpRow("16-mixed", error="fp16 skipped 9 of 10 steps")], device="cpu")
    (run_dir / "benchmark.json").write_text(json.dumps(bench.to_dict()))
    return result


def test_summary_reads_training_validation_and_benchmark(tmp_path):
    result = write_run(tmp_path)

    last, val = result.history[-1], result.epochs[-1]
    assert summary(tmp_path) == [
        f"training: 3 steps, final train loss {last['loss']:.4f}, skipped steps 0",
        f"validation: loss {val['val_loss']:.4f}, perplexity {val['val_perplexity']:.2f}",
        "benchmark 32-true: step 12.5 ms, speedup 1.00x, final loss 2.5000",
        "benchmark 16-mixed: fp16 skipped 9 of 10 steps",
        "benchmark verdict: Stay with 32-true: no mixed precision ran to the end here. 16-mixed failed here: "
        "fp16 skipped 9 of 10 steps.",
    ]


def test_summary_of_a_folder_without_results_is_empty(tmp_path):
    assert summary(tmp_path) == []


def test_demo_sizes_start_from_the_training_settings():
    assert CPU_PARAMETERS["batch_size"] == QUICK_PARAMETERS["batch_size"] == TrainSettings.batch_size
    assert CPU_PARAMETERS["precision"] == TrainSettings.precision == "auto"


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
    assert seen["parameters"] == QUICK_PARAMETERS and seen["run_dir"].parent == tmp_path
    assert "training: 3 steps, final train loss " in out
    assert f"everything is in {seen['run_dir']}/" in out
    assert "  benchmark.json\n" in out and "  metrics.jsonl\n" in out
    assert out.rstrip().endswith(
        "next: make lab  (opens JupyterLab on notebooks/; Run All in each)\n"
        "      your own model: model_source='path/to/model.py' in a notebook's Settings, or "
        "make train ARGS='--model path/to/model.py --run-dir runs/mine'")


def test_next_steps_name_each_offline_wandb_run_to_sync(tmp_path):
    offline = tmp_path / "wandb" / "offline-run-20250101_120000-abcd1234"
    offline.mkdir(parents=True)
    (tmp_path / "wandb" / "offline-run-not-a-folder").write_text("")
    assert demo.next_steps(tmp_path)[-1] == f"      upload the W&B run: wandb sync {offline}"
    assert len(demo.next_steps(tmp_path)) == 3
