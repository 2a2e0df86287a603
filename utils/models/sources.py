"""The model the user named: one grammar of model sources (a notebook's ``model_source``, the command
line's ``--model``) and one loader for them.

Example::

    >>> load_model("example:gpt-micro").config.vocab_size
    256
"""

from __future__ import annotations

from torch import nn

from utils.models.examples import EXAMPLE_MODELS, example_model
from utils.models.gist import GIST_ID, load_model_from_gist
from utils.models.user_file import load_model_from_file

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
    if "://" in text or GIST_ID.fullmatch(text):
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
