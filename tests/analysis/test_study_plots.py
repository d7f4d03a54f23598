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
    plot_variance_vs_beta0,
    plot_variance_vs_particles,
    save_figure,
    summary_label,
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


def test_beta0_objective_zooms_on_the_curve_around_its_optimum():
    grid = [10.0 ** (i / 10) for i in range(-20, 21)]  # the fit-beta0 default, 0.01 .. 100
    kl = [2.0 * math.log(b / 2.0) ** 2 for b in grid]  # sharp optimum at beta0 = 2
    estimates = {"heldout_optimum": 2.0, "svi": 2.5}
    marked = [0.0, 2.0 * math.log(1.25) ** 2]
    ax = plot_beta0_objective(grid, kl, estimates, ax=_ax(), marked_kl=marked)
    low, high = ax.get_xlim()
    bottom, top = ax.get_ylim()
    # the x-range is where the curve is inside the y-range (one grid point beyond either
    # side), not the whole grid: the curve there spans the panel's height
    inside = [b for b, v in zip(grid, kl, strict=True) if bottom <= -v <= top]
    assert 1.0 < low < min(inside) and max(inside) < high < 4.0
    assert low < min(estimates.values()) and max(estimates.values()) < high
    shown = [-v for b, v in zip(grid, kl, strict=True) if low <= b <= high]
    assert min(shown) < bottom and max(shown) > bottom + 0.8 * (top - bottom)
    assert ax.get_xscale() == "linear"  # less than a decade: a linear axis reads better
    # an estimate far from the optimum stays visible, and a range of decades stays logarithmic
    ax = plot_beta0_objective(grid, kl, {"run": 0.05, **estimates}, ax=_ax(),
                              marked_kl=[*marked, 2.0 * math.log(0.025) ** 2])
    low, high = ax.get_xlim()
    assert ax.get_xscale() == "log" and low < 0.05 and 2.5 < high


def test_variance_axes_have_human_labels():
    assert summary_label("total_variance") == "total gradient variance"
    assert summary_label("median_snr") == "median signal-to-noise ratio"
    assert summary_label("some_new_key") == "some new key"
    result = {"estimators": {"stl": {"num_particles": 1, "groups": {"phi": {
        "total_variance": 0.5, "median_snr": 2.0}}}}}
    assert plot_variance_bars(result, "phi", ax=_ax()).get_ylabel() == "total gradient variance"
    ax = plot_variance_bars(result, "phi", "median_snr", ax=_ax())
    assert ax.get_ylabel() == "median signal-to-noise ratio"
    sweep = {"particles": [1, 2], "estimators": {"stl": [
        {"groups": {"phi": {"median_snr": 1.0}}},
        {"groups": {"phi": {"median_snr": 1.5}}}]}}
    ax = plot_variance_vs_particles(sweep, "phi", "median_snr", ax=_ax())
    assert ax.get_ylabel() == "median signal-to-noise ratio" and "_" not in ax.get_xlabel()


def _summary(snr, variance=0.5, deterministic=0):
    return {"total_variance": variance, "median_snr": snr, "num_deterministic": deterministic}


def test_infinite_snr_is_drawn_at_the_top_and_marked():
    result = {"estimators": {
        "reparam-mc": {"num_particles": 1, "groups": {"phi": _summary(0.3)}},
        "stl": {"num_particles": 1, "groups": {"phi": _summary(2.0)}},
        "reparam-analytic": {"num_particles": 1, "groups": {"phi": _summary(math.inf, 0.0, 4)}},
        # as read back from variance.json, where inf is null
        "dreg": {"num_particles": 2, "groups": {"phi": _summary(None, 0.0, 4)}}}}
    ax = plot_variance_bars(result, "phi", "median_snr", ax=_ax())
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 4 and np.isfinite(heights).all()
    assert heights[2] == heights[3] > 3 * max(heights[:2])  # above every finite bar
    assert heights[2] <= ax.get_ylim()[1] and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.texts].count("∞") == 2
    # on a sweep: a marker above the finite points, annotated, at the measured x
    sweep = {"beta0_values": [0.1, 1.0], "estimators": {
        "stl": [{"groups": {"phi": _summary(0.5)}}, {"groups": {"phi": _summary(0.8)}}],
        "reparam-analytic": [{"groups": {"phi": _summary(3.0)}},
                             {"groups": {"phi": _summary(math.inf, 0.0, 4)}}]}}
    ax = plot_variance_vs_beta0(sweep, "phi", "median_snr", ax=_ax())
    finite_top = max(np.nanmax(line.get_ydata()) for line in ax.lines if line.get_gid() is None)
    marks = [line for line in ax.lines if line.get_gid() == "infinite-value"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [1.0]
    assert finite_top < marks[0].get_ydata()[0] < ax.get_ylim()[1]
    assert [t.get_text() for t in ax.texts] == ["∞"]
    assert np.isnan(ax.lines[1].get_ydata()[1])  # not joined to the finite point


def test_values_a_log_axis_cannot_show_are_said_so_and_panels_report_empty_ones(tmp_path):
    result = {"estimators": {
        "reparam-mc": {"num_particles": 1, "groups": {"phi": {"total_variance": 0.5}}},
        "stl": {"num_particles": 1, "groups": {"phi": {"total_variance": 0.0}}},
        "dreg": {"num_particles": 1, "groups": {"phi": {"total_variance": None}}}}}
    ax = plot_variance_bars(result, "phi", ax=_ax())
    assert len(ax.patches) == 1 and len(ax.get_xticklabels()) == 3  # the slots stay
    assert [t.get_text() for t in ax.texts] == ["0 (not drawn)", "n/a (not drawn)"]
    assert np.isfinite([p.get_height() for p in ax.patches]).all()
    sweep = {"particles": [1, 2], "estimators": {"stl": [
        {"groups": {"phi": {"total_variance": 0.5}}},
        {"groups": {"phi": {"total_variance": 0.0}}}]}}
    ax = plot_variance_vs_particles(sweep, "phi", ax=_ax())
    undrawn = [line for line in ax.lines if line.get_gid() == "undrawn-value"]
    assert len(undrawn) == 1 and list(undrawn[0].get_xdata()) == [2]
    assert ax.get_ylim()[0] < undrawn[0].get_ydata()[0] < 0.5
    assert [t.get_text() for t in ax.texts] == ["0"]
    fig = plot_panels(lambda g, k, ax: plot_variance_bars(result, g, k, ax), ["phi", "theta"])
    assert len(fig.axes) == 2 and not fig.axes[1].axison  # theta: nothing to draw, said so
    assert save_figure(fig, tmp_path / "panels.png") == "panels.png"
    assert (tmp_path / "panels.png").stat().st_size > 0
