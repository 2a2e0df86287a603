"""Text to train on, tokenizers, and language-model windows. Nothing here downloads.

Example::

    >>> text = load_corpus()                         # ~460 KB of English from Python's own docs
    >>> data = make_lm_dataset(text, ByteTokenizer(), context=64)
    >>> data.train.shape[1], data.train.dtype
    (65, torch.int64)
    >>> x, y = data.train[:, :-1], data.train[:, 1:]   # inputs and next-token targets
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from utils.common.checks import check_int

_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".csv", ".json", ".py", ".html", ".tex")


def load_corpus(source: str | os.PathLike | None = None, *, encoding: str = "utf-8") -> str:
    """The text to train on.

    Example::

        >>> len(load_corpus()) > 400_000
        True
        >>> load_corpus("To be, or not to be")
        'To be, or not to be'

    Args:
        source: None (default): the English help topics that ship with every Python
            (``pydoc_data.topics``, ~460 KB). A ``pathlib.Path``, or a string naming an existing
            file: that file, read as ``encoding``. Any other string: the text itself.
        encoding: the file's text encoding (default ``"utf-8"``), e.g. ``"latin-1"`` or
            ``"cp1252"``; used only when ``source`` names a file.

    Raises:
        FileNotFoundError: a ``Path`` (or a one-word string ending in a text suffix such as
            ``.txt``) that names no file.
        ValueError: the text is empty; the file cannot be decoded as ``encoding`` (the message
            names the file and what to do); ``encoding`` is not a codec Python knows.
    """
    if source is None:
        from pydoc_data.topics import topics  # stdlib; always present in CPython

        text = "\n\n".join(topics[key] for key in sorted(topics))  # sorted: the same text every run
    elif isinstance(source, os.PathLike) or _names_a_file(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"load_corpus({str(source)!r}): no such file.")
        text = _read_text(path, source, encoding)
    elif isinstance(source, str):
        text = source
    else:
        raise ValueError(f"load_corpus({source!r}): pass None, a text file's path, or a string of text.")
    if not text:
        raise ValueError(f"load_corpus({source!r}): the text is empty.")
    return text


def _read_text(path: Path, source, encoding: str) -> str:
    call = f"load_corpus({str(source)!r}, encoding={encoding!r})"
    try:
        return path.read_text(encoding=encoding)
    except LookupError:
        raise ValueError(f"{call}: {encoding!r} is not a text encoding Python knows. "
                         "Pass a codec name such as 'utf-8', 'latin-1' or 'cp1252'.") from None
    except UnicodeDecodeError as e:
        bad = " ".join(f"0x{b:02x}" for b in e.object[e.start:e.end])
        raise ValueError(
            f"{call}: {path} is not {encoding} text (byte {bad} at offset {e.start} cannot be decoded). "
            f"Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8.txt`), or, from "
            f"Python, pass its encoding: load_corpus({str(source)!r}, encoding='latin-1')."
        ) from None


def _names_a_file(source) -> bool:
    if not isinstance(source, str) or "\n" in source or len(source) > 4096:
        return False
    looks_like_path = " " not in source.strip() and source.lower().endswith(_TEXT_SUFFIXES)
    return looks_like_path or os.path.isfile(source)


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, every text encodable, matches ``example_model("gpt-micro")``.

    Example::

        >>> tok = ByteTokenizer()
        >>> tok.encode("hé").tolist()
        [104, 195, 169]
        >>> tok.decode(tok.encode("hé"))
        'hé'
    """

    vocab_size: int = 256

    def encode(self, text: str) -> torch.Tensor:
        """A 1-D LongTensor of the text's UTF-8 bytes."""
        data = text.encode("utf-8")
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids) -> str:
        """Text from byte ids; invalid UTF-8 (e.g. a character cut in two) becomes ``\\ufffd``."""
        return bytes(_ints(ids)).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class CharTokenizer:
    """One token per distinct character of a text, in sorted order.

    Example::

        >>> tok = CharTokenizer.from_text("hello")
        >>> tok.vocab_size, tok.encode("hell").tolist()
        (4, [1, 0, 2, 2])
    """

    chars: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(tuple(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """A 1-D LongTensor of character ids.

        Raises:
            ValueError: the text has characters outside the vocabulary (the first few named).
        """
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise ValueError(
                f"CharTokenizer.encode: {len(unknown)} character(s) not in the vocabulary, e.g. "
                f"{''.join(unknown[:10])!r}. Build the tokenizer from a text that contains them."
            )
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in _ints(ids))


def _ints(ids) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


def make_tokenizer(kind: str = "byte", text: str | None = None) -> ByteTokenizer | CharTokenizer:
    """``"byte"`` (default, vocabulary 256) or ``"char"`` (the characters of ``text``).

    Example::

        >>> make_tokenizer().vocab_size, make_tokenizer("char", text="abca").vocab_size
        (256, 3)

    Raises:
        ValueError: an unknown kind, or ``"char"`` without a text.
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        if not text:
            raise ValueError("make_tokenizer('char'): pass text= to build the character vocabulary from.")
        return CharTokenizer.from_text(text)
    raise ValueError(f"make_tokenizer({kind!r}): unknown kind. Use 'byte' or 'char'.")


class LMDataset(NamedTuple):
    """Windows of ``context + 1`` token ids: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""

    train: torch.Tensor  # (N_train, context + 1), int64
    val: torch.Tensor  # (N_val, context + 1), int64


def make_lm_dataset(text: str, tokenizer, context: int, val_fraction: float = 0.1) -> LMDataset:
    """Cut a text into non-overlapping next-token windows and split them into train and validation.

    Example::

        >>> train, val = make_lm_dataset("abcdefghij" * 10, ByteTokenizer(), context=9)
        >>> train.shape, val.shape
        (torch.Size([9, 10]), torch.Size([1, 10]))

    Args:
        text: the corpus (see :func:`load_corpus`).
        tokenizer: anything with ``encode(text) -> 1-D LongTensor`` (:class:`ByteTokenizer`,
            :class:`CharTokenizer`).
        context: the model's sequence length; each window holds ``context + 1`` tokens.
        val_fraction: the share of windows for validation (default 0.1), in ``[0, 1)``. The
            validation windows are the text's *last* ones, so the split is deterministic and
            validation text is never seen in training.

    Raises:
        ValueError: a bad ``context`` or ``val_fraction``, or a text too short for one window in
            each split (the tokens needed and given are named).
    """
    call = f"make_lm_dataset(..., context={context!r}, val_fraction={val_fraction!r})"
    check_int("context", context, minimum=1, call=call, rule="a positive int", message="{call}: {name} must be {rule}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"{call}: val_fraction must be in [0, 1).")
    ids = tokenizer.encode(text).long()  # (n_tokens,)
    width = context + 1
    n_windows = ids.numel() // width
    n_val = math.ceil(n_windows * val_fraction) if val_fraction > 0 else 0
    n_needed = 1 + (1 if val_fraction > 0 else 0)
    if n_windows < n_needed or n_windows - n_val < 1:
        raise ValueError(
            f"{call}: the text has {ids.numel()} tokens, but {n_needed} window(s) of context + 1 = "
            f"{width} tokens need {n_needed * width}. Use more text or a shorter context."
        )
    windows = ids[: n_windows * width].view(n_windows, width)
    return LMDataset(train=windows[: n_windows - n_val].clone(), val=windows[n_windows - n_val:].clone())


# ----------------------------------------------------------------------------------------------
# A labelled task from the same text: which part of the Python reference a window comes from.

# Help topics grouped by the chapter of the Python documentation they come from. Topics that fit
# none cleanly (the debugger, naming, formatting mini-language, ...) are left out.
TOPIC_GROUPS: dict[str, tuple[str, ...]] = {
    "statements": ("assert", "assignment", "async", "augassign", "break", "class", "compound", "continue",
                   "del", "else", "for", "function", "global", "if", "import", "nonlocal", "pass", "raise",
                   "return", "try", "while", "with"),
    "expressions": ("atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
                    "booleans", "calls", "comparisons", "conversions", "dict", "exprlists", "floating",
                    "identifiers", "imaginary", "in", "integers", "lambda", "lists", "operator-summary",
                    "power", "shifting", "slicings", "strings", "subscriptions", "unary", "yield"),
    "data model": ("attribute-access", "callable-types", "context-managers", "customization", "id-classes",
                   "numeric-types", "objects", "sequence-types", "specialattrs", "specialnames"),
    "built-in types": ("bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object",
                       "bltin-type-objects", "string-methods", "truth", "types", "typesfunctions",
                       "typesmapping", "typesmethods", "typesmodules", "typesseq", "typesseq-mutable"),
}


class LabelledDataset(NamedTuple):
    """Windows of ``context`` token ids with one class label each, split into train and validation."""

    train: tuple[torch.Tensor, torch.Tensor]  # (N_train, context) int64, (N_train,) int64
    val: tuple[torch.Tensor, torch.Tensor]
    classes: tuple[str, ...]


def make_topic_dataset(tokenizer=None, context: int = 64, val_fraction: float = 0.1) -> LabelledDataset:
    """Which part of the Python reference a window of its help text comes from: statements,
    expressions, the data model or the built-in types (:data:`TOPIC_GROUPS`), from
    ``pydoc_data.topics``; nothing is downloaded. A classifier must read the words: the groups
    share the same style and layout.

    Example::

        >>> data = make_topic_dataset(context=32)
        >>> data.classes
        ('statements', 'expressions', 'data model', 'built-in types')
        >>> (x, y), (vx, vy) = data.train, data.val
        >>> x.shape[1], y.dtype, int(y.max())
        (32, torch.int64, 3)

    Args:
        tokenizer: default None: :class:`ByteTokenizer`.
        context: tokens per window (default 64).
        val_fraction: the share of each topic's windows kept for validation (its *last* ones, so no
            validation text is seen in training), in ``(0, 1)``.

    Raises:
        ValueError: a bad ``context`` or ``val_fraction``.
    """
    call = f"make_topic_dataset(context={context!r}, val_fraction={val_fraction!r})"
    check_int("context", context, minimum=1, call=call, rule="a positive int", message="{call}: {name} must be {rule}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"{call}: val_fraction must be in (0, 1).")
    from pydoc_data.topics import topics

    tokenizer = tokenizer or ByteTokenizer()
    parts = {"train": ([], []), "val": ([], [])}
    for label, names in enumerate(TOPIC_GROUPS.values()):
        for name in names:
            ids = tokenizer.encode(topics[name]).long()
            n = ids.numel() // context
            if n == 0:
                continue
            windows = ids[: n * context].view(n, context)
            n_val = math.ceil(n * val_fraction) if n > 1 else 0
            for split, rows in (("train", windows[: n - n_val]), ("val", windows[n - n_val:])):
                parts[split][0].append(rows)
                parts[split][1].append(torch.full((rows.shape[0],), label, dtype=torch.long))
    train, val = ((torch.cat(x), torch.cat(y)) for x, y in parts.values())
    return LabelledDataset(train, val, tuple(TOPIC_GROUPS))


class TaskDataset(NamedTuple):
    """Training and validation data for a model's task, and one line saying what it is."""

    train: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # token windows, or (inputs, labels)
    val: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
    description: str


def make_task_dataset(task: str, *, context: int, source=None, val_fraction: float = 0.1,
                      num_classes: int | None = None) -> TaskDataset:
    """The bundled data for a task, byte-tokenized: for a classifier the labelled help topics
    (:func:`make_topic_dataset`), for every token model else windows of ``load_corpus(source)``
    (the masked-LM or seq2seq objective is built from them while training).

    Example::

        >>> make_task_dataset("classifier", context=32).description
        'which part of the Python reference a window comes from (4 classes: statements, expressions, data model, built-in types)'

    Args:
        task: a task of :mod:`utils.models.tasks` (``"causal-lm"``, ``"masked-lm"``, ``"classifier"``, ...).
        source: the text, as :func:`load_corpus` takes it (default None: the bundled help topics).
        num_classes: a classifier's number of classes, checked against the labelled task's.

    Raises:
        ValueError: a classifier given a text (which has no labels) or with too few classes; a
            model that takes no token ids.
    """
    if task == "non-token":
        raise ValueError("make_task_dataset(task='non-token'): the bundled data is token ids; the model takes "
                         "something else. Pass your own batches and loss_fn= to train().")
    if task == "classifier":
        if source is not None:
            raise ValueError(
                f"source={str(source)[:60]!r}: the model is a sequence classifier and a text has no labels. Use the "
                f"bundled labelled task (source=None: which part of the Python reference a window comes from, "
                f"{len(TOPIC_GROUPS)} classes), or train() with your own (inputs, labels).")
        if num_classes is not None and num_classes < len(TOPIC_GROUPS):
            raise ValueError(
                f"The model classifies into {num_classes} classes, but the bundled labelled task (which part of "
                f"the Python reference a window comes from) has {len(TOPIC_GROUPS)}. Build it with "
                f"{len(TOPIC_GROUPS)} classes (num_classes, or num_labels for Hugging Face).")
        data = make_topic_dataset(context=context, val_fraction=max(val_fraction, 0.01))
        what = (f"which part of the Python reference a window comes from ({len(data.classes)} classes: "
                f"{', '.join(data.classes)})")
        return TaskDataset(data.train, data.val, what)
    data = make_lm_dataset(load_corpus(source), ByteTokenizer(), context, val_fraction)
    return TaskDataset(data.train, data.val if data.val.shape[0] else None, f"windows of {context + 1} bytes of text")


def head(data, n: int):
    """The first ``n`` samples of token windows ``(N, T)`` or of an ``(inputs, labels)`` pair."""
    return tuple(t[:n] for t in data) if isinstance(data, tuple) else data[:n]
