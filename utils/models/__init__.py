"""Models: the examples, loading a user's file or gist, one look at a model, calling it, its task.

- :mod:`~utils.models.examples`: example models built from configs;
- :mod:`~utils.models.user_file`, :mod:`~utils.models.gist`: the user's own model, from a file or a gist;
- :mod:`~utils.models.sources`: the model a notebook setting or ``--model`` names (``load_model``);
- :mod:`~utils.models.calls`: calling any model (conventions, logits, sizes);
- :mod:`~utils.models.tasks`: what a model predicts (causal LM, masked LM, classifier, seq2seq).

Names load on first use, so ``from utils.models import example_model`` does not load transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from utils.common.lazy import lazy_exports

_EXPORTS = {
    "example_model": "utils.models.examples",
    "load_model_from_file": "utils.models.user_file",
}
__all__ = ["example_model", "load_model_from_file"]  # = the keys of _EXPORTS (a test checks)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from utils.models.examples import example_model
    from utils.models.user_file import load_model_from_file
