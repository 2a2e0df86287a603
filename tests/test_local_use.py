"""Local use: the Makefile's entry points, and the nbstripout filter that keeps notebook outputs out of git.

Each test runs the project's own Makefile and .gitattributes in a temporary folder, with ``.venv`` linked
to the venv running the tests and ``STAMP`` pointing at a fresh file there, so ``make`` never (re)builds
a venv and never touches this checkout's git config.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from utils.notebook.project import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # the venv running the tests (.venv/bin/python -> .venv)

needs_make_and_git = pytest.mark.skipif(not (shutil.which("make") and shutil.which("git")),
                                        reason="needs make and git on PATH")


def _clean_env() -> dict:
    """No outer make's flags and no outer git repository leak into the commands run here."""
    return {k: v for k, v in os.environ.items()
            if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL") and not k.startswith("GIT_")}


def _run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=120)


@pytest.fixture
def project(tmp_path):
    """A copy of the Makefile and .gitattributes, with the venv linked in and a stamp newer than the
    requirement files (``PYTHON=false``: were the venv rule ever to run, it would fail at once)."""
    for name in ("Makefile", ".gitattributes"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("requirements.txt", "requirements-dev.txt", "constraints.txt", "pyproject.toml"):
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (0, 0))
    (tmp_path / "stamp").touch()
    (tmp_path / ".venv").symlink_to(VENV, target_is_directory=True)
    (tmp_path / "notebooks").mkdir()
    return tmp_path


def _make(project: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(["make", "--no-print-directory", "STAMP=stamp", "PYTHON=false", *args], project)


def _notebook_with_output(path: Path) -> None:
    cell = nbformat.v4.new_code_cell("print(6 * 7)", id="answer42")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="42\n")]
    cell.execution_count = 3
    book = nbformat.v4.new_notebook()
    book.cells = [cell]
    nbformat.write(book, path)


@needs_make_and_git
def test_make_configures_a_git_filter_that_strips_outputs_when_staging(project):
    pytest.importorskip("nbstripout")
    assert _run(["git", "init", "-q", "."], project).returncode == 0
    made = _make(project, "nbstripout-filter")
    assert made.returncode == 0, made.stderr
    _notebook_with_output(project / "notebooks" / "run.ipynb")
    # Staged from a subfolder: the filter's relative .venv path must still resolve (git runs it at the top).
    added = _run(["git", "add", "run.ipynb"], project / "notebooks")
    assert added.returncode == 0, added.stderr
    staged = json.loads(_run(["git", "show", ":notebooks/run.ipynb"], project).stdout)
    cell = staged["cells"][0]
    assert (cell["outputs"], cell["execution_count"]) == ([], None)
    assert (cell["source"], cell["id"]) == (["print(6 * 7)"], "answer42")  # code and cell id kept
    on_disk = nbformat.read(project / "notebooks" / "run.ipynb", as_version=4)
    assert on_disk.cells[0].outputs[0]["text"] == "42\n"  # the working copy keeps what you ran


@needs_make_and_git
def test_make_outside_a_git_checkout_skips_the_filter_and_succeeds(project):
    made = _make(project, "nbstripout-filter")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "Not a git checkout: the nbstripout filter is not configured."
    assert not (project / ".git").exists()


@needs_make_and_git
@pytest.mark.parametrize("target, command", [
    (["lab"], ".venv/bin/jupyter lab notebooks/"),
    (["train", "ARGS=--model example:gpt-micro --max-steps 5"],
     ".venv/bin/python -m utils.training train --model example:gpt-micro --max-steps 5"),
    (["bench", "ARGS=--model example:gpt-micro"], ".venv/bin/python -m utils.training bench --model example:gpt-micro"),
])
def test_local_targets_use_the_venv_and_configure_the_filter_first(project, target, command):
    dry = _make(project, "-n", *target)  # -n: print the commands, run none
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[-1] == command
    assert any("git config filter.nbstripout.clean" in line for line in lines[:-1])


@needs_make_and_git
def test_make_test_configures_the_filter_too(project):
    assert "git config filter.nbstripout.clean" in _make(project, "-n", "test").stdout


def test_committed_notebooks_pass_through_the_filter_unchanged():
    """The filter make installs (nbstripout --keep-id) leaves each clean notebook byte-identical, so
    staging one never rewrites it. One nbstripout call for all: -t prints each stripped file in turn."""
    pytest.importorskip("nbstripout")
    paths = [ROOT / "notebooks" / name for name in NOTEBOOKS]
    stripped = _run([sys.executable, "-m", "nbstripout", "--keep-id", "-t", *map(str, paths)], ROOT)
    assert stripped.returncode == 0, stripped.stderr
    assert stripped.stdout == "".join(path.read_text(encoding="utf-8") for path in paths)


def _readme_commands() -> list[str]:
    """Every command of the README's ```bash blocks, a line ending in ``\\`` joined with the next."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    commands = [re.sub(r"\\\n\s*", "", block) for block in blocks]
    return [line.strip() for block in commands for line in block.splitlines() if line.strip()]


def test_readme_runs_the_command_line_with_the_venvs_python():
    commands = [c for c in _readme_commands() if "-m utils.training" in c]
    assert len(commands) >= 4  # train, resume, bench, torchrun
    assert [c for c in commands if not c.startswith((".venv/bin/python ", ".venv/bin/torchrun "))] == []


def test_every_make_target_in_the_readme_exists():
    targets = {m.group(1) for c in _readme_commands() if (m := re.match(r"make ([\w-]+)", c))}
    assert {"lab", "train", "test", "demo"} <= targets
    rules = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    assert targets - rules == set()
