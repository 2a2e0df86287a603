"""`python -m utils.training` on encoders, classifiers and models that take no token ids (in process)."""

import re
from pathlib import Path

import pytest

from utils.training import cli

MODELS = str(Path(__file__).with_name("task_models.py"))
FAST = ["--context", "16", "--batch-size", "4", "--max-steps", "2", "--log-every", "1", "--no-progress",
        "--precision", "32-true"]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """12 KB of the bundled text, so a run's validation takes a moment."""
    from utils.data import load_corpus

    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(load_corpus()[:12_000], encoding="utf-8")
    return str(path)


def run(args, capsys):
    status = cli.main(args)
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_trains_a_bidirectional_model_as_a_masked_lm(tmp_path, capsys, small_text):
    status, out, err = run(["train", "--model", MODELS, "--class-name", "BidirectionalMLM", "--data", small_text, *FAST,
                            "--run-dir", str(tmp_path / "mlm")], capsys)
    assert status == 0, err
    assert "objective      masked-lm: 15% of positions hidden (80% -> id 255, 10% random, 10% kept)" in out


def test_cli_trains_a_classifier_on_the_bundled_labelled_topics(tmp_path, capsys):
    status, out, err = run(["train", "--model", "example:encoder-classifier", "--model-config",
                            '{"num_classes": 4, "n_layer": 1, "n_embd": 32}', *FAST,
                            "--run-dir", str(tmp_path / "cls")], capsys)
    assert status == 0, err
    assert "objective      classifier: one label per sequence" in out
    assert re.search(r"val loss +\d+\.\d{4}", out)


def test_cli_says_how_to_fit_a_classifier_to_the_four_topic_groups(tmp_path, capsys):
    status, _, err = run(["train", "--model", "example:encoder-classifier", *FAST,
                          "--run-dir", str(tmp_path / "two")], capsys)
    assert status == 1
    assert err.strip() == (
        "python -m utils.training train: error: The model classifies into 2 classes, but the bundled labelled task "
        "(which part of the Python reference a window comes from) has 4. Build it with 4 classes (num_classes, or "
        "num_labels for Hugging Face).")


def test_cli_tells_a_classifier_that_a_text_file_has_no_labels(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello " * 500)
    status, _, err = run(["train", "--model", "example:encoder-classifier", "--data", str(text), *FAST,
                          "--run-dir", str(tmp_path / "file")], capsys)
    assert status == 1
    assert f"error: --data {text}: the model is a sequence classifier and a text file has no labels." in err


def test_cli_says_plainly_it_takes_token_id_models(tmp_path, capsys):
    status, _, err = run(["train", "--model", MODELS, "--class-name", "PatchClassifier", *FAST,
                          "--run-dir", str(tmp_path / "img")], capsys)
    assert status == 1
    assert err.strip() == (
        "python -m utils.training train: error: --model: PatchClassifier is not a token model: it has no "
        "config.vocab_size and no nn.Embedding. The tiers, evaluate and train on text take models of token ids "
        "(B, T); found instead: PatchClassifier.forward(images); its first layer patches (Conv2d) takes images "
        "(B, 3, H, W). For such a model, call train() with your own batches and loss_fn=. (If it does take "
        "token ids, pass vocab_size=.)")
    assert not (tmp_path / "img").exists()  # a failed call leaves no run folder behind


def test_cli_refuses_next_token_training_of_a_bidirectional_model(tmp_path, capsys):
    status, _, err = run(["train", "--model", MODELS, "--class-name", "BidirectionalMLM", "--task", "causal-lm",
                          *FAST, "--run-dir", str(tmp_path / "leak")], capsys)
    assert status == 1
    assert "error: --task causal-lm: task='causal-lm' is not allowed for BidirectionalMLM" in err


def test_cli_rejects_an_unknown_task(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--model", "example:gpt-micro", "--task", "mlm", "--run-dir", "x"])
    assert exit_info.value.code == 2
    assert "argument --task: invalid choice: 'mlm'" in capsys.readouterr().err


def test_cli_bench_runs_a_masked_lm(capsys, small_text):
    status, out, err = run(["bench", "--model", MODELS, "--class-name", "BidirectionalMLM", "--context", "16",
                            "--data", small_text,
                            "--precisions", "32-true", "--steps", "2", "--warmup", "1", "--repeats", "1",
                            "--batch-size", "4"], capsys)
    assert status == 0, err
    assert "| 32-true" in out
