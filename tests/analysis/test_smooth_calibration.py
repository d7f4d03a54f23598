"""Smooth ECE and the smoothed reliability diagram against the reference implementation
``relplot`` (a dev extra; the library never imports it), plus the window bootstrap."""

import ast
import zlib
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import relplot
from relplot.estimators import KernelSmoother
from relplot.kernels import ReflectedGaussianKernel

from bayes_router.analysis import (
    plot_smooth_reliability_diagram,
    smooth_calibration_bandwidth,
    smooth_calibration_error,
    smooth_calibration_error_from_confidence,
    smooth_reliability_curve,
)
from bayes_router.analysis.smooth_calibration import (
    smooth_calibration_summary,
    smooth_curve_from_dict,
)


def _dataset(name: str):
    """Confidences in [0, 1] and 0/1 outcomes of several kinds."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if name == "calibrated":
        f = rng.uniform(0, 1, 3000)
        return f, (rng.uniform(size=3000) < f).astype(float)
    if name == "overconfident":
        f = rng.beta(5, 2, 2000)
        return f, (rng.uniform(size=2000) < f - 0.2).astype(float)
    if name == "underconfident":
        f = rng.uniform(0.3, 0.6, 1500)
        return f, (rng.uniform(size=1500) < np.clip(2 * f - 0.4, 0, 1)).astype(float)
    if name == "small":
        return np.array([0.9, 0.8, 0.45, 0.4, 0.7]), np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    if name == "two points":
        return np.array([0.3, 0.6]), np.array([0.0, 0.0])
    if name == "ties":
        f = np.round(rng.uniform(0, 1, 800), 1)  # 11 distinct values
        return f, (rng.uniform(size=800) < f).astype(float)
    if name == "endpoints":
        f = np.r_[np.zeros(50), np.ones(150), rng.uniform(0, 1, 300)]
        y = np.r_[np.zeros(50), np.ones(120), np.zeros(30), rng.uniform(size=300) < 0.5]
        return f, y.astype(float)
    if name == "all right":
        return rng.uniform(0.5, 1, 400), np.ones(400)
    if name == "top-label of a vocabulary":  # the shape of an LM's predictive
        probs = rng.dirichlet(np.full(40, 0.1), size=1200)
        labels = np.array([rng.choice(40, p=p) for p in probs ** 1.5 / (probs ** 1.5).sum(1,
                                                                                   keepdims=True)])
        return relplot.multiclass_logits_to_confidences(probs, labels, probs=True)
    raise KeyError(name)


DATASETS = ["calibrated", "overconfident", "underconfident", "small", "two points", "ties",
            "endpoints", "all right", "top-label of a vocabulary"]


@pytest.mark.parametrize("name", DATASETS)
def test_smooth_ece_and_its_bandwidth_equal_relplots(name):
    f, y = _dataset(name)
    reference, width = relplot.smECE(f, y, return_width=True)
    assert smooth_calibration_bandwidth(f, y) == width
    assert smooth_calibration_error_from_confidence(f, y) == pytest.approx(reference, rel=1e-10,
                                                                           abs=1e-14)


@pytest.mark.parametrize("name", ["calibrated", "overconfident", "endpoints"])
@pytest.mark.parametrize("sigma", [0.003, 0.05, 0.3])
def test_smooth_ece_at_a_fixed_bandwidth_equals_relplots(name, sigma):
    f, y = _dataset(name)
    assert smooth_calibration_error_from_confidence(f, y, bandwidth=sigma) == pytest.approx(
        relplot.smECE_sigma(f, y, sigma), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("name", ["overconfident", "ties", "endpoints", "small"])
def test_smoothed_reliability_curve_equals_relplots_smoother_and_density(name):
    f, y = _dataset(name)
    curve = smooth_reliability_curve(f, y)
    assert curve.bandwidth == relplot.smECE(f, y, return_width=True)[1]
    mesh = np.linspace(0, 1, 200)
    kernel = ReflectedGaussianKernel(curve.bandwidth)
    smoother = KernelSmoother(kernel).fit(f.reshape(-1, 1), y)
    np.testing.assert_allclose(curve.mesh, mesh)
    np.testing.assert_allclose(curve.accuracy, smoother.predict(mesh.reshape(-1, 1)),
                               rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(curve.density, kernel.kde(f, mesh), rtol=1e-10, atol=1e-13)


def test_density_integrates_to_one_inside_the_interval():
    """Reflection keeps the mass of points inside (0, 1); relplot's discretisation halves the
    mass of a point exactly at 0 or 1 and truncates kernels wider than about 0.2."""
    f = np.random.default_rng(4).uniform(0.001, 0.999, 500)
    for sigma in (0.01, 0.05):
        curve = smooth_reliability_curve(f, np.ones(500), bandwidth=sigma, n_mesh=20001)
        assert np.trapezoid(curve.density, curve.mesh) == pytest.approx(1.0, abs=1e-3)
    at_zero = smooth_reliability_curve([0.0], [1.0], bandwidth=0.05, n_mesh=20001)
    assert np.trapezoid(at_zero.density, at_zero.mesh) == pytest.approx(0.5, abs=1e-3)


def test_top_label_smooth_ece_from_probabilities():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.full(6, 0.5), size=700)
    labels = rng.integers(0, 6, size=700)
    f, y = relplot.multiclass_logits_to_confidences(probs, labels, probs=True)
    assert smooth_calibration_error(probs, labels) == pytest.approx(relplot.smECE(f, y),
                                                                    rel=1e-10)


def test_weights_are_multiplicities():
    f, y = _dataset("overconfident")
    weights = np.random.default_rng(1).integers(0, 4, len(f))
    expanded = np.repeat(f, weights), np.repeat(y, weights)
    assert smooth_calibration_bandwidth(f, y, weights) == smooth_calibration_bandwidth(*expanded)
    assert smooth_calibration_error_from_confidence(f, y, weights=weights) == pytest.approx(
        smooth_calibration_error_from_confidence(*expanded), rel=1e-10)


def test_calibrated_predictor_scores_lower_than_a_shifted_one():
    rng = np.random.default_rng(2)
    f = rng.uniform(0, 1, 20000)
    y = (rng.uniform(size=20000) < f).astype(float)
    shifted = (rng.uniform(size=20000) < f - 0.1).astype(float)
    assert smooth_calibration_error_from_confidence(f, y) < 0.02
    # accuracy f - 0.1 where f > 0.1: the smoothed gap is close to 0.1 on most of the axis
    assert smooth_calibration_error_from_confidence(f, shifted) == pytest.approx(0.1, abs=0.02)


def test_window_bootstrap_uses_the_windows_of_bootstrap_ci():
    """Resample b draws the windows that ``bootstrap_ci`` draws with the same seed, so each
    replicate is the smooth ECE of those windows concatenated."""
    f, y = _dataset("overconfident")
    window_len, n_boot = 50, 7
    summary = smooth_calibration_summary(f, y, window_len, n_boot=n_boot, seed=3)
    assert summary["value"] == smooth_calibration_error_from_confidence(f, y)
    rng = np.random.default_rng(3)
    replicates, curves = [], []
    windows_f, windows_y = f.reshape(-1, window_len), y.reshape(-1, window_len)
    for _ in range(n_boot):
        rows = rng.integers(0, len(windows_f), len(windows_f))
        resample = windows_f[rows].reshape(-1), windows_y[rows].reshape(-1)
        replicates.append(smooth_calibration_error_from_confidence(*resample))
        curves.append(smooth_reliability_curve(*resample, bandwidth=summary["bandwidth"]).accuracy)
    low, high = np.quantile(replicates, [0.025, 0.975])
    assert summary["low"] == pytest.approx(low, rel=1e-9)
    assert summary["high"] == pytest.approx(high, rel=1e-9)
    band = np.quantile(curves, [0.025, 0.975], axis=0)
    np.testing.assert_allclose(summary["curve"]["low"], band[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(summary["curve"]["high"], band[1], rtol=1e-9, atol=1e-12)
    curve = smooth_curve_from_dict(summary)
    assert curve.smooth_ece == summary["value"] and curve.low is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(confidence=[0.5, 1.2], correct=[1, 0]), "confidence must lie in"),
    (dict(confidence=[0.5, 0.2], correct=[1, 2]), "correct must lie in"),
    (dict(confidence=[0.5, 0.2], correct=[1]), "same length"),
    (dict(confidence=[], correct=[]), "confidence is empty"),
    (dict(confidence=[0.5, np.nan], correct=[1, 0]), "NaN"),
    (dict(confidence=[0.5, 0.2], correct=[1, 0], bandwidth=0.0), "bandwidth"),
    (dict(confidence=[0.5, 0.2], correct=[1, 0], weights=[0, 0]), "weights"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smooth_calibration_error_from_confidence(**kwargs)


def test_summary_rejects_a_window_length_that_does_not_divide():
    f, y = _dataset("small")
    with pytest.raises(ValueError, match="window_len"):
        smooth_calibration_summary(f, y, window_len=2, n_boot=2)
    with pytest.raises(ValueError, match="n_boot"):
        smooth_calibration_summary(f, y, window_len=5, n_boot=0)


def test_plot_draws_curve_band_and_density():
    f, y = _dataset("overconfident")
    summary = smooth_calibration_summary(f, y, 100, n_boot=5)
    ax = plot_smooth_reliability_diagram(curve=smooth_curve_from_dict(summary), label="plug-in")
    lines = [line for line in ax.lines if line.get_label() == "plug-in"]
    assert len(lines) == 1
    drawn = lines[0].get_ydata()
    supported = np.isfinite(drawn)
    np.testing.assert_allclose(drawn[supported], summary["curve"]["accuracy"][supported])
    assert supported.sum() > 100  # the data cover most of the axis
    assert len(ax.collections) == 2  # the density and the band
    ax = plot_smooth_reliability_diagram(f, y)
    assert len(ax.collections) == 1  # no band without a bootstrap
    with pytest.raises(ValueError, match="either"):
        plot_smooth_reliability_diagram(f, y, curve=smooth_reliability_curve(f, y))
    plt.close("all")


def test_the_library_never_imports_relplot():
    """relplot is a dev extra for these parity tests only."""
    package = Path(__file__).resolve().parents[2] / "bayes_router"
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.split(".")[0] == "relplot" for name in names), path
