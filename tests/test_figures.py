"""Figures are drawn outside pyplot, at the size asked for."""
import pytest

from utils.common.figures import new_figure

pytest.importorskip("matplotlib")


def test_new_figure_has_the_size_asked_for_and_is_not_kept_open_by_pyplot():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = new_figure(9, 4)
    assert tuple(fig.get_size_inches()) == (9.0, 4.0)
    assert plt.get_fignums() == before
