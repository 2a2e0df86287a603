"""AmpWandbCallback and init_wandb: the AMP state as it happened, and nothing lost when W&B is away.

No test reaches the network: W&B runs are offline (conftest sets WANDB_MODE=offline and a temporary
WANDB_DIR) or stand-ins that record calls.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path
from unittest.mock import MagicMock

import pytest
import torch
import wandb_records
from torch import nn

from utils.training import AmpWandbCallback, PrecisionWarning, WandbWarning, init_wandb, train
from utils.training.wandb_log.session import choose_mode

ROOT = Path(__file__).resolve().parents[1]


# ---- stand-ins -----------------------------------------------------------------------------------
class FakeScaler:
    """What the callback reads from a GradScaler: ``get_scale()`` only, as Lightning's may be."""

    def __init__(self, scale):
        self.scale = scale

    def get_scale(self):
        return self.scale


def lightning_shaped_trainer(loss_scale=None, precision=None):
    """A trainer shaped like Lightning's: the scaler sits at ``strategy.precision_plugin.scaler``."""
    plugin = types.SimpleNamespace(scaler=None if loss_scale is None else FakeScaler(loss_scale))
    trainer = types.SimpleNamespace(current_epoch=2, strategy=types.SimpleNamespace(precision_plugin=plugin))
    if precision is not None:
        trainer.precision = precision
    return trainer


class Overflowing(nn.Module):
    """Bytes -> 16 -> 256 logits, the head's weights scaled by ``gain``. At gain 300 the fp16 backward
    overflows at loss scales 65536, 32768 and 16384 (three skipped steps), then fits at 8192."""

    def __init__(self, gain=300.0):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(256, 16)
        self.head = nn.Linear(16, 256)
        with torch.no_grad():
            self.head.weight.mul_(gain)

    def forward(self, ids):  # (B, T) -> (B, T, 256)
        return self.head(self.emb(ids))


def token_ids(rows=32):
    return torch.randint(0, 256, (rows, 9), generator=torch.Generator().manual_seed(0))


def epoch_end_row(callback, trainer, run):
    callback.on_train_epoch_end(trainer, None)
    (row, _), = run.rows
    return row


# ---- the seed's cases -----------------------------------------------------------------------------
class TestAmpWandbCallback:
    def test_precision_variant_16(self, fake_wandb):
        callback = AmpWandbCallback(enabled=True, precision="16")
        assert (callback.enabled, callback.precision, callback.precision_name) == (True, "16", "16-mixed")
        assert epoch_end_row(callback, lightning_shaped_trainer(65536.0), fake_wandb.run)["amp/loss_scale"] == 65536.0

    def test_precision_variant_16_mixed(self, fake_wandb):
        callback = AmpWandbCallback(enabled=True, precision="16-mixed")
        assert (callback.precision, callback.precision_name) == ("16-mixed", "16-mixed")
        assert epoch_end_row(callback, lightning_shaped_trainer(512.0), fake_wandb.run)["amp/loss_scale"] == 512.0

    def test_precision_variant_16_true(self, fake_wandb):
        callback = AmpWandbCallback(enabled=True, precision="16_true")
        assert (callback.precision, callback.precision_name) == ("16_true", "16-true")
        assert epoch_end_row(callback, lightning_shaped_trainer(2.0), fake_wandb.run)["amp/loss_scale"] == 2.0

    def test_precision_variant_bf16(self, fake_wandb):
        callback = AmpWandbCallback(enabled=True, precision="bf16")
        assert (callback.precision, callback.precision_name) == ("bf16", "bf16-mixed")
        # bf16 never scales the loss: a scaler the trainer happens to hold is not reported
        row = epoch_end_row(callback, lightning_shaped_trainer(65536.0), fake_wandb.run)
        assert row == {"amp/enabled": 1, "amp/precision": "bf16", "epoch": 2}

    def test_enabled_false(self, fake_wandb):
        callback = AmpWandbCallback(enabled=False, precision="16")
        row = epoch_end_row(callback, lightning_shaped_trainer(65536.0), fake_wandb.run)
        assert row["amp/enabled"] == 0
        assert "amp/loss_scale" not in row

    def test_get_loss_scale_with_valid_scaler(self):
        callback = AmpWandbCallback(enabled=True, precision="16")
        assert callback._get_loss_scale(lightning_shaped_trainer(65536.0)) == 65536.0
        loop_trainer = types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
        assert callback._get_loss_scale(loop_trainer) == 1024.0

    def test_get_loss_scale_with_no_scaler(self):
        callback = AmpWandbCallback(enabled=True, precision="32")
        assert callback._get_loss_scale(lightning_shaped_trainer(None)) is None
        # a disabled GradScaler reports a scale of 1.0; there is no loss scaling to report
        disabled = types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False))
        assert disabled.scaler.get_scale() == 1.0
        assert callback._get_loss_scale(disabled) is None

    def test_get_loss_scale_extreme_values(self):
        callback = AmpWandbCallback(enabled=True, precision="16")
        for value in (0.0, 1e-10, 1e10):
            scale = callback._get_loss_scale(lightning_shaped_trainer(value))
            assert type(scale) is float and scale == value

    def test_on_train_epoch_end_no_wandb_run(self, fake_wandb):
        run = fake_wandb.run
        fake_wandb.run = None
        AmpWandbCallback(enabled=True, precision="16").on_train_epoch_end(lightning_shaped_trainer(65536.0), None)
        assert run.rows == []


def _seed_amp_utils():
    """``utils/training/amp_utils.py`` loaded by its file path, as the seed's tests load it."""
    path = Path(__file__).resolve().parents[1] / "utils" / "training" / "amp_utils.py"
    spec = importlib.util.spec_from_file_location("seed_amp_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("precision, enabled, scale, expected", [
    ("16", True, 65536.0, {"amp/enabled": 1, "amp/precision": "16", "amp/loss_scale": 65536.0}),
    ("16-mixed", True, 512.0, {"amp/enabled": 1, "amp/precision": "16-mixed", "amp/loss_scale": 512.0}),
    ("16_true", True, 2.0, {"amp/enabled": 1, "amp/precision": "16_true", "amp/loss_scale": 2.0}),
    ("bf16", True, 65536.0, {"amp/enabled": 1, "amp/precision": "bf16"}),  # bf16 never scales
    ("16", False, 65536.0, {"amp/enabled": 0, "amp/precision": "16"}),  # AMP off: no scale read
])
def test_seed_epoch_record_goes_through_wandb_log_of_any_stand_in(monkeypatch, precision, enabled, scale, expected):
    stand_in = MagicMock()  # the seed's tests replace the whole wandb module with a MagicMock
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    callback = _seed_amp_utils().AmpWandbCallback(enabled=enabled, precision=precision)
    callback.on_train_epoch_end(lightning_shaped_trainer(scale), None)
    stand_in.log.assert_called_once()
    row = stand_in.log.call_args.args[0]
    assert {k: v for k, v in row.items() if k.startswith("amp/")} == expected
    assert row["epoch"] == 2  # the Lightning-shaped trainer's current_epoch


def test_seed_epoch_record_names_the_trainers_precision_when_auto(fake_wandb):
    row = epoch_end_row(AmpWandbCallback(), lightning_shaped_trainer(1024.0, precision="16-mixed"), fake_wandb.run)
    assert (row["amp/precision"], row["amp/loss_scale"]) == ("16-mixed", 1024.0)


def test_seed_epoch_record_from_our_loop_is_at_the_loop_step(fake_wandb):
    train(Overflowing(gain=1.0), token_ids(), precision="32-true", device="cpu", max_steps=3, batch_size=8,
          log_every=1, progress=False, callbacks=[AmpWandbCallback(precision="32")])
    epoch_rows = [(row, step) for row, step in fake_wandb.run.rows if "amp/enabled" in row]
    assert epoch_rows == [({"amp/enabled": 1, "amp/precision": "32"}, 3)]


def test_without_wandb_installed_every_hook_is_a_quiet_no_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    callback = AmpWandbCallback(enabled=True, precision="16")
    assert callback._wandb is None  # the not-installed path, not a stand-in with no run
    with warnings.catch_warnings():
        warnings.simplefilter("error", WandbWarning)  # a hook that tried to call W&B would warn
        callback.on_train_epoch_end(lightning_shaped_trainer(65536.0), None)
        result = train(Overflowing(), token_ids(), precision="16-mixed", device="cpu", max_steps=6, batch_size=4,
                       log_every=1, progress=False, callbacks=[callback])
    assert result.global_step == 6 and result.skipped_steps == 3  # the run goes on as without the callback


def test_unknown_precision_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=re.escape("precision='fp8' is not a known precision. Accepted: '32-true'")):
        AmpWandbCallback(enabled=True, precision="fp8")


# ---- with our loop --------------------------------------------------------------------------------
def test_loop_steps_only_go_forward_and_validation_is_logged(fake_wandb):
    ids = token_ids(16)
    result = train(Overflowing(gain=1.0), ids, val_data=ids[:4], precision="32-true", epochs=2, batch_size=4,
                   log_every=3, progress=False, callbacks=[AmpWandbCallback()])
    steps = [step for _, step in fake_wandb.run.rows]
    assert steps == sorted(steps)
    train_steps = [step for row, step in fake_wandb.run.rows if "train/loss" in row]
    assert train_steps == [h["step"] for h in result.history] == [3, 4, 6, 8]
    val_rows = [(row, step) for row, step in fake_wandb.run.rows if "val/loss" in row]
    assert [(row["val/loss"], step) for row, step in val_rows] == [(e["val_loss"], e["step"]) for e in result.epochs]
    # fp32 has no GradScaler: no loss scale, and the plan in the config says why
    assert not any("amp/loss_scale" in row for row, _ in fake_wandb.run.rows)
    amp = fake_wandb.run.config.values["amp"]
    assert (amp["precision"], amp["dtype"], amp["loss_scaling"]) == ("32-true", "float32", False)
    assert fake_wandb.run.summary == {"amp/precision": "32-true", "amp/skipped_steps": 0}


def test_offline_run_records_loss_scale_skips_and_plan(tmp_path):
    session = init_wandb("amp-tests", config={"lr": 3e-4}, run_dir=tmp_path)
    try:
        with pytest.warns(PrecisionWarning, match="honoured but slow"):
            result = train(Overflowing(), token_ids(), precision="16-mixed", device="cpu", max_steps=6, batch_size=4,
                           log_every=1, progress=False, callbacks=[AmpWandbCallback()], run_dir=tmp_path / "run")
    finally:
        session.finish()
    assert session.mode == "offline"
    records = wandb_records.wait_for_exit(next(session.offline_dir.glob("run-*.wandb")))

    rows = [row for row in wandb_records.history(records) if "amp/loss_scale" in row]
    assert [r["_step"] for r in rows] == [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert [r["amp/loss_scale"] for r in rows] == [h["loss_scale"] for h in result.history]
    assert [r["amp/loss_scale"] for r in rows] == [32768.0, 16384.0, 8192.0, 8192.0, 8192.0, 8192.0]
    assert [r["amp/skipped_steps"] for r in rows] == [h["skipped_steps"] for h in result.history] == [1, 2, 3, 3, 3, 3]
    assert [r["amp/overflow"] for r in rows] == [1, 1, 1, 0, 0, 0]
    assert [r["train/loss"] for r in rows] == pytest.approx([h["loss"] for h in result.history])

    config = wandb_records.config(records)
    assert config["lr"] == 3e-4
    assert config["amp"] == {
        "requested": "auto", "enabled": True, "precision": "16-mixed", "dtype": "float16", "param_dtype": "float32",
        "device": "cpu", "reason": result.precision.reason, "loss_scaling": True,
    }
    summary = wandb_records.summary(records)
    assert (summary["amp/final_loss_scale"], summary["amp/skipped_steps"], summary["amp/precision"]) == (
        result.final_loss_scale, result.skipped_steps, "16-mixed") == (8192.0, 3, "16-mixed")


def test_wandb_failing_mid_run_loses_nothing(tmp_path, monkeypatch):
    import wandb

    session = init_wandb("amp-tests", run_dir=tmp_path)
    real_log, calls = wandb.log, []  # the callback logs through wandb.log, which logs to wandb.run

    def log_then_fail(*args, **kwargs):  # the network drops after two calls
        calls.append(args)
        if len(calls) > 2:
            raise ConnectionError("network is unreachable")
        return real_log(*args, **kwargs)

    monkeypatch.setattr(wandb, "log", log_then_fail)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(Overflowing(gain=1.0), token_ids(), precision="32-true", max_steps=6, batch_size=4,
                           log_every=1, progress=False, callbacks=[AmpWandbCallback()], run_dir=tmp_path / "run")
    finally:
        session.finish()
    assert (result.global_step, result.interrupted) == (6, False)
    assert len(calls) == 3  # two that worked, the one that failed, then W&B is left alone
    shown = [str(w.message) for w in caught if issubclass(w.category, WandbWarning)]
    assert len(shown) == 1 and "W&B log failed (ConnectionError: network is unreachable)" in shown[0]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["type"] == "step"] == [1, 2, 3, 4, 5, 6]


# ---- with Lightning -------------------------------------------------------------------------------
def test_lightning_runs_the_callback_hooks(fake_wandb, tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.plugins.precision import MixedPrecision

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            # x 1e3: the fp16 backward overflows at every loss scale reached in three steps
            return self.lin(batch[0]).float().pow(2).mean() * 1e3

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 4)), batch_size=2)

    callback = AmpWandbCallback()
    assert isinstance(callback, pl.Callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's tips and deprecation notes
        trainer = pl.Trainer(callbacks=[callback], max_steps=3, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             plugins=[MixedPrecision("16-mixed", "cpu")], log_every_n_steps=1,
                             default_root_dir=tmp_path)
        trainer.fit(Tiny())
    run = fake_wandb.run
    steps = [row for row, _ in run.rows if "amp/skipped_steps" in row]
    assert [r["trainer/global_step"] for r in steps] == [1, 2, 3]
    assert [r["amp/loss_scale"] for r in steps] == [32768.0, 16384.0, 8192.0]
    assert [r["amp/skipped_steps"] for r in steps] == [1, 2, 3]
    assert all(step is None for _, step in run.rows)  # Lightning rows step by trainer/global_step
    assert ("amp/*", "trainer/global_step") in run.metrics
    assert run.config.values["amp"]["precision"] == "16-mixed"
    assert run.summary == {"amp/precision": "16-mixed", "amp/skipped_steps": 3, "amp/final_loss_scale": 8192.0}


# ---- init_wandb -----------------------------------------------------------------------------------
def test_init_wandb_goes_offline_under_wandb_mode_and_says_how_to_sync(tmp_path, caplog):
    caplog.set_level("INFO", logger="utils.training.wandb_log.session")
    with warnings.catch_warnings():
        warnings.simplefilter("error", WandbWarning)  # offline was asked for: no warning
        session = init_wandb("amp-tests", run_dir=tmp_path)
    session.finish()
    assert session.mode == "offline"
    assert session.offline_dir.parent == tmp_path / "wandb"
    assert session.message == (f"W&B: offline (WANDB_MODE=offline is set). The run is saved in {session.offline_dir}; "
                               f"upload it later with `wandb sync {session.offline_dir}`.")
    ours = [r.getMessage() for r in caplog.records if r.name == "utils.training.wandb_log.session"]
    assert ours == [session.message]


def test_init_wandb_is_disabled_without_wandb(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.warns(WandbWarning, match=re.escape("W&B: disabled (wandb is not installed")):
        session = init_wandb("amp-tests", run_dir=tmp_path)
    assert (session.mode, session.run) == ("disabled", None)
    assert session.message.endswith(f"Metrics are kept locally only in {tmp_path / 'metrics.jsonl'}.")
    session.finish()  # nothing to finish, and no error


def stub_wandb_module(monkeypatch, logged_in, online_error=None):
    """A wandb module whose init records its mode; online init raises ``online_error`` when given."""
    module = types.ModuleType("wandb")
    module.inits = []

    def init(mode, **kwargs):
        module.inits.append(mode)
        if mode == "online" and online_error is not None:
            raise online_error
        return types.SimpleNamespace(dir=str(Path(kwargs["dir"]) / "wandb" / "offline-run-x" / "files"),
                                     url=None, name="run-x")

    module.init = init
    module.login = lambda prompt=True, verify=True: logged_in and not prompt
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return module


def test_init_wandb_goes_offline_when_not_logged_in(monkeypatch, tmp_path):
    module = stub_wandb_module(monkeypatch, logged_in=False)
    with pytest.warns(WandbWarning, match="you are not logged in to W&B") as caught:
        session = init_wandb("amp-tests", run_dir=tmp_path)
    assert (session.mode, module.inits, len(caught)) == ("offline", ["offline"], 1)
    assert os.environ["WANDB_MODE"] == "offline"  # so wandb's exit hook does not look for the network
    assert f"`wandb sync {tmp_path / 'wandb' / 'offline-run-x'}`" in session.message


def test_init_wandb_falls_back_to_offline_when_unreachable(monkeypatch, tmp_path):
    module = stub_wandb_module(monkeypatch, logged_in=True, online_error=ConnectionError("no route to host"))
    with pytest.warns(WandbWarning, match=re.escape("W&B could not be reached: ConnectionError: no route to host")):
        session = init_wandb("amp-tests", run_dir=tmp_path)
    assert (session.mode, module.inits) == ("offline", ["online", "offline"])


def test_choose_mode_order_is_argument_then_wandb_mode_then_login(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert choose_mode("disabled", True, lambda: True)[0] == "disabled"
    assert choose_mode(None, True, lambda: True)[:2] == ("offline", "WANDB_MODE=dryrun is set")
    monkeypatch.delenv("WANDB_MODE")
    assert choose_mode(None, True, lambda: True)[::2] == ("online", False)
    assert choose_mode(None, True, lambda: False)[::2] == ("offline", True)
    assert choose_mode("auto", True, lambda: False)[::2] == ("offline", True)  # "auto" chooses, as None does
    assert choose_mode("auto", True, lambda: True)[0] == "online"
    with pytest.raises(ValueError, match=re.escape(
            "init_wandb(mode='cloud'): mode must be None or 'auto' (choose), 'online'")):
        choose_mode("cloud", True, lambda: True)


def fake_colab(monkeypatch, secrets, *, refuse=None):
    """A stand-in ``google.colab.userdata`` in sys.modules: ``get`` reads ``secrets`` or raises."""
    import types

    userdata = types.ModuleType("google.colab.userdata")

    class SecretNotFoundError(Exception):
        pass

    class NotebookAccessError(Exception):
        pass

    def get(name):
        if refuse is not None:
            raise {"missing": SecretNotFoundError, "access": NotebookAccessError}[refuse](name)
        return secrets[name]

    userdata.get, userdata.SecretNotFoundError, userdata.NotebookAccessError = get, SecretNotFoundError, NotebookAccessError
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    google = types.ModuleType("google")
    google.colab = colab
    for name, module in {"google": google, "google.colab": colab, "google.colab.userdata": userdata}.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_on_colab_the_wandb_key_comes_from_colabs_secrets_unprinted(monkeypatch, capsys):
    from utils.training.wandb_log.session import colab_secret_key

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    fake_colab(monkeypatch, {"WANDB_API_KEY": "k" * 40})
    assert colab_secret_key() is True
    assert os.environ["WANDB_API_KEY"] == "k" * 40
    assert "k" * 40 not in "".join(capsys.readouterr())


@pytest.mark.parametrize("refuse", ["missing", "access"])
def test_without_the_secret_or_access_to_it_nothing_changes(monkeypatch, refuse):
    from utils.training.wandb_log.session import colab_secret_key

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    fake_colab(monkeypatch, {}, refuse=refuse)
    assert colab_secret_key() is False and "WANDB_API_KEY" not in os.environ


def test_a_key_already_in_the_environment_wins_over_colabs_secret(monkeypatch):
    from utils.training.wandb_log.session import colab_secret_key

    monkeypatch.setenv("WANDB_API_KEY", "mine")
    fake_colab(monkeypatch, {"WANDB_API_KEY": "other"})
    assert colab_secret_key() is False and os.environ["WANDB_API_KEY"] == "mine"


def test_utils_training_imports_without_wandb():
    code = ("import sys; sys.modules['wandb'] = None; import utils.training as t; "
            "print(t.init_wandb('p').mode, 'pytorch_lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["disabled", "False"]
