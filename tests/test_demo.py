"""`make demo`'s summary, read back from a run folder written by the real writers."""
import json

import torch

from utils.demo import CPU_PARAMETERS, QUICK_PARAMETERS, summary
from utils.models import example_model
from utils.training import train
from utils.training.benchmark.results import AmpBenchmark, AmpRow
from utils.training.settings import TrainSettings


def test_summary_reads_training_validation_and_benchmark(tmp_path):
    ids = torch.randint(0, 256, (12, 9), generator=torch.Generator().manual_seed(0))
    result = train(example_model("gpt-micro", n_layer=1), ids, val_data=ids[:4], precision="32-true", device="cpu",
                   max_steps=3, batch_size=4, log_every=1, progress=False, run_dir=tmp_path)
    bench = AmpBenchmark(rows=[AmpRow("32-true", step_time_s=0.0125, speedup=1.0, final_loss=2.5),
                               AmpRow("16-mixed", error="fp16 skipped 9 of 10 steps")], device="cpu")
    (tmp_path / "benchmark.json").write_text(json.dumps(bench.to_dict()))

    last, val = result.history[-1], result.epochs[-1]
    assert summary(tmp_path) == [
        f"training: 3 steps, final train loss {last['loss']:.4f}, skipped steps 0",
        f"validation: loss {val['val_loss']:.4f}, perplexity {val['val_perplexity']:.2f}",
        "benchmark 32-true: step 12.5 ms, speedup 1.00x, final loss 2.5000",
        "benchmark 16-mixed: fp16 skipped 9 of 10 steps",
    ]


def test_summary_of_a_folder_without_results_is_empty(tmp_path):
    assert summary(tmp_path) == []


def test_demo_sizes_start_from_the_training_settings():
    assert CPU_PARAMETERS["batch_size"] == QUICK_PARAMETERS["batch_size"] == TrainSettings.batch_size
    assert CPU_PARAMETERS["precision"] == TrainSettings.precision == "auto"
