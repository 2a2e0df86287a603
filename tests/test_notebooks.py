"""The notebooks as files: valid, clean, thin, consistently pinned; their helpers in utils/notebook/cells.py."""
import ast
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import nbformat
import pytest

from utils.notebook import cells as nb
from utils.notebook.project import NOTEBOOKS, REPO_REF, REPO_SLUG, colab_badge, colab_url

ROOT = Path(__file__).resolve().parents[1]
BOOKS = {name: nbformat.read(ROOT / "notebooks" / name, as_version=4) for name in NOTEBOOKS}
REQUIRED_PARAMETERS = {"model_source", "run_dir"}
# How a later cell reads each setting: a notebook shows a field exactly when one of its cells reads it.
SETTING = r'(?:cfg|nb\.need\("settings"\))\.'
READ_BY = {**{k: SETTING + k + r"\b" for k in ("precision", "max_steps", "batch_size", "wandb_mode", "run_dir")},
           "model_source": r"load_settings_model", "model_config": r"load_settings_model",
           "class_name": r"load_settings_model", "task": r"load_settings_data|cfg\.task|\(\"settings\"\)\.task",
           "wandb_mode": SETTING + r"wandb_mode\b|nb\.start_wandb\(",  # start_wandb reads it from the settings
           **{f"bench_{k}": rf'extra\["bench_{k}"\]' for k in ("precisions", "steps", "warmup", "repeats", "max_seconds")}}


def code_cells(book):
    return [c for c in book.cells if c.cell_type == "code"]


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def assigned(source):
    return {t.id for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Assign, ast.For))
            for t in ([node.target] if isinstance(node, ast.For) else node.targets) if isinstance(t, ast.Name)}


def used(source):
    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_stored_clean(name):
    book = BOOKS[name]
    nbformat.validate(book)
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells(book))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_one_parameters_cell_with_the_required_settings_as_colab_fields(name):
    cells = [c for c in code_cells(BOOKS[name]) if "parameters" in tags(c)]
    assert len(cells) == 1
    source = cells[0].source
    assert REQUIRED_PARAMETERS <= assigned(source)
    assignments = [line for line in source.splitlines() if "=" in line]
    assert all("#@param" in line for line in assignments)
    if "precision" in assigned(source):
        assert re.search(r'^precision = "auto"\s+#@param \["auto", "32-true", "bf16-mixed", "16-mixed"\]', source, re.M)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_notebook_shows_exactly_the_settings_it_reads(name):
    cells = code_cells(BOOKS[name])
    i = next(k for k, c in enumerate(cells) if "parameters" in tags(c))
    shown = assigned(cells[i].source)
    later = "\n".join(c.source for c in cells[i + 2:])
    read = {field for field, pattern in READ_BY.items() if re.search(pattern, later)}
    assert shown == read | {"run_dir"}, f"shown but never read: {shown - read - {'run_dir'}}; read but not shown: {read - shown}"
    passed = set(re.findall(r"(\w+)=\1\b", cells[i + 1].source))  # the use_settings(x=x, ...) call
    assert passed == shown


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_sizes_are_auto_and_the_form_says_what_auto_means(name):
    source = next(c for c in code_cells(BOOKS[name]) if "parameters" in tags(c)).source
    for field in ("max_steps", "batch_size", "model_source", "wandb_mode", "bench_precisions", "bench_steps"):
        if field in assigned(source):
            assert re.search(rf'^{field} = "auto"\s+#@param', source, re.M), field
    assert '"auto" sizes a setting for this runtime: on a CPU a small model (example:gpt-micro)' in source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_title_has_the_colab_badge_at_the_pinned_ref(name):
    first = BOOKS[name].cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert colab_badge(name) in first.source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_setup_cell_pins_the_project_and_never_deletes(name):
    setup = code_cells(BOOKS[name])[0].source
    assert f'REPO_SLUG, REPO_REF = "{REPO_SLUG}", "{REPO_REF}"' in setup
    assert 'if "google.colab" in sys.modules:' in setup
    assert "requirements.txt" in setup and "torch" not in setup.replace("# Installs only what Colab lacks (wandb); requirements.txt never names torch.", "")
    assert REPO_REF != "main" and not re.search(r"rmtree|rm -rf|shutil", setup)
    assert "a test keeps" not in setup  # no internal notes in what a user reads
    assert "capture_output=True" in setup and "failed:\\n{clone.stderr.strip()}" in setup  # git's own error


def test_the_setup_cells_clone_failure_shows_gits_own_words(tmp_path, monkeypatch):
    """Run the setup cell as on Colab, with a git that fails: its stderr is in the error."""
    setup = code_cells(BOOKS[NOTEBOOKS[0]])[0].source
    git = tmp_path / "bin" / "git"
    git.parent.mkdir()
    git.write_text("#!/bin/sh\necho 'fatal: Remote branch v0.1.0 not found in upstream origin' >&2\nexit 128\n")
    git.chmod(0o755)
    monkeypatch.setenv("PATH", f"{git.parent}:{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    source = setup.replace('Path("/content")', f"Path({str(tmp_path)!r})")
    with pytest.raises(RuntimeError, match=re.escape(
            f"git clone of {REPO_SLUG} at {REPO_REF} failed:\nfatal: Remote branch v0.1.0 not found in upstream origin")):
        exec(compile(source.split("    # Installs only")[0], "setup", "exec"), {})


def test_readme_badges_point_at_the_pinned_notebooks():
    readme = (ROOT / "README.md").read_text()
    for name in NOTEBOOKS:
        assert colab_url(name) in readme


def test_requirements_never_reinstall_torch_on_colab():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [line for line in lines if re.match(r"torch\b", line)]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_cells_are_thin_and_every_step_is_explained(name):
    cells = BOOKS[name].cells
    for i, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        assert len(cell.source.splitlines()) <= 20, f"cell {i} has {len(cell.source.splitlines())} lines"
        if cell.source.startswith("#@title"):
            assert cells[i - 1].cell_type == "markdown", f"cell {i} ({cell.source.splitlines()[0]}) has no markdown before it"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_needed_step_is_remembered_by_an_earlier_cell(name):
    provided = set()
    for cell in code_cells(BOOKS[name]):
        for step in re.findall(r'nb\.need\("(\w+)"\)', cell.source):
            assert step in provided, f"{step!r} is needed before any cell remembers it"
        provided |= set(re.findall(r'nb\.remember\("(\w+)"', cell.source))
        if "nb.use_settings(" in cell.source:
            provided.add("settings")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_cuda_only_cells_are_leaves(name):
    """Skipping a requires-cuda cell on a CPU must not break a later cell."""
    defined_by_cuda = set()
    for cell in code_cells(BOOKS[name]):
        if "requires-cuda" in tags(cell):
            defined_by_cuda |= assigned(cell.source)
        else:
            assert not (used(cell.source) & defined_by_cuda)


def test_a_cell_run_out_of_order_says_which_cell_to_run(monkeypatch):
    monkeypatch.setattr(nb, "_DONE", {})
    with pytest.raises(nb.RunCellFirst, match=re.escape("Run the settings cell (2. Settings) and the cell after it first.")):
        nb.need("settings")


def test_use_settings_checks_each_value(tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "_DONE", {})
    with pytest.raises(ValueError, match=re.escape("precision='fp61' is not a known precision.")):
        nb.use_settings(precision="fp61", run_dir=str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(
            "wandb_mode='cloud' is not allowed. Use one of 'auto', 'offline', 'online', 'disabled'.")):
        nb.use_settings(wandb_mode="cloud", run_dir=str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(
            "max_steps=0 is not allowed: it must be an integer >= 1, or 'auto' for this runtime's size.")):
        nb.use_settings(max_steps=0, run_dir=str(tmp_path))
    cfg = nb.use_settings(max_steps=5, run_dir=str(tmp_path / "run"), bench_steps=3)
    assert nb.need("settings") is cfg and cfg.run_dir.is_dir() and cfg.extra == {"bench_steps": 3}


def test_ci_overrides_touch_only_the_cells_own_settings():
    spec = importlib.util.spec_from_file_location("nb_conftest", ROOT / "notebooks" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    extra = conftest.ci_overrides('max_steps = 300  #@param {type:"integer"}\nprecision = "auto"', "/tmp/x")
    assert "max_steps = 12" in extra and "bench_steps" not in extra and "run_dir" not in extra


def test_use_settings_reads_model_config_as_json_and_class_name(tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "_DONE", {})
    cfg = nb.use_settings(run_dir=str(tmp_path), model_config='{"n_layer": 1}', class_name=" NanoGPT ")
    assert (cfg.model_config, cfg.class_name) == ({"n_layer": 1}, "NanoGPT")
    assert nb.use_settings(run_dir=str(tmp_path)).model_config == {} and nb.need("settings").class_name is None
    with pytest.raises(ValueError, match=re.escape(
            "model_config='[1]' is not allowed: it must be a JSON object such as '{\"n_layer\": 2}', or empty.")):
        nb.use_settings(run_dir=str(tmp_path), model_config="[1]")


def test_load_settings_model_builds_what_the_settings_name(tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "_DONE", {})
    nb.use_settings(run_dir=str(tmp_path), model_source="example:gpt-micro", model_config='{"n_layer": 1}')
    assert nb.load_settings_model().config.n_layer == 1


def test_cuda_cells_say_they_were_skipped_and_why(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert nb.cuda_missing("10. fp16 on the GPU") == (
        "Skipped 10. fp16 on the GPU: this runtime has no CUDA GPU (torch.cuda.is_available() is False). "
        "On Colab: Runtime > Change runtime type > GPU, then run this cell again.")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert nb.cuda_missing("10. fp16 on the GPU") == ""


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_cuda_cells_check_for_cuda_themselves(name):
    cells = [c for c in code_cells(BOOKS[name]) if "requires-cuda" in tags(c)]
    assert all("if skipped := nb.cuda_missing(" in c.source for c in cells)


def test_the_training_cell_says_what_was_asked_what_runs_and_why():
    import dataclasses

    from utils.training import resolve_precision

    plan = dataclasses.replace(resolve_precision("32-true", "cpu"), reason="fp16 was requested on a CPU-only runtime.")
    assert nb.precision_line("16-mixed", plan) == (
        "Asked for '16-mixed'; running 32-true on cpu: fp16 was requested on a CPU-only runtime.")
    assert nb.precision_line("fp32", plan) == "Asked for 'fp32'; running 32-true on cpu as asked."


def test_notebook_03_trains_a_users_model_file_from_the_settings(tmp_path):
    """One papermill run: a nanoGPT-style file, its config object built from model_config."""
    import shutil

    import torch

    papermill = pytest.importorskip("papermill")
    model_file = shutil.copy(ROOT / "tests" / "user_models.py", tmp_path / "model.py")
    out = tmp_path / "03.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "03_train_amp.ipynb"), str(out), cwd=str(ROOT / "notebooks"), progress_bar=False,
        parameters={"model_source": str(model_file), "class_name": "NanoGPT", "model_config": '{"n_layer": 1}',
                    "precision": "16-mixed", "max_steps": 3, "batch_size": 4, "wandb_mode": "disabled",
                    "run_dir": str(tmp_path / "run")})
    text = {c.source.splitlines()[0]: "".join(o.get("text", "") for o in c.outputs)
            for c in code_cells(nbformat.read(out, as_version=4)) if c.source.startswith("#@title")}
    assert text["#@title 3. Model"].startswith("NanoGPT: ")
    assert text["#@title 7. Train"].startswith("Asked for '16-mixed'; running ")
    assert re.search(r"final loss \d+\.\d{4}, val loss \d+\.\d{4} \(perplexity \d", text["#@title 7. Train"])
    toggle = next(c for c in code_cells(nbformat.read(out, as_version=4)) if c.source.startswith("#@title 5."))
    shown = [o["data"]["text/plain"] for o in toggle.outputs if o.output_type == "display_data"]
    assert len(shown) == 1 and re.match(r"AMP: 16-mixed on a \w+ runtime → ", shown[0])  # the line, not VBox(...)
    assert text["#@title 6. Weights & Biases"].count("W&B: ") == 1
    assert "now at step 23" in text["#@title 9. Resume"]
    if not torch.cuda.is_available():
        assert text["#@title 10. fp16 on the GPU"].strip() == nb.cuda_missing("10. fp16 on the GPU")
        # 4b: the kernel forked two gloo processes that trained the user's file and shows rank 0's result
        ddp = next(c for c in code_cells(nbformat.read(out, as_version=4)) if c.source.startswith("#@title 4b."))
        said = "".join(o.get("text", "") for o in ddp.outputs if o.get("name") == "stdout")
        match = re.fullmatch(r"2 processes, 32-true: final loss (\d+\.\d+) after 3 steps, checkpoint (\S+)\n", said)
        assert match, said
        assert match[2] == str(tmp_path / "run" / "ddp" / "checkpoints" / "latest.pt")
        assert torch.load(match[2], weights_only=True)["world_size"] == 2


def test_use_settings_checks_the_task(tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "_DONE", {})
    with pytest.raises(ValueError, match=re.escape(
            "task='mlm' is not allowed: use 'auto' (detected) or one of 'causal-lm', 'masked-lm', 'classifier', "
            "'seq2seq', 'non-token'.")):
        nb.use_settings(task="mlm", run_dir=str(tmp_path))
    assert nb.use_settings(run_dir=str(tmp_path)).task is None  # "auto": detected
    assert nb.use_settings(task="masked-lm", run_dir=str(tmp_path)).task == "masked-lm"


def test_load_settings_data_gives_a_classifier_labelled_topics(tmp_path, monkeypatch):
    from utils.models.examples import example_model

    monkeypatch.setattr(nb, "_DONE", {})
    nb.use_settings(run_dir=str(tmp_path))
    data = nb.load_settings_data(example_model("encoder-classifier", num_classes=4), max_context=16)
    inputs, labels = data.train
    assert inputs.shape[1] == 16 and labels.shape == (inputs.shape[0],) and set(labels.tolist()) == {0, 1, 2, 3}
    assert data.description.startswith("classifier (one output per sequence, logits (2, 4)): which part of")


def test_load_settings_data_says_plainly_a_non_token_model_takes_no_token_ids(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from task_models import PatchClassifier

    monkeypatch.setattr(nb, "_DONE", {})
    nb.use_settings(run_dir=str(tmp_path))
    with pytest.raises(ValueError, match=re.escape("3. Model: PatchClassifier is not a token model")):
        nb.load_settings_data(PatchClassifier())


def test_notebook_03s_cells_train_a_bidirectional_model_as_a_masked_lm(tmp_path, monkeypatch):
    """The calls notebook 03's cells 2-9 make, on a BERT-like encoder file: the task is detected, its
    objective used, and the resume continues it (the papermill runs above already drive the cells)."""
    from utils.data import head
    from utils.training import train

    monkeypatch.setattr(nb, "_DONE", {})
    cfg = nb.use_settings(model_source=str(ROOT / "tests" / "task_models.py"), class_name="BidirectionalMLM",
                          precision="32-true", max_steps=3, batch_size=4,
                          run_dir=str(tmp_path / "run"))  # wandb_mode "auto": WANDB_MODE left as it is
    model = nb.remember("model", nb.load_settings_model())
    data = nb.load_settings_data(model)
    assert data.description.startswith("masked-lm (changing the last token changes earlier positions")
    first = train(model, data.train, val_data=head(data.val, 256), precision=cfg.precision, max_steps=cfg.max_steps,
                  batch_size=cfg.batch_size, run_dir=cfg.run_dir, log_every=10, overwrite=True, task=cfg.task)
    assert first.objective.startswith("masked-lm: 15% of positions hidden")
    more = train(nb.load_settings_model(), data.train, val_data=head(data.val, 256), precision=first.precision,
                 max_steps=first.global_step + 20, batch_size=cfg.batch_size, run_dir=cfg.run_dir,
                 resume_from=cfg.run_dir, log_every=10, task=cfg.task)
    assert (first.global_step, more.global_step) == (3, 23)
    assert more.objective == first.objective


@pytest.mark.parametrize("cuda, runtime", [(False, "cpu"), (True, "gpu")])
def test_auto_settings_take_this_runtimes_sizes(cuda, runtime, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(nb, "_DONE", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = nb.use_settings(run_dir=str(tmp_path), bench_steps="auto", bench_warmup=0)
    sizes = nb.RUNTIME_SIZES[runtime]
    assert (cfg.model_source, cfg.max_steps, cfg.batch_size) == (sizes["model_source"], sizes["max_steps"],
                                                                 sizes["batch_size"])
    assert cfg.extra == {"bench_steps": sizes["bench_steps"], "bench_warmup": 0}  # a value given stays
    assert nb.RUNTIME_SIZES["cpu"]["model_source"] == "example:gpt-micro"
    assert nb.RUNTIME_SIZES["gpu"]["max_steps"] > nb.RUNTIME_SIZES["cpu"]["max_steps"]
    assert nb.use_settings(run_dir=str(tmp_path), max_steps=7, batch_size=3).max_steps == 7  # papermill's values win


def test_auto_bench_precisions_are_fp32_and_every_mixed_precision_the_runtime_runs(monkeypatch):
    from utils.training import Capabilities

    assert nb.mixed_precisions_here(Capabilities(cpu_bf16=False)) == ("bf16-mixed",)  # emulated: still measured
    assert nb.mixed_precisions_here(Capabilities(cpu_bf16=True)) == ("bf16-mixed",)
    assert nb.mixed_precisions_here(Capabilities(cuda=True, cuda_count=1)) == ("16-mixed",)
    assert nb.mixed_precisions_here(Capabilities(cuda=True, cuda_count=1, cuda_bf16=True)) == ("16-mixed", "bf16-mixed")
    monkeypatch.setattr(nb, "mixed_precisions_here", lambda caps=None: ("bf16-mixed",))
    assert nb._sized({"bench_precisions": "auto"}, {})["bench_precisions"] == "32-true,bf16-mixed,auto"


def test_wandb_mode_auto_leaves_the_choice_to_init_wandb(tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "_DONE", {})
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert nb.use_settings(run_dir=str(tmp_path)).wandb_mode == "auto"
    assert "WANDB_MODE" not in os.environ
    nb.use_settings(run_dir=str(tmp_path), wandb_mode="disabled")
    assert os.environ["WANDB_MODE"] == "disabled"


def test_notebook_03_draws_the_curves_again_after_the_resume_from_the_run_folder():
    """The first result stops where training first stopped; the run folder's metrics.jsonl has the resumed
    steps too (the curves of `make demo` stopped at step 150 of 170)."""
    cell = next(c for c in code_cells(BOOKS["03_train_amp.ipynb"]) if c.source.startswith("#@title 9. Resume"))
    assert "plot_training_curves(cfg.run_dir" in cell.source
    assert cell.source.index("resume_from=") < cell.source.index("plot_training_curves(cfg.run_dir")
