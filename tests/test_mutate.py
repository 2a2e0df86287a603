"""The mutation runner (benchmarks/mutate.py) finds its snippets, follows moved code, reports stale ones."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("benchmarks_mutate", ROOT / "benchmarks" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "utils" / "training").mkdir(parents=True)
    (tmp_path / "utils" / "training" / "loop.py").write_text("x = a or b\ny = 2\n")
    (tmp_path / "utils" / "other.py").write_text("z = 3\n")
    return tmp_path


def test_an_exact_snippet_is_replaced_once(mutate, tree):
    m = mutate.Mutant("m", "utils/training/loop.py", "a or b", "b", "loop")
    assert mutate.apply(m, tree) == ("utils/training/loop.py", "")
    assert (tree / "utils" / "training" / "loop.py").read_text() == "x = b\ny = 2\n"


def test_a_regex_snippet_keeps_its_groups(mutate, tree):
    m = mutate.Mutant("m", "utils/training/loop.py", r"x = (\w+) or b", r"x = \1", "loop", regex=True)
    mutate.apply(m, tree)
    assert (tree / "utils" / "training" / "loop.py").read_text() == "x = a\ny = 2\n"


def test_the_named_file_wins_when_it_holds_the_snippet(mutate, tree):
    (tree / "utils" / "other.py").write_text("y = 2\n")
    m = mutate.Mutant("m", "utils/training/loop.py", "y = 2", "y = 3", "loop")
    assert mutate.apply(m, tree) == ("utils/training/loop.py", "")


def test_a_snippet_that_moved_to_another_file_is_followed(mutate, tree):
    m = mutate.Mutant("m", "utils/training/loop.py", "z = 3", "z = 4", "loop")
    assert mutate.apply(m, tree) == ("utils/other.py", "")
    assert (tree / "utils" / "other.py").read_text() == "z = 4\n"


def test_a_snippet_found_nowhere_or_twice_is_stale_and_nothing_changes(mutate, tree):
    (tree / "utils" / "twice.py").write_text("z = 3\n")
    before = {p: p.read_text() for p in tree.rglob("*.py")}
    gone = mutate.Mutant("gone", "utils/training/loop.py", "max_grad_norm", "1.0", "loop")
    assert mutate.apply(gone, tree) == (None, "the snippet must occur once; found in no file of utils/")
    twice = mutate.Mutant("twice", "utils/training/loop.py", "z = 3", "z = 4", "loop")  # moved, and copied
    path, why = mutate.apply(twice, tree)
    assert (path, why) == (None, "the snippet must occur once; found in utils/other.py x1, utils/twice.py x1")
    assert {p: p.read_text() for p in tree.rglob("*.py")} == before


def test_every_declared_mutant_applies_to_this_tree(mutate):
    """A stale mutant is reported by the runner; here it is caught when the code moves, so the list is updated."""
    stale = {m.name: why for m in mutate.MUTANTS for path, why in [mutate.locate(m, ROOT)] if path is None}
    assert stale == {}
    assert {m.tests for m in mutate.MUTANTS} <= set(mutate.TESTS)
