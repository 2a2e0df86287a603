"""03_train_amp.ipynb in JupyterLab: it runs clean, the AMP toggle answers clicks, the curves show.

The tests share one page and run in file order: the toggle is checked as the settings left it
(``auto``) before any button is clicked.
"""
import re

import pytest
import torch
from browser_lab import PLAYWRIGHT_MISSING, error_outputs, png_size, unexecuted_cells

from utils.notebook.widgets import explain

expect = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING).expect
NOTEBOOK = "03_train_amp.ipynb"
pytestmark = [pytest.mark.browser, pytest.mark.slow]
TOGGLE = "#@title 5. AMP toggle"


def test_run_all_cells_leaves_no_error_output_and_reaches_the_last_cell(notebook):
    saved = notebook.saved()
    assert error_outputs(saved) == []
    assert unexecuted_cells(saved) == []
    # Run All reached the last cell, each cell once, top to bottom (one save: each save is a server round trip)
    code = [c for c in saved["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert counts == sorted(counts) and len(set(counts)) == len(code)  # each ran once, top to bottom
    assert code[-1]["source"].startswith('#@title 11. Finish')


def test_toggle_shows_four_choices_and_the_settings_plan(notebook):
    cell = notebook.code_cell(TOGGLE)
    # the form's own names: one vocabulary
    expect(cell.locator(".widget-toggle-button")).to_have_text(["auto", "32-true", "bf16-mixed", "16-mixed"])
    expect(cell.locator(".widget-toggle-button.mod-active")).to_have_text("auto")  # precision="auto"
    expect(cell.locator(".widget-html-content")).to_have_text(explain("auto")[1])
    notebook.screenshot("toggle-auto", cell)


@pytest.mark.parametrize("label, request_", [("bf16-mixed", "bf16-mixed"), ("16-mixed", "16-mixed")])
def test_clicking_a_choice_shows_the_resolvers_plan_for_this_runtime(notebook, label, request_):
    cell = notebook.code_cell(TOGGLE)
    plan, line = explain(request_)
    cell.locator(".widget-toggle-button", has_text=re.compile(rf"^{label}$")).click()
    # The kernel answers the click: the line is what explain() says for this runtime.
    expect(cell.locator(".widget-html-content")).to_have_text(line, timeout=15_000)
    notebook.screenshot(f"toggle-{label}", cell)
    if request_ == "16-mixed" and not torch.cuda.is_available():
        assert plan.name != "16-mixed" and f"→ {plan.name}" in line  # a fallback, named


def test_loss_curves_are_an_image_in_the_page(notebook):
    output, decoded = notebook.image_in_cell("#@title 8. Curves")
    assert decoded == png_size(notebook.run_dir / "training_curves.png")  # the saved PNG, decoded
    notebook.screenshot("loss-curves", output)


def test_the_resumed_curves_are_an_image_in_the_page(notebook):
    output, decoded = notebook.image_in_cell("#@title 9. Resume")
    assert decoded == png_size(notebook.run_dir / "training_curves_resumed.png")
    notebook.screenshot("loss-curves-resumed", output)
