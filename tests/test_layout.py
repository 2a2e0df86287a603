"""The package's layout promises: the tiers never load the loop, the resolver loads nothing heavy."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(code: str) -> set[str]:
    """The modules (of those we care about) in sys.modules after running ``code`` in a fresh interpreter."""
    probe = ("import sys\n" + code + "\nprint(' '.join(m for m in sys.modules if m.startswith("
             "('utils.', 'wandb', 'matplotlib', 'pytorch_lightning'))))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_the_tiers_and_the_widget_do_not_load_the_loop():
    loaded = loaded_after("import utils.tiers.tier1, utils.notebook.widgets, utils.tiers.tier2")
    assert {"utils.tiers.tier1", "utils.notebook.widgets", "utils.tiers.tier2"} <= loaded
    assert "utils.training.loop.trainer" not in loaded
    assert not any(m == "wandb" or m.startswith("wandb.") for m in loaded)


def test_the_resolver_loads_neither_the_loop_nor_wandb():
    loaded = loaded_after("import utils.training; utils.training.resolve_precision")
    assert "utils.training.amp.precision" in loaded
    assert not loaded & {"utils.training.loop.trainer", "utils.training.wandb_log.callback", "wandb", "matplotlib"}


def test_a_public_name_loads_its_module_on_first_use():
    loaded = loaded_after("import utils.training; utils.training.train")
    assert "utils.training.loop.trainer" in loaded


def test_an_unknown_name_is_an_attribute_error_naming_it():
    import utils.training

    with pytest.raises(AttributeError, match="module 'utils.training' has no attribute 'trian'"):
        utils.training.trian  # noqa: B018


def test_every_exported_name_resolves_to_its_module():
    import utils.training
    from utils.training import _EXPORTS

    for name, module in _EXPORTS.items():
        assert getattr(utils.training, name).__module__.startswith(module), name


def test_amp_utils_loads_by_file_path_with_the_seed_names():
    import importlib.util

    from utils.training.amp.precision import compute_effective_precision
    from utils.training.wandb_log.callback import AmpWandbCallback

    spec = importlib.util.spec_from_file_location("seed_amp_utils", ROOT / "utils" / "training" / "amp_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.AmpWandbCallback is AmpWandbCallback
    assert module.compute_effective_precision is compute_effective_precision


def test_the_exports_are_listed_in_all():
    import utils.training
    import utils.training.benchmark

    for package in (utils.training, utils.training.benchmark):
        assert sorted(package.__all__) == sorted(package._EXPORTS)
