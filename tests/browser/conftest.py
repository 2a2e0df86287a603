"""The browser tests' fixtures: JupyterLab serving CI-sized copies of the notebooks, headless Chromium.

Each test module names its ``NOTEBOOK``; the module-scoped ``notebook`` fixture copies it with the
CI settings (``ci_overrides`` from notebooks/conftest.py, the ones nbval uses), opens it in
JupyterLab, clicks Run > Run All Cells and hands the open page to the module's tests. A failing test
lists its screenshots (under pytest's temp folder) in a "screenshots" section of the report.
"""

import importlib.util
import re
import shutil
import uuid
from pathlib import Path

import nbformat
import pytest
from browser_lab import (
    CHROMIUM,
    CHROMIUM_ARGS,
    CHROMIUM_MISSING,
    JUPYTERLAB_MISSING,
    PLAYWRIGHT_MISSING,
    JupyterLab,
    NotebookPage,
)

ROOT = Path(__file__).resolve().parents[2]
# A hang guard, not a budget: with CI sizes Run All Cells takes 10-25 s a notebook on a 2-core CPU
# (up to ~45 s when the machine is busy), and the whole browser part about a minute.
RUN_ALL_TIMEOUT_S = 120


def _notebooks_conftest():
    spec = importlib.util.spec_from_file_location("notebooks_conftest", ROOT / "notebooks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ci_copy(name: str, folder: Path, run_dir: Path) -> Path:
    """``notebooks/<name>`` written to ``folder`` with the CI settings appended to its parameters
    cell, and without its requires-cuda cells off a GPU (nbval skips those too)."""
    import torch

    book = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    cuda = torch.cuda.is_available()
    cells = []
    for cell in book.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "requires-cuda" in tags and not cuda:
            continue
        if "parameters" in tags:
            cell.source += _notebooks_conftest().ci_overrides(cell.source, str(run_dir))
        cells.append(cell)
    book.cells = cells
    path = folder / name
    nbformat.write(book, path)
    return path


@pytest.fixture(scope="package")
def chromium():
    """Headless system Chromium driven by Playwright (its own browser download cannot work here).

    Scoped to tests/browser/, as JupyterLab is (one start for both notebooks): both are gone before
    the rest of the suite runs, and with them Playwright's event loop, which asyncio code in later
    tests (nbclient) must not meet.
    """
    if not CHROMIUM.exists():
        pytest.skip(CHROMIUM_MISSING)
    sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="package")
def jupyterlab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 (free port, random token) serving a scratch folder under runs/.

    The notebook copies live under the repository's git-ignored ``runs/`` so that their setup cell
    finds the repository root above them; the folder is removed afterwards. W&B stays offline.
    """
    pytest.importorskip("jupyterlab", reason=JUPYTERLAB_MISSING)
    folder = ROOT / "runs" / f"browser-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path_factory.mktemp("wandb"))}
    lab = JupyterLab(folder, home=tmp_path_factory.mktemp("jupyterlab"), env=env)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def notebook(request, chromium, jupyterlab, tmp_path_factory) -> NotebookPage:
    """The module's ``NOTEBOOK`` open in JupyterLab, after Run > Run All Cells finished."""
    name = request.module.NOTEBOOK
    stem = Path(name).stem
    run_dir = tmp_path_factory.mktemp(f"run-{stem}")
    ci_copy(name, jupyterlab.root_dir, run_dir)
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.goto(jupyterlab.url(name))
        book = NotebookPage(page, jupyterlab, name, tmp_path_factory.mktemp(f"screenshots-{stem}"), run_dir)
        book.wait_for_kernel()
        book.run_all(timeout_s=RUN_ALL_TIMEOUT_S)
        book.screenshot("after-run-all")
        yield book
    finally:
        context.close()
        for session in jupyterlab.api("GET", "sessions") if jupyterlab.running else []:
            if session["path"] == name:  # its kernel: no torch process left idling beside the next one
                jupyterlab.api("DELETE", f"sessions/{session['id']}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a browser test's failure: a screenshot of the page now, and the paths of all taken so far."""
    outcome = yield
    report = outcome.get_result()
    book = getattr(item, "funcargs", {}).get("notebook")
    if not (report.failed and isinstance(book, NotebookPage)):
        return
    if report.when == "call":
        try:
            book.screenshot("failed-" + re.sub(r"\W+", "-", item.name))
        except Exception as e:  # the page may be gone; the report still lists the earlier shots
            report.sections.append(("screenshots", f"no screenshot at failure: {type(e).__name__}: {e}"))
    report.sections.append(("screenshots", "\n".join(str(p) for p in book.shots)))
