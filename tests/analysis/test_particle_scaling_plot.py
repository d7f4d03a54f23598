"""The particle-scaling plot draws the measured points, the fitted power laws and their slopes."""

import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from bayes_router.analysis.study_plots import plot_particle_scaling, slope_label


def _point(variance):
    return {"groups": {"a": {"total_variance": variance, "median_snr": 1.0}}}


SWEEP = {
    "particles": [1, 2, 8],
    "estimators": {"reparam-mc": [_point(4.0), _point(2.0), _point(0.5)],
                   "dreg": [{"skipped": "dreg needs num_particles >= 2"},
                            _point(1.0), _point(1.0 / 64)],
                   "stl": [_point(1.0), _point(0.5), _point(0.125)]},
    "slopes": {"reparam-mc": {"total_variance": {"slope": -1.0, "intercept": math.log(4.0),
                                                 "interval": [-1.1, -0.9]}},
               "dreg": {"total_variance": {"slope": -3.0, "intercept": math.log(8.0),
                                           "interval": None}},
               "stl": {"total_variance": None}},
}


def test_slope_label_states_the_slope_and_its_interval():
    assert slope_label("iwae", {"slope": -0.49, "interval": [-0.52, -0.46]}) == \
        "iwae: K^-0.49 [-0.52, -0.46]"
    assert slope_label("dreg", {"slope": 0.5, "interval": None}) == "dreg: K^+0.50"
    assert slope_label("stl", None) == "stl"


def test_particle_scaling_draws_points_fits_and_labels():
    ax = plot_particle_scaling(SWEEP, "a", ax=Figure().add_subplot())
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["reparam-mc: K^-1.00 [-1.10, -0.90]", "dreg: K^-3.00", "stl"]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 2  # stl has no fit
    fits = {tuple(line.get_xdata()): line.get_ydata() for line in dashed}
    assert np.allclose(fits[(1.0, 8.0)], [4.0, 0.5])  # reparam-mc over K = 1 .. 8
    assert np.allclose(fits[(2.0, 8.0)], [1.0, 1.0 / 64])  # dreg from its first K
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "particles K"


def test_particle_scaling_without_slopes_draws_the_points_only():
    sweep = {key: value for key, value in SWEEP.items() if key != "slopes"}
    ax = plot_particle_scaling(sweep, "a", "median_snr", ax=Figure().add_subplot())
    assert all(line.get_linestyle() != "--" for line in ax.get_lines())
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_particle_scaling(sweep, "phi", ax=Figure().add_subplot())


@pytest.mark.parametrize("points", [
    {"1": _point(4.0), "2": _point(2.0), "8": _point(0.5)},  # keyed by strings, as before
    [_point(4.0), _point(2.0)],  # one point short
])
def test_points_not_aligned_with_the_axis_are_rejected(points):
    sweep = {"particles": [1, 2, 8], "estimators": {"reparam-mc": points}}
    with pytest.raises(ValueError, match="reparam-mc must be a list aligned"):
        plot_particle_scaling(sweep, "a", ax=Figure().add_subplot())
