"""Models to validate and train: small built-in examples, and the user's own from a file or a gist.

Example::

    >>> model = example_model("gpt-micro")           # byte-level, CPU-sized
    >>> logits = model(torch.randint(0, 256, (2, 16)))
    >>> tuple(logits.shape)
    (2, 16, 256)
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import re
import sys
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.common.checks import is_int, is_number

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Built-in examples


@dataclass(frozen=True)
class GPTConfig:
    """Size of a :class:`GPT`. ``block_size`` is the context length."""

    vocab_size: int = 4096
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True


@dataclass(frozen=True)
class EncoderConfig:
    """Size of an :class:`EncoderClassifier`. ``max_seq_len`` is the context length."""

    vocab_size: int = 256
    max_seq_len: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    num_classes: int = 2
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only language model in the style of nanoGPT: token and learned position embeddings,
    pre-LayerNorm blocks with causal SDPA attention, and an output head tied to the token embedding.

    Example::

        >>> model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64))
        >>> model(torch.zeros(1, 8, dtype=torch.long)).shape
        torch.Size([1, 8, 256])

    Args:
        config: a :class:`GPTConfig`; kept as ``model.config`` so ``find_vocab_size`` and
            ``find_context_length`` read it.
    """

    def __init__(self, config: GPTConfig | None = None):
        super().__init__()
        config = GPTConfig() if config is None else config
        _raise_for_config(config, f"GPT({config!r})")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` of shape ``(B, T)``."""
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(
                f"Cannot run a sequence of length {t}: this model's context is "
                f"block_size={self.config.block_size}."
            )
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)


class EncoderClassifier(nn.Module):
    """A bidirectional ``nn.TransformerEncoder`` over token ids, mean-pooled into class logits.

    Example::

        >>> model = EncoderClassifier(EncoderConfig(num_classes=3))
        >>> model(torch.zeros(2, 10, dtype=torch.long)).shape
        torch.Size([2, 3])
    """

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        config = EncoderConfig() if config is None else config
        _raise_for_config(config, f"EncoderClassifier({config!r})")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.n_embd)
        layer = nn.TransformerEncoderLayer(
            config.n_embd, config.n_head, dim_feedforward=4 * config.n_embd, dropout=config.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # Nested tensors need norm_first=False; without them there is nothing to warn about.
        self.encoder = nn.TransformerEncoder(layer, config.n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` for token ids of shape ``(B, T)``."""
        _, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(
                f"Cannot run a sequence of length {t}: this model's context is "
                f"max_seq_len={self.config.max_seq_len}."
            )
        pos = torch.arange(t, device=input_ids.device)
        x = self.encoder(self.tok_emb(input_ids) + self.pos_emb(pos))  # (B, T, C)
        return self.head(self.norm(x).mean(dim=1))  # (B, num_classes)


EXAMPLE_MODELS: dict[str, tuple[type[nn.Module], object]] = {
    # The reference model of the training-loop benchmark.
    "gpt-tiny": (GPT, GPTConfig()),
    # Same class, byte-level: for tests and CI-sized notebook runs.
    "gpt-micro": (GPT, GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)),
    "encoder-classifier": (EncoderClassifier, EncoderConfig()),
}


def _config_problems(config) -> list[str]:
    """What is wrong with a config's values, one phrase per problem (empty when it is fine)."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "int" and not is_int(value, minimum=1):
            problems.append(f"{f.name}={value!r} must be a positive int")
        elif f.type == "float" and not is_number(value, minimum=0.0, below=1.0):
            problems.append(f"{f.name}={value!r} must be a float in [0, 1)")
        elif f.type == "bool" and not isinstance(value, bool):
            problems.append(f"{f.name}={value!r} must be True or False")
    if not problems and config.n_embd % config.n_head:
        problems.append(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
    return problems


def _raise_for_config(config, call: str) -> None:
    problems = _config_problems(config)
    if problems:
        raise ValueError(f"{call}: {'; '.join(problems)}.")


def example_model(name: str = "gpt-tiny", **overrides) -> nn.Module:
    """Build one of the built-in example models, optionally resized.

    Example::

        >>> model = example_model("gpt-micro", n_layer=1)
        >>> model.config.n_layer, model.config.vocab_size
        (1, 256)
        >>> example_model("encoder-classifier", num_classes=5)(torch.zeros(1, 4, dtype=torch.long)).shape
        torch.Size([1, 5])

    Args:
        name: ``"gpt-tiny"`` (default; the training benchmark's reference model: vocab 4096,
            width 256, 4 layers, 4 heads, context 128, ~4.2M parameters), ``"gpt-micro"``
            (vocab 256 = bytes, width 64, 2 layers, 2 heads, context 64) or
            ``"encoder-classifier"`` (bidirectional encoder, class logits ``(B, num_classes)``).
        **overrides: config fields to change (see :class:`GPTConfig`, :class:`EncoderConfig`).

    Raises:
        ValueError: an unknown name, an unknown override, or a bad value; the message lists what
            is allowed.
    """
    call = ", ".join([repr(name)] + [f"{k}={v!r}" for k, v in overrides.items()])
    call = f"example_model({call})"
    if name not in EXAMPLE_MODELS:
        raise ValueError(f"{call}: unknown model {name!r}. Available: {', '.join(map(repr, EXAMPLE_MODELS))}.")
    cls, config = EXAMPLE_MODELS[name]
    allowed = [f.name for f in dataclasses.fields(config)]
    unknown = [k for k in overrides if k not in allowed]
    if unknown:
        raise ValueError(
            f"{call}: unknown override {', '.join(map(repr, unknown))}. "
            f"{name!r} accepts: {', '.join(allowed)}."
        )
    config = dataclasses.replace(config, **overrides)
    _raise_for_config(config, call)
    return cls(config)


# ----------------------------------------------------------------------------------------------
# The user's own model, from a file


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
        Each call imports the file again (as ``_user_model_<n>_<stem>``), and the sibling modules it
        imported are forgotten afterwards, so edits are picked up and two loads never share state.
    """
    path = _user_file(path)
    call = f"load_model_from_file({str(path)!r}" + (f", class_name={class_name!r})" if class_name else ")")
    with _importable_folder(path.parent):
        module = _import_fresh(path)
        return _build(module, path, class_name, config, call)


_LOADED_COUNT = 0
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
    global _LOADED_COUNT
    _LOADED_COUNT += 1
    name = f"_user_model_{_LOADED_COUNT}_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses and pickling look a class's module up in sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
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


# ----------------------------------------------------------------------------------------------
# The user's own model, from a GitHub gist

GIST_API_URL = "https://api.github.com"
_GIST_HOSTS = frozenset({"gist.github.com", "gist.githubusercontent.com", "api.github.com"})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_GIST_ID = re.compile(r"[0-9a-f]{20,40}|[0-9]{1,12}")
_REVISION = re.compile(r"[0-9a-f]{40}")
_MAX_BYTES = 5_000_000


class GistDownloadError(OSError):
    """Downloading a gist failed; the message gives the HTTP status (when there was one) and a hint."""


def load_model_from_gist(
    gist: str,
    class_name: str | None = None,
    config: dict | None = None,
    *,
    filename: str | None = None,
    timeout: float = 10.0,
    api_url: str = GIST_API_URL,
) -> nn.Module:
    """Download a gist's Python file and build the ``nn.Module`` it defines.

    Example::

        >>> model = load_model_from_gist("https://gist.github.com/someone/0123456789abcdef0123")  # doctest: +SKIP
        >>> model = load_model_from_gist("0123456789abcdef0123@<40-hex revision>#sha256=<64 hex>")  # doctest: +SKIP

    Args:
        gist: a gist id (hex) or its URL on ``gist.github.com`` / ``gist.githubusercontent.com``;
            ``ID@REV`` (or a URL with the revision in it) fetches that revision, not the latest;
            a ``#sha256=HEX`` suffix pins the file's content: anything else is refused unexecuted.
        class_name, config: as for :func:`load_model_from_file`.
        filename: which ``.py`` file of the gist. Default None: its only ``.py`` file.
        timeout: seconds for the whole download (default 10), all requests and redirects together.
        api_url: the GitHub API (default ``https://api.github.com``). Only that host, or a loopback
            address such as ``http://127.0.0.1:8000`` for tests, is accepted.

    Raises:
        ValueError: a URL on another host or not https, an id or revision that is not hex, a bad
            pin, a gist with no or several ``.py`` files (listed), or any error of
            :func:`load_model_from_file`.
        GistDownloadError: the download failed, timed out, was redirected off the gist hosts or
            off https, the reply was not the API's shape, or the content does not match the pin.

    .. warning::
        The gist's code is **executed** on this machine, with your permissions. Load only gists
        you wrote or have read; pin them with ``@REV#sha256=`` so that what runs is what you read.
    """
    call = f"load_model_from_gist({gist!r})"
    base = _checked_api_url(api_url, call)
    ref = _gist_ref(gist, call)
    deadline = _Deadline(timeout, call)
    url = f"{base}/gists/{ref.gist_id}" + (f"/{ref.revision}" if ref.revision else "")
    try:
        listing = json.loads(_fetch(url, deadline, base, call))
    except json.JSONDecodeError as e:
        raise GistDownloadError(f"{call}: {url} did not return JSON ({e}). Is api_url the GitHub API?") from e
    name, entry = _pick_gist_file(_files_of(listing, url, call), filename, call)
    code = entry.get("content")
    if not isinstance(code, str) or entry.get("truncated"):
        raw_url = entry.get("raw_url")
        if not isinstance(raw_url, str) or not raw_url:
            raise GistDownloadError(f"{call}: {url} gave file {name!r} with neither content nor a raw_url.")
        code = _fetch(raw_url, deadline, base, call)
    _check_pin(code, ref.sha256, name, call)
    with tempfile.TemporaryDirectory(prefix=f"gist-{ref.gist_id}-") as folder:
        target = Path(folder) / Path(name).name
        target.write_text(code, encoding="utf-8")
        return load_model_from_file(target, class_name=class_name, config=config)


def _checked_api_url(api_url: str, call: str) -> str:
    parts = urllib.parse.urlsplit(api_url)
    official = parts.scheme == "https" and parts.hostname == "api.github.com"
    loopback = parts.scheme in ("http", "https") and parts.hostname in _LOOPBACK_HOSTS
    if not (official or loopback):
        raise ValueError(
            f"{call}: api_url={api_url!r} is not allowed. Use https://api.github.com, or a loopback "
            f"address such as http://127.0.0.1:8000 for tests."
        )
    return api_url.rstrip("/")


@dataclass(frozen=True)
class _GistRef:
    gist_id: str
    revision: str | None = None
    sha256: str | None = None


def _gist_ref(gist: str, call: str) -> _GistRef:
    """``ID``, ``ID@REV``, or a gist URL (with a revision in it or not); then ``#sha256=HEX``."""
    text, _, pin = str(gist).strip().partition("#")
    sha256 = None
    if pin:
        sha256 = pin.removeprefix("sha256=")
        if not pin.startswith("sha256=") or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"{call}: '#{pin}' is not a pin: expected #sha256= and 64 lowercase hex digits.")
    gist_id, revision = _url_parts(text, call) if "://" in text else (text.partition("@")[0], text.partition("@")[2] or None)
    if not _GIST_ID.fullmatch(gist_id):
        raise ValueError(
            f"{call}: {gist_id!r} is not a gist id: expected 20 to 40 lowercase hex digits "
            f"(or the digits of an old numeric id)."
        )
    if revision is not None and not _REVISION.fullmatch(revision):
        raise ValueError(f"{call}: {revision!r} is not a gist revision: expected 40 lowercase hex digits.")
    return _GistRef(gist_id, revision, sha256)


def _url_parts(text: str, call: str) -> tuple[str, str | None]:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "https" or parts.hostname not in ("gist.github.com", "gist.githubusercontent.com"):
        raise ValueError(
            f"{call}: only https://gist.github.com and https://gist.githubusercontent.com URLs are "
            f"accepted, or a bare gist id."
        )
    seg = [s.removesuffix(".git") for s in parts.path.split("/") if s]
    if parts.hostname == "gist.githubusercontent.com":  # /<user>/<id>/raw[/<rev>]/<file>
        rev = seg[3] if len(seg) >= 5 and seg[2] == "raw" and _REVISION.fullmatch(seg[3]) else None
        return (seg[1] if len(seg) > 1 else ""), rev
    # gist.github.com: /<id>, /<id>/<rev>, /<user>/<id>, /<user>/<id>/<rev>
    if len(seg) == 2 and _GIST_ID.fullmatch(seg[0]) and _REVISION.fullmatch(seg[1]):
        return seg[0], seg[1]
    if len(seg) >= 3:
        return seg[1], seg[2]
    return (seg[0] if len(seg) == 1 else seg[1] if seg else ""), None


def _files_of(listing, url: str, call: str) -> dict:
    """The API's ``files``: a dict of file name → dict entry; anything else is one clear error."""
    files = listing.get("files") if isinstance(listing, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise GistDownloadError(
            f"{call}: {url} did not answer as the GitHub gist API does (expected an object with a "
            f"'files' object of file entries). Is api_url the GitHub API?"
        )
    return files


def _check_pin(code: str, sha256: str | None, name: str, call: str) -> None:
    if sha256 is None:
        return
    got = hashlib.sha256(code.encode("utf-8")).hexdigest()
    if got != sha256:
        raise GistDownloadError(f"{call}: {name} has sha256 {got}, not the pinned {sha256}; it was not executed.")


class _Deadline:
    """One time limit for a whole download: each socket operation waits at most what is left."""

    def __init__(self, seconds: float, call: str):
        self.seconds, self.call, self.end = seconds, call, time.monotonic() + seconds

    def left(self, url: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise GistDownloadError(f"{self.call}: downloading {url} took longer than timeout={self.seconds} s.")
        return left


class _SameHostsRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to the gist hosts over https (or to the loopback test server)."""

    def __init__(self, base: str):
        self.base = urllib.parse.urlsplit(base)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not _allowed(newurl, self.base):
            raise GistDownloadError(f"Refusing a redirect from {req.full_url} to {newurl}: only https to a gist host.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _allowed(url: str, base) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.hostname in _GIST_HOSTS:
        return parts.scheme == "https"
    return (parts.hostname, parts.port, parts.scheme) == (base.hostname, base.port, base.scheme)


def _fetch(url: str, deadline: _Deadline, base: str, call: str) -> str:
    if not _allowed(url, urllib.parse.urlsplit(base)):
        raise ValueError(f"{call}: refusing to download {url}: only HTTPS from the gist hosts is allowed.")
    opener = urllib.request.build_opener(_SameHostsRedirects(base))
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.github+json",
                                                   "User-Agent": "amp-transformer-notebooks"})
    try:
        with opener.open(request, timeout=deadline.left(url)) as response:
            body = _read(response, deadline, url, call)
    except urllib.error.HTTPError as e:
        raise GistDownloadError(f"{call}: GET {url} failed with HTTP {e.code} {e.reason}. {_hint(e.code)}") from e
    except (urllib.error.URLError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, GistDownloadError):
            raise reason from e
        raise GistDownloadError(
            f"{call}: could not reach {url}: {reason}. Check the network, or download the file and "
            f"use load_model_from_file()."
        ) from e
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GistDownloadError(f"{call}: {url} is not UTF-8 text ({e}).") from e


def _read(response, deadline: _Deadline, url: str, call: str) -> bytes:
    """The body, a chunk at a time, against the deadline (a server dripping bytes cannot stall it)."""
    chunks, size = [], 0
    while True:
        deadline.left(url)
        chunk = response.read1(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_BYTES:
            raise GistDownloadError(f"{call}: {url} is larger than {_MAX_BYTES} bytes; refusing it.")


def _hint(status: int) -> str:
    if status == 404:
        return "Check the gist id: the gist may be deleted, or the id mistyped."
    if status in (403, 429):
        return ("GitHub's API allows 60 unauthenticated requests an hour; wait, or download the file "
                "and use load_model_from_file().")
    return "Try again later, or download the file and use load_model_from_file()."


def _pick_gist_file(files: dict, filename: str | None, call: str) -> tuple[str, dict]:
    python = sorted(name for name in files if name.endswith(".py"))
    if filename is not None:
        if filename not in files:
            raise ValueError(f"{call}: the gist has no file {filename!r}. It has: {', '.join(sorted(files))}.")
        return filename, files[filename]
    if not python:
        raise ValueError(f"{call}: the gist has no .py file. It has: {', '.join(sorted(files)) or 'no files'}.")
    if len(python) > 1:
        raise ValueError(f"{call}: the gist has several .py files: {', '.join(python)}. Pass filename=.")
    return python[0], files[python[0]]


# ----------------------------------------------------------------------------------------------
# One entry point for "the model the user named"

MODEL_SOURCES = ("'example'", "'example:NAME'", "a path to a .py file", "'gist:ID'", "a gist URL")


def parse_model_source(source) -> tuple[str, str]:
    """The one grammar of model sources (notebook ``model_source``, CLI ``--model``):
    ``(kind, value)`` with kind ``"example"``, ``"file"`` or ``"gist"``.

    Example::

        >>> parse_model_source("example:gpt-micro"), parse_model_source("my_model.py")
        (('example', 'gpt-micro'), ('file', 'my_model.py'))

    Raises:
        ValueError: not a source; the message lists the forms (and the example names).
    """
    text = str(source).strip()
    kind, sep, rest = text.partition(":")
    if text == "example" or (sep and kind == "example" and rest in EXAMPLE_MODELS):
        return "example", rest or "gpt-tiny"
    if sep and kind == "gist" and rest:
        return "gist", rest
    if "://" in text or _GIST_ID.fullmatch(text):
        return "gist", text
    if text.endswith(".py"):
        return "file", text
    raise ValueError(
        f"{text!r} is not a model source: use 'example', 'example:NAME' (NAME one of "
        f"{', '.join(EXAMPLE_MODELS)}), a path to a .py file, 'gist:ID' or a gist URL."
    )


def load_model(source: str = "example", *, class_name: str | None = None, config: dict | None = None) -> nn.Module:
    """Build the model a notebook setting or a command-line flag names.

    Example::

        >>> load_model("example:gpt-micro").config.vocab_size
        256
        >>> model = load_model("nanogpt/model.py", class_name="GPT", config={"n_layer": 2})  # doctest: +SKIP

    Args:
        source: ``"example"`` (gpt-tiny), ``"example:NAME"`` (a built-in example), ``"PATH.py"``
            (a file defining an ``nn.Module``; it is executed), ``"gist:ID"``, a gist URL or a bare
            gist id (the gist's code is downloaded and executed). See :func:`parse_model_source`.
        class_name, config: passed on to the file or gist loader (:func:`load_model_from_file`:
            ``config`` may describe the model's config object); ``config`` are overrides for an example.

    Raises:
        ValueError: ``source`` is none of these; the message lists them.
    """
    try:
        kind, value = parse_model_source(source)
    except ValueError as e:
        raise ValueError(f"load_model(source={source!r}): {e}") from None
    if kind == "example":
        return example_model(value, **(config or {}))
    if kind == "gist":
        return load_model_from_gist(value, class_name, config)
    return load_model_from_file(value, class_name, config)
