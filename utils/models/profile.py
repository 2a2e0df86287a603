"""One look at a model: what the entry points need to know about it, found once and passed down.

``train()``, the tiers, the benchmark, the memory plan and the AMP doctor each begin with
:func:`look_at`; the functions below them take the :class:`ModelProfile` instead of finding the
vocabulary, reading ``forward``'s signature or probing the task again. The sizes, the calling
convention and whether a plain forward returns its own loss (one probe call on ``(2, 4)`` zeros) are
read at the look; the task (the causality probe, up to three forward passes) lazily, on first
need, once per profile.

Example::

    >>> profile = look_at(example_model("gpt-micro"))           # doctest: +SKIP
    >>> profile.vocab_size, profile.context_length, profile.input_kind   # doctest: +SKIP
    (256, 64, 'tokens')
    >>> profile.task.task                                       # the probe runs here, once  # doctest: +SKIP
    'causal-lm'
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from utils.models.calls import ModelCall, read_call
from utils.models.sizes import InputSpec, Sizes, read_sizes
from utils.models.tasks import TaskInfo, check_task, detect_task

TOKENS, EMBEDDINGS, OTHER = "tokens", "embeddings", "other"
INPUT_KINDS = (TOKENS, EMBEDDINGS, OTHER)
_TAKES_VECTORS = (nn.Linear, nn.MultiheadAttention, nn.LayerNorm)


@dataclass(frozen=True)
class ModelProfile:
    """What the suite knows about one model, read once by :func:`look_at`.

    Attributes:
        sizes: vocabulary, context length, width, layers and input embedding
            (:class:`~utils.models.sizes.Sizes`); ``vocab_size`` is the one given, if any.
        call: how the suite calls the model (:class:`~utils.models.calls.ModelCall`).
        stated_task: ``task=`` as given (None: detected on first use of :attr:`task`).
        caller: how the entry point was called, repeated in errors (e.g. ``"train(GPT)"``).
    """

    sizes: Sizes
    call: ModelCall
    stated_task: str | None = None
    caller: str = "look_at(model)"

    @property
    def model(self) -> nn.Module:
        """The user's module (inside any DDP or ``torch.compile`` wrapper)."""
        return self.sizes.module

    @property
    def vocab_size(self) -> int | None:
        return self.sizes.vocab_size

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model names; None when it names none."""
        return self.sizes.context_length

    @property
    def embedding(self) -> nn.Embedding | None:
        return self.sizes.embedding

    @property
    def input_kind(self) -> str:
        """``"tokens"`` (it has a vocabulary), ``"embeddings"`` (its first layer with parameters takes
        float vectors) or ``"other"`` (images, signals, ...)."""
        if self.vocab_size is not None:
            return TOKENS
        first = next((m for m in self.model.modules() if next(m.parameters(recurse=False), None) is not None), None)
        return EMBEDDINGS if isinstance(first, _TAKES_VECTORS) else OTHER

    @property
    def returns_loss(self) -> bool:
        """Whether ``model(ids)`` returns its loss, not logits (probed at the look, see
        :func:`~utils.models.calls.read_call`)."""
        return bool(self.call.returns_loss)

    @functools.cached_property
    def task(self) -> TaskInfo:
        """What the model predicts (:func:`~utils.models.tasks.detect_task`), found on first use and
        remembered: the causality probe runs at most once per profile.

        Raises:
            ValueError: as :func:`~utils.models.tasks.detect_task`.
        """
        return detect_task(self.model, self.stated_task, vocab_size=self.vocab_size, call=self.caller,
                           own_loss=self.returns_loss, spec=self.sizes.input, calling=self.call)

    def spec(self, vocab_size: int | None = None, max_seq_len: int | None = None, *,
             call: str | None = None) -> InputSpec:
        """What to feed the model (see :func:`~utils.models.sizes.input_spec`), from this look;
        ``vocab_size``/``max_seq_len`` override it."""
        return self.sizes.spec(vocab_size, max_seq_len, call=call or self.caller)


def look_at(model: nn.Module, task: str | None = None, *, vocab_size: int | None = None,
            max_seq_len: int | None = None, call: str | None = None) -> ModelProfile:
    """Look at ``model`` once: its sizes and calling convention now; its task on first need.

    Example::

        >>> look_at(nn.Embedding(100, 8)).vocab_size
        100

    Args:
        task: the task as stated (default None: detected when first needed), one of
            :data:`~utils.models.tasks.TASKS`.
        vocab_size: default None: found from the model (config, input embedding).
        max_seq_len: the context to feed it (default None: the model's, or 64 when it names none).
        call: how the entry point was called, repeated in errors (default ``look_at(<class>)``).

    Raises:
        ValueError: ``task`` is not one of the tasks, or a size is not a positive int.
    """
    call = call or f"look_at({type(model).__name__})"
    sizes = read_sizes(model, vocab_size, max_seq_len, call=call)
    device = sizes.input.device if sizes.input is not None else None  # the probe's, known already
    return ModelProfile(sizes, read_call(sizes.module, device), check_task(task, call), call)
