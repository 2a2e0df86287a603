"""What a newcomer reads in the first hour: report headlines, plan reasons, the command line's own
words, and the README's order. Each message is pinned by its text."""

import ast
import dataclasses
import inspect
import json
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

import nbformat
import pytest
import torch

from utils.data import load_corpus
from utils.models.examples import example_model
from utils.notebook import cells as nb
from utils.notebook import demo
from utils.notebook.widgets import amp_toggle, explain, toggle_bundle
from utils.tiers.report import Check, Report
from utils.training import Capabilities, TrainSettings, cli, init_wandb, resolve_precision, train
from utils.training.amp.precision import plan_for
from utils.training.benchmark.results import AmpBenchmark, AmpRow, compare_to_baseline


# ---- a report's headline counts what ran -----------------------------------------------------------
def test_a_passed_report_with_a_skipped_check_says_so_in_its_headline():
    report = Report("Tier 2: GPT", [Check("attention_patterns", True, "No attention found", skipped=True),
                                    Check("robustness", True, "fine"), Check("noise", True, "fine"),
                                    Check("batches", True, "fine")])
    assert report.verdict == "PASSED (1 of 4 checks skipped: attention_patterns)"
    assert report.to_markdown().startswith("## Tier 2: GPT: PASSED (1 of 4 checks skipped: attention_patterns)\n")


def test_a_report_where_everything_ran_and_passed_is_a_plain_passed():
    assert Report("Tier 1: GPT", [Check("a", True, "fine"), Check("b", True, "fine")]).verdict == "PASSED"


# ---- a plan claims only what it knows ----------------------------------------------------------------
def test_auto_on_a_cpu_with_native_bf16_states_the_fact_and_claims_no_speed():
    plan = resolve_precision("auto", caps=Capabilities(cpu_bf16=True, cpu_bf16_isa="AVX512-BF16"))
    assert plan.name == "bf16-mixed"
    assert plan.reason == ("bf16 runs natively on this CPU (AVX512-BF16); whether it is faster than fp32 depends "
                           "on the model: Tier 1's speed check and the benchmark measure it.")


def test_auto_on_a_cpu_without_native_bf16_says_bf16_would_be_emulated():
    plan = resolve_precision("auto", caps=Capabilities(cpu_bf16=False))
    assert (plan.name, plan.reason) == (
        "32-true", "This CPU has no native bf16 (no AVX512-BF16/AMX): bf16 would be emulated, so fp32.")


def test_the_toggle_line_follows_the_reason():
    _, line = explain("auto", caps=Capabilities(cpu_bf16=True, cpu_bf16_isa="AMX"))
    assert line.startswith("auto on a CPU runtime → bf16-mixed, because bf16 runs natively on this CPU (AMX);")


def bench_of(*rows):
    compare_to_baseline(list(rows), 0.05)
    return AmpBenchmark(list(rows), "cpu", settings={"loss_tolerance": 0.05})


def timed_row(precision, ms, requested=(), runs=3):
    r = AmpRow(precision, list(requested) or [precision], final_loss=2.0, activation_bytes=1000, reason="why")
    r.set_step_times([[ms / 1e3, ms / 1e3]] * runs, 1)
    return r


def test_when_autos_pick_measured_slower_the_verdict_says_so_and_what_to_pick():
    text = bench_of(timed_row("32-true", 50.0), timed_row("bf16-mixed", 58.0, ["bf16-mixed", "auto"])).recommendation()
    assert text == ("Stay with 32-true: no mixed precision was faster here. auto picks bf16-mixed on this machine, "
                    "but on this model it ran at 0.86x the speed of 32-true: pass precision='32-true' "
                    "(--precision 32-true) where speed matters.")


def test_a_slower_row_that_is_not_autos_pick_keeps_its_reason():
    text = bench_of(timed_row("32-true", 50.0), timed_row("bf16-mixed", 100.0)).recommendation()
    assert text.endswith("bf16-mixed is 2.0x slower (why).") and "auto" not in text


def test_tier1_speed_check_says_when_the_plan_measured_slower_on_the_model(monkeypatch):
    from utils.tiers import memory_speed
    from utils.tiers import tier1 as validation

    monkeypatch.setattr(memory_speed, "_time_forwards", lambda model, inputs, plan, *a: {
        "latency_ms_median": {1: 1.0}, "latency_ms_p95": {1: 1.0},
        "tokens_per_s": {1: 74.0 if plan is not None else 100.0}})
    plan = plan_for("bf16-mixed", torch.device("cpu"), "measured")
    check = validation.check_inference_speed(example_model("gpt-micro", n_layer=1), batch_sizes=(1,), plan=plan,
                                             figure=False)
    # (an emulated bf16, as on a CPU without AVX512-BF16, adds its note between the two)
    assert "bf16-mixed: 0.74x fp32's throughput at batch 1" in check.summary
    assert check.summary.endswith(" Slower than fp32 on this model (inference); benchmark_amp measures training "
                                  "before you pick.")


# ---- quiet, complete notebook and demo outputs ------------------------------------------------------
def test_the_demo_summary_names_a_noisy_row_and_ends_with_the_verdict(tmp_path):
    steady, noisy = timed_row("32-true", 50.0, ["32-true", "auto"]), AmpRow("bf16-mixed", final_loss=2.0)
    noisy.set_step_times([[0.040], [0.050], [0.060]], 1)
    bench = bench_of(steady, noisy)
    (tmp_path / "benchmark.json").write_text(json.dumps(bench.to_dict()))
    lines = demo.summary(tmp_path)
    assert lines[0] == "benchmark 32-true (auto): step 50.0 ms, speedup 1.00x, final loss 2.0000"
    assert lines[1] == ("benchmark bf16-mixed: step 50.0 ms, speedup 1.00x, final loss 2.0000, noisy (runs 20.0% "
                        "apart, IQR / median; speeds not compared)")
    assert lines[2] == f"benchmark verdict: {bench.recommendation()}"
    assert lines[2].startswith("benchmark verdict: The machine was busy")


def test_the_demo_saves_the_settings_it_ran_with_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "run_notebooks", lambda run_dir, parameters, root: [])
    assert demo.main(["--quick", "--runs", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    saved = json.loads((run_dir / demo.SETTINGS_FILE).read_text())
    assert saved["parameters"] == demo.QUICK_PARAMETERS
    assert saved["command"] == "python -m utils.notebook.demo --quick"
    assert saved["precision_plan"].startswith(resolve_precision("auto").name + " on cpu: ")


@pytest.mark.skipif(os.name != "posix", reason="IPC transport needs Unix sockets")
def test_the_demos_kernels_start_without_the_tcp_warning(tmp_path, capfd):
    papermill = pytest.importorskip("papermill")
    source = tmp_path / "in.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")]), source)
    papermill.execute_notebook(str(source), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
                               **demo.kernel_config())
    assert nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0].outputs[0]["text"] == "42\n"
    assert "Kernel is running over TCP" not in capfd.readouterr().err


def test_the_toggle_shows_its_line_as_text_where_no_widget_renders():
    toggle = amp_toggle("32-true", display=False)
    bundle = toggle_bundle(toggle)
    assert bundle["text/plain"] == f"AMP: {toggle.line}"
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == toggle.widget.model_id


def test_the_wandb_cell_gets_its_message_once(tmp_path, monkeypatch):
    """Not logged in: init_wandb warns (for library callers); the notebook prints the message instead."""
    module = types.ModuleType("wandb")
    module.init = lambda mode, **kw: types.SimpleNamespace(dir=str(Path(kw["dir"]) / "wandb" / "offline-run-x" / "files"))
    module.login = lambda prompt=True, verify=True: False
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(nb, "_DONE", {})
    nb.use_settings(run_dir=str(tmp_path / "run"), wandb_mode="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session = nb.start_wandb("amp-tests")
    assert session.mode == "offline" and session.message.startswith("W&B: offline (you are not logged in to W&B;")


def test_wandb_is_started_with_its_own_chatter_silenced(tmp_path, monkeypatch):
    seen = {}
    module = types.ModuleType("wandb")
    module.Settings = lambda **kw: kw
    module.init = lambda mode, **kw: seen.update(kw) or types.SimpleNamespace(
        dir=str(Path(kw["dir"]) / "wandb" / "offline-run-x" / "files"))
    monkeypatch.setitem(sys.modules, "wandb", module)
    init_wandb("amp-tests", mode="offline", run_dir=tmp_path)
    assert seen["settings"] == {"silent": True}


def test_the_training_cells_summary_has_validation_loss_and_perplexity():
    ids = torch.randint(0, 256, (12, 9), generator=torch.Generator().manual_seed(0))
    result = train(example_model("gpt-micro", n_layer=1), ids, val_data=ids[:4], precision="32-true", device="cpu",
                   max_steps=3, batch_size=4, progress=False)
    val = result.epochs[-1]
    assert nb.training_summary(result).startswith(
        f"32-true: final loss {result.final_loss:.4f}, val loss {val['val_loss']:.4f} (perplexity "
        f"{val['val_perplexity']:.2f}, accuracy {val['val_accuracy']:.1%}), 0 skipped steps, ")


# ---- the command line speaks its own words ---------------------------------------------------------
USER_GPT = '''
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GPTConfig:
    n_layer: int = 1
    n_embd: int = 16
    block_size: int = 16
    vocab_size: int = 256


class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.qkv, self.proj = nn.Linear(c.n_embd, 3 * c.n_embd), nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln, self.attn = nn.LayerNorm(c.n_embd), CausalSelfAttention(c)

    def forward(self, x):
        return x + self.attn(self.ln(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte, self.wpe = nn.Embedding(config.vocab_size, config.n_embd), nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.head = nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(x)
'''


@pytest.fixture
def user_gpt(tmp_path):
    path = tmp_path / "mygpt.py"
    path.write_text(USER_GPT)
    text = tmp_path / "text.txt"
    text.write_text(load_corpus()[:4000], encoding="utf-8")
    return path, text


def test_a_near_miss_precision_gets_did_you_mean_and_the_canonical_names_in_two_lines(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", "example:gpt-micro", "--precision", "bf61"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m utils.training train: error: argument --precision: 'bf61' is not a known precision; did you mean "
        "'bf16'? Use one of: auto, 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true (--help lists other spellings)",
        "(`python -m utils.training train --help` lists the options)"]


def test_the_precision_help_lists_the_other_spellings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "auto, 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true; also accepted: 32, fp32, float32, no," in text
    assert ("--class-name NAME the class, builder function or module-level instance of PATH.py or a gist to use "
            "(default: a build_model(), get_model() or create_model() function, else the file's one nn.Module "
            "instance, else the one nn.Module class no other class uses; train's summary says which was used)") in text


def test_a_mistyped_model_file_is_named_as_the_option_with_the_near_miss(user_gpt, capsys):
    path, _ = user_gpt
    typo = path.with_name("mygtp.py")
    assert cli.main(["train", "--model", str(typo), "--run-dir", str(path.parent / "run")]) == 1
    assert capsys.readouterr().err == (f"python -m utils.training train: error: --model {typo}: no such file; did you "
                                       f"mean {path}?\n")


def test_a_warning_names_the_option_on_one_line_without_a_source_line(user_gpt, capsys):
    path, text = user_gpt
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        fallback = resolve_precision("16-mixed").name
    assert cli.main(["train", "--model", str(path), "--data", str(text), "--precision", "16-mixed", "--max-steps", "1",
                     "--batch-size", "2", "--no-progress", "--run-dir", str(path.parent / "run")]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: --precision 16-mixed was requested, but this is a CPU-only runtime where fp16 is far slower than "
        f"fp32; using {fallback!r} instead. Pass --device cpu to force fp16."]


def test_the_summary_says_which_class_was_used_and_continues_with_the_venvs_python(user_gpt, capsys):
    path, text = user_gpt
    run_dir = path.parent / "run"
    assert cli.main(["train", "--model", str(path), "--data", str(text), "--precision", "32-true", "--max-steps", "1",
                     "--batch-size", "2", "--no-progress", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"  final loss     \d+\.\d{4}   val loss \d+\.\d{4} \(perplexity \d+\.\d{2}\)\n", out)
    assert ("  model          built GPT, the one nn.Module class no other class uses (Block, CausalSelfAttention: "
            "parts of others)\n") in out
    assert f"  continue with  {cli.python_command()} -m utils.training train --resume {run_dir} --max-steps N" in out
    objective = next(line for line in out.splitlines() if line.startswith("  objective"))
    assert objective.startswith("  objective      causal-lm: predict the next token [") and "stated" not in objective
    assert json.loads((run_dir / "command.json").read_text())["task"] is None


def test_the_summary_names_the_class_the_option_chose(user_gpt, capsys):
    path, text = user_gpt
    assert cli.main(["train", "--model", str(path), "--class-name", "GPT", "--data", str(text), "--precision",
                     "32-true", "--max-steps", "1", "--batch-size", "2", "--no-progress", "--task", "causal-lm",
                     "--run-dir", str(path.parent / "run")]) == 0
    out = capsys.readouterr().out
    assert "  model          built GPT, the class --class-name GPT names\n" in out
    assert "stated with task=, and the probe agrees]" in out


def test_the_python_to_call_again_is_the_venvs_relative_to_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    assert cli.python_command() == ".venv/bin/python"
    monkeypatch.setattr(sys, "executable", "/opt/py/bin/python3")
    assert cli.python_command() == "/opt/py/bin/python3"


def test_library_words_become_the_options():
    assert cli.cli_words("load_model_from_file('m.py', class_name='GPT'): no such\nclass. Pass class_name= one.") \
        == "--model m.py --class-name GPT: no such class. Pass --class-name one."
    assert cli.cli_words("device='cuda' is not available; task='seq2seq' or max_seq_len=") == \
        "--device cuda is not available; --task seq2seq or --context"


# ---- the README answers the newcomer first -----------------------------------------------------------
README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
CONTRIBUTING = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text(encoding="utf-8")


def test_the_readme_puts_your_own_model_right_after_quick_start_then_the_notebooks_then_reference():
    titles = re.findall(r"^#{1,2} (.+)$", README, re.M)
    assert titles[:5] == ["AMP transformer notebooks", "Quick start", "Bring your own model", "The notebooks", "Reference"]
    reference = titles[titles.index("Reference"):]
    for later in ("How precision is resolved", "Command line", "What each tier checks"):
        assert later in reference


def readme_python() -> str:
    (snippet,) = re.findall(r"```python\n(.*?)```", README, re.S)
    return snippet


def test_the_readmes_python_snippet_calls_the_real_functions_with_their_real_signatures():
    tree = ast.parse(readme_python())
    namespace = {}
    exec(compile(ast.Module([n for n in tree.body if isinstance(n, ast.ImportFrom)], []), "README", "exec"), namespace)
    assert {"load_model_from_file", "run_tier1", "run_tier2", "train", "benchmark_amp"} <= set(namespace)
    returns = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in namespace:
            fn = namespace[node.func.id]
            bound = inspect.signature(fn).bind(*node.args, **{k.arg: k.value for k in node.keywords})  # TypeError if not
            if fn is train:  # its **overrides are TrainSettings fields
                assert set(bound.arguments.get("overrides", {})) <= {f.name for f in dataclasses.fields(TrainSettings)}
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
            fn = namespace[node.value.func.id]
            returns[node.targets[0].id] = typing.get_type_hints(fn).get("return")
    for node in ast.walk(tree):  # tier1.verdict, result.final_loss, bench.recommendation() exist
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in returns:
            cls = returns[node.value.id]
            names = {f.name for f in (dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ())} | set(dir(cls))
            assert node.attr in names, f"{node.value.id}.{node.attr}: {cls.__name__} has no {node.attr}"


def test_contributor_material_lives_in_contributing_not_in_the_readme():
    for word in ("strict_json", "utils/common/lazy.py", "amp_utils", "## Layout"):
        assert word not in README, word
        assert word in CONTRIBUTING, word
    assert "[CONTRIBUTING.md](CONTRIBUTING.md)" in README


def test_the_demo_summary_says_when_autos_pick_ran_slower_and_what_to_pick(tmp_path):
    bench = bench_of(timed_row("32-true", 50.0), timed_row("bf16-mixed", 58.0, ["bf16-mixed", "auto"]))
    (tmp_path / "benchmark.json").write_text(json.dumps(bench.to_dict()))
    lines = demo.summary(tmp_path)
    assert lines[1] == "benchmark bf16-mixed (auto): step 58.0 ms, speedup 0.86x, final loss 2.0000"
    assert lines[2].endswith("auto picks bf16-mixed on this machine, but on this model it ran at 0.86x the speed of "
                             "32-true: pass precision='32-true' (--precision 32-true) where speed matters.")
    assert "auto" in demo.CPU_PARAMETERS["bench_precisions"].split(",")
