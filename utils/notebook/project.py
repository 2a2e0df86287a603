"""Where the project lives: the one place that names the repository and the pinned ref.

The notebooks' setup cells, their Open-in-Colab badges and the README repeat these two values
(a Colab setup cell runs before this package can be imported); ``tests/test_notebooks.py`` keeps
them all in agreement.
"""

REPO_SLUG = "amp-notebooks/amp-transformer-notebooks"
REPO_REF = "v0.1.0"
NOTEBOOKS = ("01_validate.ipynb", "02_analyze.ipynb", "03_train_amp.ipynb", "04_benchmark_amp.ipynb")


def colab_url(notebook: str) -> str:
    """The Open-in-Colab address of a notebook at the pinned ref."""
    return f"https://colab.research.google.com/github/{REPO_SLUG}/blob/{REPO_REF}/notebooks/{notebook}"


def colab_badge(notebook: str) -> str:
    """Markdown for the Open-in-Colab badge of ``notebook``."""
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook)})"
