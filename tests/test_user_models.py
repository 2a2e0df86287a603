"""Users' own models in the conventions of hand-written transformers (tests/user_models.py), through
every path: calling, loading from files, the tiers, training, the benchmark, the fp16 scan, the CLI."""
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models import ClosureLM, ModelArgs, NanoConfig, NanoGPT, Transformer, tiny_gpt2

from utils.models.calls import check_context, model_call, predict
from utils.models.sizes import CONTEXT_SEARCH, find_context_length, find_vocab_size
from utils.models.sources import load_model
from utils.models.user_file import load_model_from_file
from utils.tiers.tier1 import run_tier1
from utils.tiers.tier2 import run_tier2
from utils.training import benchmark_amp, cli, evaluate, resolve_precision, train
from utils.training.amp.overflow_scan import scan_fp16_overflow
from utils.training.batches import forward_loss, prepare_batch
from utils.training.benchmark import runner as amp_benchmark_module

USER_MODELS = Path(__file__).with_name("user_models.py")


def nano():
    torch.manual_seed(0)
    return NanoGPT(NanoConfig(n_layer=1))


def llama():
    torch.manual_seed(0)
    return Transformer(ModelArgs(n_layers=1))


def closure():
    torch.manual_seed(0)
    return ClosureLM(n_layer=1)


BUILDERS = {"nano": nano, "llama": llama, "closure": closure}
DATA = torch.randint(0, 256, (16, 17), generator=torch.Generator().manual_seed(0))


# ---- calling conventions ------------------------------------------------------------------------
@pytest.mark.parametrize("build, convention, target_arg", [
    (nano, "targets", "targets"), (llama, "targets", "targets"), (closure, "plain", None),
    (tiny_gpt2, "hugging-face", None),
])
def test_the_convention_is_read_from_forwards_signature(build, convention, target_arg):
    call = model_call(build())
    assert (call.convention, call.target_arg) == (convention, target_arg)


@pytest.mark.parametrize("build", [nano, llama])
def test_predict_gives_every_position_of_a_last_position_model(build):
    model = build().eval()
    ids = DATA[:2, :8]
    assert model(ids)[0].shape[1] == 1 if isinstance(model(ids), tuple) else model(ids).shape[1] == 1
    with torch.no_grad():
        full = model(ids, targets=torch.zeros_like(ids))
        full = full[0] if isinstance(full, tuple) else full
        call = model_call(model)  # held, as a look at the model holds it: what predict learns stays on it
        assert torch.equal(predict(model, ids, call), full)
    assert call.last_position_only is True


def test_the_loop_uses_the_models_own_loss_on_the_real_targets():
    model = nano()
    loss, logits, targets = forward_loss(model, prepare_batch(DATA[:2]))
    _, own = model(DATA[:2, :-1], targets=DATA[:2, 1:])
    assert logits.shape == (2, 16, 256) and torch.equal(targets, DATA[:2, 1:])
    assert torch.allclose(loss, own) and torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)))


class ShortcutWithOtherName(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(256, 8), nn.Linear(8, 256)

    def forward(self, idx, tgt=None):
        x = self.emb(idx)
        return self.head(x if tgt is not None else x[:, -1:])


def test_a_last_position_model_with_an_unknown_targets_name_is_explained():
    with pytest.raises(ValueError, match=re.escape(
            "ShortcutWithOtherName.forward(idx, tgt=None) returned logits of shape (2, 1, 256): one position of 16. "
            "Models that return only the last position's logits unless they get the targets must name that "
            "argument targets, labels, target or y, so the suite can pass it; or return every position's logits.")):
        forward_loss(ShortcutWithOtherName(), prepare_batch(DATA[:2]))


def test_a_dict_batch_for_a_targets_model_names_the_forms_it_takes():
    with pytest.raises(ValueError, match=re.escape(
            "NanoGPT.forward(idx, targets=None) takes token ids and targets, not a dict batch with 'input_ids': "
            "pass token ids (B, T) or (inputs, targets) pairs.")):
        forward_loss(nano(), prepare_batch({"input_ids": DATA[:2]}))


def test_evaluate_scores_every_position_of_a_last_position_model():
    model, plan = nano(), resolve_precision("32-true", "cpu")
    scores = evaluate(model, DATA[:4], plan, batch_size=4)
    with torch.no_grad():
        logits, loss = model(DATA[:4, :-1], targets=DATA[:4, 1:])
    accuracy = (logits.argmax(-1) == DATA[:4, 1:]).float().mean()
    assert scores["val_loss"] == pytest.approx(float(loss), rel=1e-5)
    assert scores["val_accuracy"] == pytest.approx(float(accuracy))
    assert scores["val_perplexity"] == pytest.approx(float(loss.exp()), rel=1e-5)


# ---- context and vocabulary ---------------------------------------------------------------------
@pytest.mark.parametrize("build", [nano, llama, closure])
def test_context_and_vocab_are_found_in_each_convention(build):
    assert (find_context_length(build()), find_vocab_size(build())) == (32, 256)


def test_a_forward_past_the_context_names_the_length_and_the_way_through():
    with pytest.raises(ValueError, match=re.escape(
            "NanoGPT.forward failed on a sequence of 40 tokens (AssertionError: no message). The context "
            "length 40 is as given. Pass a length the model takes with --context N.")):
        check_context(nano(), 40, "argument", "--context N")


def test_a_context_not_found_lists_where_it_was_looked_for():
    with pytest.raises(ValueError, match=re.escape(f"The context length 64 is a default: none of {CONTEXT_SEARCH} "
                                                   f"was found. Pass a length the model takes with max_seq_len=.")):
        check_context(llama(), 64, "default", "max_seq_len=")


# ---- the tiers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nano", "llama", "closure"])
def test_tier1_passes_each_convention(name):
    report = run_tier1(BUILDERS[name](), figures=False)
    assert [c.name for c in report.checks if not c.passed] == []
    assert report.info["max_seq_len"] == "32 (from the model)"


@pytest.mark.parametrize("name", ["nano", "llama"])
def test_tier2_sees_every_position(name):
    report = run_tier2(BUILDERS[name](), figures=False)
    check = next(c for c in report.checks if c.name == "token_substitution")
    assert check.details["earlier_positions_unchanged"] is True


# ---- training, resume, benchmark, scan ----------------------------------------------------------
@pytest.mark.parametrize("name", ["nano", "llama", "closure"])
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_train_runs_each_convention_in_each_precision(name, precision):
    result = train(BUILDERS[name](), DATA, precision=precision, device="cpu", max_steps=3, batch_size=4,
                   lr=1e-2, log_every=1, progress=False)
    plan = resolve_precision(precision, "cpu")
    assert result.precision.name == plan.name and result.global_step == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_training_lowers_the_loss_of_a_targets_model():
    result = train(nano(), DATA[:4], precision="32-true", device="cpu", max_steps=8, batch_size=4, lr=1e-2,
                   log_every=1, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.5


def test_resume_continues_a_targets_model(tmp_path):
    train(llama(), DATA, precision="32-true", device="cpu", max_steps=2, batch_size=4, progress=False,
          run_dir=tmp_path)
    resumed = train(llama(), DATA, precision="32-true", device="cpu", max_steps=4, batch_size=4, progress=False,
                    run_dir=tmp_path, resume_from=tmp_path)
    assert resumed.global_step == 4


def test_benchmark_trains_the_modules_own_layers_not_a_copys(monkeypatch):
    model, trained = closure(), []
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def spy(net, *args, **kwargs):
        trained.append(net)
        return train(net, *args, **kwargs)

    monkeypatch.setattr(amp_benchmark_module, "train", spy)
    bench = benchmark_amp(model, DATA, precisions=("32-true",), steps=2, warmup=0, repeats=2, batch_size=4, max_seconds=0,
                          device="cpu")
    assert trained == [model, model]  # the module itself, whose lambdas close over its own layers
    assert all(cell.cell_contents is block.mlp for block in model.blocks for cell in block.mlpf.__closure__)
    assert bench.rows[0].error is None and bench.rows[0].init_checksum == bench.settings["initial_checksum"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # given back as it came


@pytest.mark.parametrize("name", ["nano", "llama"])
def test_benchmark_amp_runs_a_targets_model(name):
    bench = benchmark_amp(BUILDERS[name], DATA, precisions=("32-true", "bf16-mixed"), steps=1, warmup=0, repeats=1, max_seconds=0,
                          batch_size=4, device="cpu", eval_data=DATA[:4])
    assert [r.error for r in bench.rows] == [None, None]
    assert bench.rows[0].eval_accuracy is not None


def test_the_fp16_scan_sees_the_head_on_every_position():
    model, seen = nano(), []
    # The scan's own forward only (a train-mode module): finding the task probes it first, in eval mode.
    model.head.register_forward_hook(lambda m, i, out: seen.append(out.shape) if m.training else None)
    scan = scan_fp16_overflow(model, DATA[:2])
    assert scan.ok and seen == [torch.Size([2, 16, 256])]


# ---- loading files ------------------------------------------------------------------------------
def copy_user_models(folder: Path) -> Path:
    return Path(shutil.copy(USER_MODELS, folder / "model.py"))


def test_a_config_object_constructor_gets_its_config_built_from_the_dict(tmp_path):
    model = load_model(str(copy_user_models(tmp_path)), class_name="NanoGPT", config={"n_layer": 1, "block_size": 16})
    assert (type(model.config).__name__, model.config.n_layer, find_context_length(model)) == ("NanoConfig", 1, 16)


def test_an_unannotated_config_is_found_in_the_same_file(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from dataclasses import dataclass\nfrom torch import nn\n@dataclass\nclass Args:\n    width: int = 4\n"
                    "class Net(nn.Module):\n    def __init__(self, params):\n        super().__init__()\n"
                    "        self.params = params\n        self.fc = nn.Linear(params.width, 2)\n")
    assert load_model_from_file(path, config={"width": 3}).fc.in_features == 3


def test_an_unknown_config_field_is_named_with_the_fields(tmp_path):
    with pytest.raises(ValueError, match=re.escape(
            "NanoConfig() does not take 'depth'. It takes: vocab_size, block_size, n_layer, n_head, n_embd.")):
        load_model(str(copy_user_models(tmp_path)), class_name="NanoGPT", config={"depth": 1})


def test_a_wrapper_file_imports_its_sibling(tmp_path):
    copy_user_models(tmp_path)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text("from model import ModelArgs, Transformer\n\n\ndef build_model(n_layers=2):\n"
                       "    return Transformer(ModelArgs(n_layers=n_layers))\n")
    path_before = list(sys.path)
    model = load_model_from_file(wrapper, config={"n_layers": 1})
    assert len(model.layers) == 1 and model.params.max_seq_len == 32
    assert sys.path == path_before and "model" not in sys.modules  # the next folder's model.py is its own


def test_a_module_level_instance_is_the_model(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from torch import nn\nclass Net(nn.Module):\n    def __init__(self, w):\n        super().__init__()\n"
                    "        self.fc = nn.Linear(w, 2)\nloss_fn = nn.CrossEntropyLoss()\nmodel = Net(5)\n")
    assert load_model_from_file(path).fc.in_features == 5
    with pytest.raises(ValueError, match=re.escape(
            "the file builds the model itself (model = Net(...)), so config={'w': 3} cannot change it. Edit the "
            "file, or pass class_name= a class to build.")):
        load_model_from_file(path, config={"w": 3})


def test_several_instances_are_listed(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from torch import nn\na = nn.Linear(2, 2)\nb = nn.Linear(3, 3)\n")
    with pytest.raises(ValueError, match=re.escape(
            "several nn.Module instances could be the model: a, b. Pass class_name= one of them.")):
        load_model_from_file(path)
    assert load_model_from_file(path, class_name="b").in_features == 3


def test_a_builder_that_returns_no_module_is_named(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def get_model():\n    return 3\n")
    with pytest.raises(ValueError, match=re.escape("get_model() returned int, not a torch.nn.Module.")):
        load_model_from_file(path)


def test_a_default_config_method_takes_the_dict(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import types\nfrom torch import nn\nclass GPT(nn.Module):\n    @staticmethod\n"
                    "    def get_default_config():\n        return types.SimpleNamespace(width=4, depth=1)\n"
                    "    def __init__(self, config):\n        super().__init__()\n"
                    "        self.fc = nn.Linear(config.width, config.depth)\n")
    assert load_model_from_file(path, config={"width": 6}).fc.weight.shape == (1, 6)


# ---- the command line ---------------------------------------------------------------------------
def cli_args(path, *extra):
    return ["--model", str(path), "--batch-size", "4", *extra]


def test_cli_trains_a_config_object_model_from_its_file(tmp_path, capsys):
    path = copy_user_models(tmp_path)
    status = cli.main(["train", *cli_args(path, "--class-name", "NanoGPT", "--model-config", '{"n_layer": 1}',
                                          "--max-steps", "2", "--no-progress", "--run-dir", str(tmp_path / "run"))])
    assert status == 0, capsys.readouterr().err
    assert "trained to step 2" in capsys.readouterr().out


def test_cli_benches_a_closure_model_through_a_factory(tmp_path, capsys):
    path = copy_user_models(tmp_path)
    status = cli.main(["bench", *cli_args(path, "--class-name", "ClosureLM", "--precisions", "32-true",
                                          "--steps", "1", "--warmup", "0", "--repeats", "1", "--max-seconds", "0")])
    assert status == 0, capsys.readouterr().err
    assert "| 32-true" in capsys.readouterr().out


def test_cli_a_model_past_its_context_is_one_message(tmp_path, capsys):
    path = tmp_path / "m.py"
    path.write_text("import torch\nfrom torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.emb = nn.Embedding(256, 4)\n"
                    "        self.register_buffer('table', torch.zeros(16, 4))\n"
                    "    def forward(self, idx):\n        assert idx.shape[1] <= 16\n"
                    "        return self.emb(idx) + self.table[:idx.shape[1]]\n")
    status = cli.main(["train", *cli_args(path, "--max-steps", "1", "--run-dir", str(tmp_path / "run"))])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert err.strip() == (f"python -m utils.training train: error: Net.forward failed on a sequence of 64 tokens "
                           f"(AssertionError: no message). The context length 64 is a default: none of "
                           f"{CONTEXT_SEARCH} was found. Pass a length the model takes with --context N.")


def test_cli_a_file_that_fails_to_import_is_one_message(tmp_path, capsys):
    path = tmp_path / "m.py"
    path.write_text("import not_a_module_anywhere\n")
    status = cli.main(["train", *cli_args(path, "--max-steps", "1", "--run-dir", str(tmp_path / "run"))])
    assert status == 1
    assert capsys.readouterr().err.strip() == (
        f"python -m utils.training train: error: --model {path}: building the model failed at {path}, line 1 with "
        f"ModuleNotFoundError: No module named 'not_a_module_anywhere'. Check the file, --class-name and --model-config.")


def test_cli_a_file_with_a_syntax_error_is_its_file_line_and_error_in_one_message(tmp_path, capsys):
    path = tmp_path / "m.py"
    path.write_text("import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self)\n        pass\n")
    run_dir = tmp_path / "run"
    status = cli.main(["train", *cli_args(path, "--max-steps", "1", "--run-dir", str(run_dir))])
    err = capsys.readouterr().err
    assert status == 1 and not run_dir.exists()
    assert err.strip() == (
        f"python -m utils.training train: error: --model {path}: building the model failed at {path}, line 4 with "
        f"SyntaxError: expected ':'. Check the file, --class-name and --model-config.")


def test_tier1_explains_a_last_position_model_it_cannot_pass_targets_to():
    from utils.tiers.tier1 import check_shapes

    check = check_shapes(ShortcutWithOtherName(), max_seq_len=8, batch_sizes=(2,))
    assert not check.passed
    assert check.details["problems"][0] == (
        "input (2, 2): ShortcutWithOtherName.forward(idx, tgt=None) returned logits of shape (2, 1, 256): one "
        "position of 2. Models that return only the last position's logits unless they get the targets must name "
        "that argument targets, labels, target or y, so the suite can pass it; or return every position's logits.")


def test_tier1_names_where_it_looked_for_a_context_it_did_not_find():
    from utils.tiers.tier1 import check_shapes

    class Hidden(nn.Module):  # a 16-row table in a buffer: no attribute says so
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(256, 4)
            self.register_buffer("table", torch.zeros(16, 4))

        def forward(self, idx):
            return self.emb(idx) + self.table[:idx.shape[1]]

    problems = check_shapes(Hidden(), batch_sizes=(1,)).details["problems"]
    assert problems[0].endswith(f"(the context length 64 is a default: none of {CONTEXT_SEARCH} was found; "
                                f"pass max_seq_len=)")
