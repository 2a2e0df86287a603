"""04_benchmark_amp.ipynb in JupyterLab: it runs clean, and the table and the chart render."""
import json

import pytest
from browser_lab import PLAYWRIGHT_MISSING, error_outputs, png_size, unexecuted_cells

expect = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING).expect
NOTEBOOK = "04_benchmark_amp.ipynb"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_run_all_cells_leaves_no_error_output_and_reaches_the_last_cell(notebook):
    saved = notebook.saved()
    assert error_outputs(saved) == []
    assert unexecuted_cells(saved) == []
    # Run All reached the last cell, each cell once, top to bottom (one save: each save is a server round trip)
    code = [c for c in saved["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert counts == sorted(counts) and len(set(counts)) == len(code)  # each ran once, top to bottom
    assert code[-1]["source"].startswith('#@title 13. Benchmark with and without keep_fp32')


def test_benchmark_table_renders_a_row_per_precision(notebook):
    output = notebook.code_cell("#@title 6. Benchmark").locator(".jp-OutputArea")
    table = output.locator(".jp-RenderedMarkdown table")
    expect(table).to_have_count(1)
    notebook.screenshot("benchmark-table", output)
    measured = [row["precision"] for row in json.loads((notebook.run_dir / "benchmark.json").read_text())["rows"]]
    assert table.locator("tbody tr td:first-child").all_text_contents() == measured
    columns = table.locator("thead th").count()
    assert columns > 1 and all(row.locator("td").count() == columns for row in table.locator("tbody tr").all())


def test_benchmark_chart_is_an_image_in_the_page(notebook):
    output, decoded = notebook.image_in_cell("#@title 7. Chart")
    assert decoded == png_size(notebook.run_dir / "benchmark.png")
    notebook.screenshot("benchmark-chart", output)


def test_recommendation_renders_as_text(notebook):
    output = notebook.code_cell("#@title 8. Recommendation").locator(".jp-OutputArea")
    shown = output.locator(".jp-RenderedMarkdown")
    expect(shown).to_have_count(1)
    saved = next(c for c in notebook.saved()["cells"] if c["source"].startswith("#@title 8. Recommendation"))
    markdown = saved["outputs"][0]["data"]["text/markdown"]
    # The first words of the verdict, as the page shows them (markdown rendered, not its source).
    assert shown.inner_text().split()[:3] == markdown.split()[:3]
    notebook.screenshot("recommendation", output)


def test_what_fits_where_renders_the_precision_table_and_the_strategies_table(notebook):
    output = notebook.code_cell("#@title 9. What fits where").locator(".jp-OutputArea")
    tables = output.locator(".jp-RenderedMarkdown table")
    expect(tables).to_have_count(2)
    strategies = tables.nth(1).locator("tbody tr td:first-child").all_text_contents()
    assert strategies == ["one GPU"] + ["DDP", "FSDP"] * 3  # one GPU, then DDP and FSDP over 2, 4 and 8
    expect(output).to_contain_text("T4")  # the line saying which to choose names the GPU
