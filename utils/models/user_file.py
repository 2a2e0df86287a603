"""The user's own model, from a Python file: imported fresh, and the ``nn.Module`` it defines built.

Example::

    >>> model = load_model_from_file("my_model.py", "GPT", {"n_layer": 2})  # doctest: +SKIP

Which class, builder or instance was used, and why, is logged (INFO, this module's logger): the
command line's summary says it.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import inspect
import logging
import re
import sys
import types
import uuid
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)


def load_model_from_file(path, class_name: str | None = None, config: dict | None = None) -> nn.Module:
    """Import a Python file as a fresh module and build the ``nn.Module`` it defines.

    Example::

        >>> model = load_model_from_file("my_model.py")                     # doctest: +SKIP
        >>> model = load_model_from_file("my_model.py", "GPT", {"n_layer": 2})  # doctest: +SKIP

    What the file may hold, in the order looked for:

    - a ``build_model()``, ``get_model()`` or ``create_model()`` function: called with ``config``;
    - a module-level ``nn.Module`` instance with parameters (``model = GPT(GPTConfig())``);
    - ``nn.Module`` classes: the one no other class there uses (a ``Block`` used by ``GPT`` is
      skipped). A constructor taking one config object (``GPT(config: GPTConfig)``,
      ``Transformer(params: ModelArgs)``) gets that class built from ``config``: the class named by
      the annotation, else the one config-like class in the file (a dataclass, or ``*Config``,
      ``*Args``, ``*Params``), else the model's ``get_default_config()`` with ``config`` set on it.

    Args:
        path: the ``.py`` file. It is executed, like ``import``: load only code you trust. Its
            folder is importable while it loads, so ``from model import GPT`` finds a sibling file.
        class_name: which class, builder function or instance to use. Default None: as above.
        config: keyword arguments for the constructor, the builder or the config class. Default
            None: none, so every parameter needs a default.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file defines no model, several candidates (listed), no class named
            ``class_name`` (the candidates listed), or the constructor needs arguments that
            ``config`` does not give (named), or gets ones it does not take.

    .. note::
        Each call imports the file again (as ``_user_model_<random hex>_<stem>``), and the sibling modules it
        imported are forgotten afterwards, so edits are picked up and two loads never share state.
    """
    path = _user_file(path)
    call = f"load_model_from_file({str(path)!r}" + (f", class_name={class_name!r})" if class_name else ")")
    with _importable_folder(path.parent):
        module = _import_fresh(path)
        return _build(module, path, class_name, config, call)


BUILDER_NAMES = ("build_model", "get_model", "create_model")
_CONFIG_PARAM_NAMES = ("config", "cfg", "conf", "args", "params", "model_args", "hparams")


def _user_file(path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"load_model_from_file({str(path)!r}): no such file.")
    if path.suffix != ".py":
        raise ValueError(f"load_model_from_file({str(path)!r}): expected a Python file ending in .py.")
    return path


@contextlib.contextmanager
def _importable_folder(folder: Path):
    """``folder`` first on ``sys.path`` while loading; the sibling modules imported from it are
    dropped from ``sys.modules`` afterwards, so another folder's ``model.py`` is not mistaken for it."""
    folder = folder.resolve()
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if not name.startswith("_user_model_") and file and Path(file).resolve().is_relative_to(folder):
                del sys.modules[name]


def _import_fresh(path: Path) -> types.ModuleType:
    # A name no other load takes: two loads of one file never share a module (nor a counter to keep).
    name = f"_user_model_{uuid.uuid4().hex[:12]}_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses and pickling look a class's module up in sys.modules.
    sys.modules[name] = module
    try:  # compiled from the source every time: a cached .pyc keyed on (mtime, size) misses an edit made
        # within the same second that keeps the size, and the user's folder gets no __pycache__
        exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)  # noqa: S102
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _build(module: types.ModuleType, path: Path, class_name: str | None, config: dict | None, call: str) -> nn.Module:
    """The model the file defines: a named object, a builder function, an instance, or a class.
    Which one, and why, is logged (INFO, this module's logger): the command line's summary says it."""
    model, how = _build_and_say(module, path, class_name, config, call)
    log.info("%s: %s", call, how, extra={"choice": how})
    return model


def _build_and_say(module, path: Path, class_name: str | None, config: dict | None, call: str) -> tuple[nn.Module, str]:
    found = vars(module).get(class_name) if class_name else None
    if class_name and not isinstance(found, type):
        if isinstance(found, nn.Module):
            return (_use_instance(class_name, found, config, call),
                    f"used the instance {class_name} = {type(found).__name__}(...) that class_name={class_name!r} names")
        if inspect.isfunction(found):
            return (_checked_model(_construct(found, config, call, module), found.__name__, call),
                    f"built by {class_name}(), the function class_name={class_name!r} names")
    if not class_name:
        builder = next((vars(module)[n] for n in BUILDER_NAMES if inspect.isfunction(vars(module).get(n))), None)
        if builder is not None:
            return (_checked_model(_construct(builder, config, call, module), builder.__name__, call),
                    f"built by {builder.__name__}() (a {'(), '.join(BUILDER_NAMES)}() function comes first)")
        instances = _module_instances(module)
        if len(instances) > 1:
            raise ValueError(f"{call}: several nn.Module instances could be the model: {', '.join(sorted(instances))}. "
                             f"Pass class_name= one of them.")
        if instances:
            name, instance = next(iter(instances.items()))
            return (_use_instance(name, instance, config, call),
                    f"used {name} = {type(instance).__name__}(...), the file's one module-level nn.Module instance")
    cls = _pick_model_class(module, path, class_name, call)
    return _construct(cls, config, call, module), _why_class(cls, module, class_name)


def _why_class(cls: type, module: types.ModuleType, class_name: str | None) -> str:
    """Why ``cls`` was the class built: named, the only one, or the one no other class uses."""
    if class_name:
        return f"built {cls.__name__}, the class class_name={class_name!r} names"
    parts = sorted(set(_module_classes(module)) - {cls.__name__})
    if not parts:
        return f"built {cls.__name__}, the file's one nn.Module class"
    return (f"built {cls.__name__}, the one nn.Module class no other class uses ({', '.join(parts)}: "
            f"parts of others)")


def _module_instances(module: types.ModuleType) -> dict[str, nn.Module]:
    """Module-level ``nn.Module`` objects with parameters (a loss object such as ``nn.CrossEntropyLoss()``
    has none, so it is not taken for the model)."""
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, nn.Module) and not name.startswith("_") and any(True for _ in obj.parameters())}


def _use_instance(name: str, model: nn.Module, config: dict | None, call: str) -> nn.Module:
    if config:
        raise ValueError(f"{call}: the file builds the model itself ({name} = {type(model).__name__}(...)), so "
                         f"config={config!r} cannot change it. Edit the file, or pass class_name= a class to build.")
    return model


def _checked_model(model, builder: str, call: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"{call}: {builder}() returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def _module_classes(module: types.ModuleType) -> dict[str, type]:
    """The ``nn.Module`` subclasses defined in the module itself (not imported into it)."""
    return {
        name: obj for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__
    }


def _names_used_by_other_classes(path: Path, classes: dict[str, type]) -> set[str]:
    """Class names that appear inside another candidate's ``class`` statement (bases or body)."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and node.name in classes:
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            used |= (names & set(classes)) - {node.name}
    return used


def _pick_model_class(module: types.ModuleType, path: Path, class_name: str | None, call: str) -> type:
    classes = _module_classes(module)
    if not classes:
        raise ValueError(
            f"{call}: the file defines no nn.Module subclass, no module-level nn.Module instance and no "
            f"{'(), '.join(BUILDER_NAMES)}() function. Define one of them, or import the model into a small "
            f"wrapper file that does."
        )
    if class_name is not None:
        if class_name not in classes:
            raise ValueError(
                f"{call}: the file defines no nn.Module named {class_name!r}. "
                f"It defines: {', '.join(sorted(classes))}."
            )
        return classes[class_name]
    top = sorted(set(classes) - _names_used_by_other_classes(path, classes)) or sorted(classes)
    if len(top) > 1:
        raise ValueError(
            f"{call}: several nn.Module classes could be the model: {', '.join(top)}. "
            f"Pass class_name= one of them."
        )
    return classes[top[0]]


def _construct(cls, config: dict | None, call: str, module: types.ModuleType | None = None) -> nn.Module:
    """``cls(**config)`` with the arguments checked; a constructor taking one config object gets it
    built from ``config`` (see :func:`load_model_from_file`)."""
    config = {} if config is None else dict(config)
    named = _named_params(cls)
    holder = _config_holder(cls, named, config, module)
    if holder is not None:
        param, make = holder
        return cls(**{param: make(config, call)})
    return _call_checked(cls, config, call)


def _named_params(fn) -> list[inspect.Parameter]:
    params = inspect.signature(fn).parameters.values()
    return [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _call_checked(fn, config: dict, call: str):
    params = list(inspect.signature(fn).parameters.values())
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    named = _named_params(fn)
    missing = [p.name for p in named if p.default is p.empty and p.name not in config]
    unknown = [] if takes_any else [k for k in config if k not in {p.name for p in named}]
    if missing:
        raise ValueError(
            f"{call}: {fn.__name__}() needs {', '.join(missing)}, which config does not give. "
            f"Pass config={{{', '.join(f'{m!r}: ...' for m in missing)}}}."
        )
    if unknown:
        raise ValueError(
            f"{call}: {fn.__name__}() does not take {', '.join(map(repr, unknown))}. "
            f"It takes: {', '.join(p.name for p in named) or 'no arguments'}."
        )
    return fn(**config)


def _config_holder(cls, named: list, config: dict, module):
    """``(parameter, make)`` when ``cls`` takes one config object that ``config``'s keys describe;
    ``make(config, call)`` builds it. None when ``config`` names the constructor's own arguments."""
    required = [p for p in named if p.default is p.empty]
    target = required[0] if len(required) == 1 else (named[0] if len(named) == 1 else None)
    if target is None or (config and set(config) <= {p.name for p in named}):
        return None
    if not config and target.default is not target.empty:  # nothing to build: the default stands
        return None
    config_cls = _config_class(target, module)
    if config_cls is not None:
        return target.name, lambda values, call: _call_checked(config_cls, values, call)
    defaults = getattr(cls, "get_default_config", None)
    if callable(defaults) and target.name in _CONFIG_PARAM_NAMES:
        return target.name, lambda values, call: _set_all(defaults(), values)
    return None


def _set_all(obj, values: dict):
    for key, value in values.items():
        setattr(obj, key, value)
    return obj


def _config_class(param: inspect.Parameter, module) -> type | None:
    """The config class for ``param``: its annotation (a class, or a name in ``module``), else the one
    config-like class ``module`` defines when the parameter is named like a config."""
    annotation = param.annotation
    if isinstance(annotation, str) and module is not None:  # from __future__ import annotations
        words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", annotation)
        annotation = next((vars(module)[w] for w in words if isinstance(vars(module).get(w), type)), None)
    if annotation is not param.empty and isinstance(annotation, type) and annotation.__module__ != "builtins" and not issubclass(annotation, nn.Module):
        return annotation
    if param.annotation is not param.empty or module is None or param.name not in _CONFIG_PARAM_NAMES:
        return None
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and obj.__module__ == module.__name__ and not issubclass(obj, nn.Module)
             and (dataclasses.is_dataclass(obj) or obj.__name__.endswith(("Config", "Args", "Params")))]
    return found[0] if len(found) == 1 else None
