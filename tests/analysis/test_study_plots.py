"""The study plots draw what they are given (checked on their artists) and refuse empty input."""

import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from bayes_router.analysis.study_plots import (
    plot_beta0_objective,
    plot_beta0_trace,
    plot_panels,
    plot_shares,
    plot_training_loss,
    plot_validation,
    plot_variance_bars,
    save_figure,
)


def _ax():
    return Figure().add_subplot()


def test_training_curves_plot_the_logged_values():
    history = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    line = plot_training_loss(history, ax=_ax()).lines[0]
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [1.0, 0.5, 1 / 3]
    ax = plot_validation([{"step": 2, "val_bpc": 3.5}], ax=_ax())
    assert list(ax.lines[0].get_ydata()) == [3.5]
    with pytest.raises(ValueError, match="no training history"):
        plot_training_loss([], ax=_ax())


def test_shares_and_beta0_panels():
    ax = plot_shares(["a", "b"], [0.7, 0.3], ax=_ax())
    assert [p.get_height() for p in ax.patches] == [0.7, 0.3]
    ax = plot_beta0_objective([0.1, 1.0, 10.0], [0.3, 0.1, 0.2], {"svi": 1.2, "minka": 0.9},
                              ax=_ax(), marked_kl=[0.1])
    assert list(ax.lines[0].get_ydata()) == [-0.3, -0.1, -0.2]
    assert [line.get_xdata()[0] for line in ax.lines[1:]] == [1.2, 0.9]
    assert ax.get_xscale() == "log"
    ax = plot_beta0_trace([[1.0, 2.0], [1.5, 2.5]], ax=_ax())
    assert len(ax.lines) == 2
    with pytest.raises(ValueError):
        plot_beta0_objective([], [], {}, ax=_ax())


def test_variance_bars_leave_out_non_positive_values_and_panels_report_empty_ones(tmp_path):
    result = {"estimators": {
        "reparam-mc": {"num_particles": 1, "groups": {"phi": {"total_variance": 0.5}}},
        "stl": {"num_particles": 1, "groups": {"phi": {"total_variance": math.inf}}}}}
    ax = plot_variance_bars(result, "phi", ax=_ax())
    assert len(ax.patches) == 1
    fig = plot_panels(lambda g, k, ax: plot_variance_bars(result, g, k, ax), ["phi", "theta"])
    assert len(fig.axes) == 2 and not fig.axes[1].axison  # theta: nothing to draw, said so
    assert save_figure(fig, tmp_path / "panels.png") == "panels.png"
    assert (tmp_path / "panels.png").stat().st_size > 0
    assert np.isfinite([p.get_height() for p in ax.patches]).all()
