import json

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from utils.models.examples import example_model  # noqa: E402
from utils.training import train  # noqa: E402
from utils.training.runs.curves import plot_training_curves, read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (32, 17))
    result = train(example_model("gpt-micro", n_layer=1), ids, val_data=ids[:8], precision="32-true", epochs=2,
                   batch_size=8, log_every=2, run_dir=folder, progress=False)
    return folder, result


def test_read_metrics_returns_what_the_loop_recorded(fp32_run):
    folder, result = fp32_run
    steps, epochs = read_metrics(folder)
    assert steps == result.history and [e["val_loss"] for e in epochs] == [e["val_loss"] for e in result.epochs]


def test_read_metrics_without_a_log_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        read_metrics(tmp_path)


def test_curves_from_result_and_folder_draw_the_same_points(fp32_run):
    folder, result = fp32_run
    a, b = plot_training_curves(result), plot_training_curves(folder)
    line_a, line_b = a.axes[0].lines[0], b.axes[0].lines[0]
    assert list(line_a.get_ydata()) == list(line_b.get_ydata()) == [h["loss"] for h in result.history]
    assert len(a.axes[0].lines) == 2  # train and val
    assert "No loss scaling" in a.axes[1].texts[0].get_text()


def test_loss_scale_panel_marks_skipped_steps(tmp_path):
    steps = [{"type": "step", "step": s, "loss": 1.0, "loss_scale": sc, "skipped": sk, "skipped_steps": n}
             for s, sc, sk, n in [(1, 32768.0, True, 1), (2, 16384.0, True, 2), (3, 16384.0, False, 2)]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in steps))
    fig = plot_training_curves(tmp_path)
    scale_ax = fig.axes[1]
    assert scale_ax.get_title() == "Loss scale (2 skipped steps)"
    assert list(scale_ax.lines[1].get_xdata()) == [1, 2]


def test_step_axis_has_whole_numbers_only(tmp_path):
    steps = [{"type": "step", "step": s, "loss": 1.0 / s, "loss_scale": None} for s in (10, 11)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in steps))
    ticks = plot_training_curves(tmp_path).axes[0].get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def test_curves_of_a_resumed_run_folder_reach_the_resumed_steps(tmp_path):
    ids = torch.randint(0, 256, (64, 17), generator=torch.Generator().manual_seed(0))

    def run(**kw):
        torch.manual_seed(0)
        return train(example_model("gpt-micro", n_layer=1), ids, precision="32-true", batch_size=8, log_every=2,
                     run_dir=tmp_path, progress=False, **kw)

    first = run(max_steps=4)
    run(max_steps=6, resume_from=tmp_path)
    assert [h["step"] for h in first.history] == [2, 4]  # what the notebook used to draw: no resumed steps
    line = plot_training_curves(tmp_path).axes[0].lines[0]
    assert list(line.get_xdata()) == [2, 4, 6]
