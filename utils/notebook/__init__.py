"""The notebooks' glue: what cells call (:mod:`~utils.notebook.cells`, imported as ``nb``), the AMP
toggle (:mod:`~utils.notebook.widgets`), ``make demo`` (:mod:`~utils.notebook.demo`) and the
repository's identity for Colab links (:mod:`~utils.notebook.project`)."""
