import re

import pytest

from utils.notebook.widgets import CHOICES, amp_toggle, explain, label_for
from utils.training import Capabilities

CPU_PLAIN = Capabilities(cpu_bf16=False)
CPU_BF16 = Capabilities(cpu_bf16=True)
T4 = Capabilities(cuda=True, cuda_count=1, cuda_bf16=False, cuda_name="Tesla T4")


@pytest.mark.parametrize("precision, label", [("auto", "auto"), ("32", "32-true"), ("bf16-true", "bf16-mixed"),
                                              ("16-mixed", "16-mixed"), ("16_true", "16-mixed"), ("no", "32-true"),
                                              ("fp16", "16-mixed"), ("bf16", "bf16-mixed"), ("fp32", "32-true")])
def test_every_precision_has_a_button(precision, label):
    assert label_for(precision) == label


def test_fp16_on_a_cpu_runtime_is_explained_as_a_fallback():
    plan, line = explain("16-mixed", caps=CPU_BF16)
    assert plan.name == "bf16-mixed"
    assert line.startswith("16-mixed on a CPU runtime → bf16-mixed, because fp16 was requested on a CPU-only runtime")


def test_fp16_on_a_gpu_mentions_the_scaler():
    plan, line = explain("fp16", caps=T4)
    assert plan.use_scaler and line.endswith("A GradScaler guards fp16 gradients.")


def test_impossible_choice_is_explained_not_raised():
    plan, line = explain("bf16", caps=T4)
    assert plan is None and "Tesla T4 does not support" in line and "16-mixed" in line


def test_toggle_follows_clicks_and_matches_the_resolver():
    toggle = amp_toggle("auto", display=False)
    assert toggle.widget is not None
    buttons, line = toggle.widget.children
    assert list(buttons.options) == list(CHOICES)
    for label in ("bf16-mixed", "16-mixed", "32-true"):
        buttons.value = label  # what a click does
        expected_plan, expected_line = explain(CHOICES[label])
        assert toggle.plan == expected_plan
        assert expected_line.split(" → ")[1][:10] in line.value


def test_initial_value_comes_from_the_parameter():
    toggle = amp_toggle("bf16-mixed", display=False)
    assert toggle.widget.children[0].value == "bf16-mixed" and toggle.plan.name == "bf16-mixed"


def test_unknown_parameter_is_the_resolvers_error():
    with pytest.raises(ValueError, match=re.escape("precision='fp61' is not a known precision.")):
        amp_toggle("fp61", display=False)


def test_without_ipywidgets_the_parameter_is_used_as_is(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ipywidgets", None)  # import now raises ImportError
    toggle = amp_toggle("32-true", display=False)
    assert toggle.widget is None and toggle.plan.name == "32-true"


def test_the_toggle_and_every_settings_form_use_one_precision_vocabulary():
    import json
    from pathlib import Path

    from utils.notebook.project import NOTEBOOKS

    root = Path(__file__).resolve().parents[1]
    for name in NOTEBOOKS:
        cells = json.loads((root / "notebooks" / name).read_text())["cells"]
        source = "".join(next(c for c in cells if "parameters" in c["metadata"].get("tags", []))["source"])
        found = re.search(r'^precision = "auto"\s+#@param (\[.*\])', source, re.M)
        if found:  # a notebook that uses precision offers exactly the toggle's buttons
            assert json.loads(found.group(1)) == list(CHOICES), name


def test_the_toggle_takes_the_legacy_spelling_too():
    toggle = amp_toggle("auto", display=False)
    toggle.set("fp32")
    assert toggle.plan.name == "32-true" and label_for(toggle.request) == "32-true"
