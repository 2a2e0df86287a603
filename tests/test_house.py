"""The house rules of ``utils/`` (issue 23): arrows point down, no circle, small modules and folders,
a Trainer that fits on a screen. Read from the source, so a change that breaks one fails here."""
import ast
from pathlib import Path

import pytest

UTILS = Path(__file__).resolve().parents[1] / "utils"

# Lowest first. A module may import from its own layer or a lower one; the longest prefix decides.
LAYERS = [
    ("utils.common",),
    ("utils.data", "utils.models"),
    ("utils.training.settings", "utils.training.batches", "utils.training.objectives", "utils.training.inputs"),
    ("utils.training.amp",),
    ("utils.tiers", "utils.training.runs"),
    ("utils.training.parallel",),
    ("utils.training.loop", "utils.training.wandb_log"),
    ("utils.training.benchmark",),
    ("utils.training.cli_options", "utils.training.cli", "utils.training.amp_utils", "utils.training.__main__"),
    ("utils.notebook",),
]
# Imports that may wait inside a function: heavy, optional, or only on one runtime (Colab, Jupyter),
# and the standard library's 460 KB help text the bundled corpus is read from.
DEFERRED_OK = ("wandb", "matplotlib", "transformers", "pytorch_lightning", "lightning", "IPython", "papermill",
               "ipywidgets", "traitlets", "tqdm", "google", "pydoc_data")
MAX_LINES, MAX_MODULES, MAX_TRAINER_LINES = 550, 10, 200


def module_name(path: Path) -> str:
    parts = path.relative_to(UTILS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(UTILS.rglob("*.py"))}


def layer_of(name: str) -> int | None:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    return None if best is None else best[0]


def utils_imports(path: Path):
    """``(target module, line, inside a function)`` for each import of ``utils`` in ``path``, skipping
    the ``if TYPE_CHECKING:`` blocks that lazy packages keep for type checkers."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
            "TYPE_CHECKING" for n in ast.walk(node)}
    functions = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("utils"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield (full if full in MODULES else node.module), node.lineno, id(node) in functions
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("utils"):
                    yield alias.name, node.lineno, id(node) in functions


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m not in ("utils",) and not m.count(".") == 1 and layer_of(m) is None
            and m not in ("utils.training",)] == []


def test_imports_only_point_down_or_sideways():
    upward = [f"{name}:{line} imports {target}" for name, path in MODULES.items() if layer_of(name) is not None
              for target, line, _ in utils_imports(path)
              if layer_of(target) is not None and layer_of(target) > layer_of(name)]
    assert upward == []


def test_no_import_of_utils_inside_a_function():
    inside = [f"{name}:{line} imports {target}" for name, path in MODULES.items()
              for target, line, in_function in utils_imports(path) if in_function]
    assert inside == []


def test_only_heavy_optional_dependencies_are_imported_inside_functions():
    late = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                    late += [f"{name}:{node.lineno} {n}" for n in names if n.split(".")[0] not in DEFERRED_OK]
    assert late == []


def test_no_import_circle():
    graph = {name: {t for t, _, _ in utils_imports(path) if t in MODULES and t != name}
             for name, path in MODULES.items()}
    seen, on_path, circles = set(), [], []

    def visit(node):
        if node in on_path:
            circles.append(on_path[on_path.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        on_path.append(node)
        for nxt in sorted(graph[node]):
            if not (nxt in ("utils", "utils.training", "utils.tiers", "utils.models") and node.startswith(nxt)):
                visit(nxt)
        on_path.pop()

    for name in sorted(graph):
        visit(name)
    assert circles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_the_line_limit(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES


def test_no_folder_over_ten_modules():
    counts = {str(d.relative_to(UTILS.parent)): len(list(d.glob("*.py"))) for d in UTILS.rglob("*")
              if d.is_dir() and d.name != "__pycache__"}
    assert {d: n for d, n in counts.items() if n > MAX_MODULES} == {}


def test_the_trainer_fits_on_a_screen_and_owns_its_state():
    from utils.training.loop.trainer import Trainer

    tree = ast.parse(MODULES["utils.training.loop.trainer"].read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert cls.end_lineno - cls.lineno + 1 <= MAX_TRAINER_LINES
    assert callable(Trainer.state_dict) and callable(Trainer.load_state_dict)


def test_the_checkpoint_format_touches_no_trainer():
    tree = ast.parse(MODULES["utils.training.runs.checkpoint"].read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {n.arg for n in ast.walk(tree) if
                                                                          isinstance(n, ast.arg)}
    assert not {n for n in names if "trainer" in n.lower()}


def test_the_readme_tree_names_every_folder_of_the_package():
    readme = (UTILS.parent / "README.md").read_text()
    tree = readme[readme.index("```text\nutils/"):]
    tree = tree[:tree.index("```", 3)]
    folders = {str(d.relative_to(UTILS.parent)) + "/" for d in UTILS.rglob("*")
               if d.is_dir() and d.name != "__pycache__" and list(d.glob("*.py"))}
    named = {f for f in folders if f in tree or f.removeprefix("utils/") in tree}
    assert folders - named == set()
