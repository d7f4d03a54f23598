"""The bootstrap's per-token summaries reproduce the public calibration metrics."""

import numpy as np
import pytest

from bayes_router.analysis import (
    classwise_calibration_error,
    smooth_calibration_error,
    squared_calibration_error,
)
from bayes_router.analysis.calibration_bootstrap import (
    CALIBRATION_METRICS,
    calibration_summary,
    summary_metric,
    token_summary,
)


@pytest.mark.parametrize("name", ["ece", "ece_equal_mass", "mce", "brier", "nll"])
def test_token_summary_metrics_equal_the_public_metrics(name):
    """The bootstrap resamples per-token summaries; on the full data they give the metric."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(7, 0.4), size=600)
    labels = rng.integers(0, 7, size=600)
    summary = token_summary(probs, labels).values()
    assert summary_metric(name)(*summary) == pytest.approx(
        CALIBRATION_METRICS[name](probs, labels), rel=1e-12, abs=1e-12)



def test_summary_adds_smooth_classwise_and_debiased_calibration_with_window_intervals():
    """The new entries equal the public metrics, and the class-wise interval (from per-window
    bin sums) equals the metric recomputed on the resampled windows."""
    rng = np.random.default_rng(4)
    window_len, n_windows, n_boot = 16, 12, 11
    probs = rng.dirichlet(np.full(6, 0.3), size=window_len * n_windows)
    labels = rng.integers(0, 6, size=len(probs))
    result = calibration_summary(probs, labels, window_len, n_boot=n_boot, seed=5)
    assert {"ece", "mce", "brier", "nll", "accuracy", "reliability"} <= set(result)
    assert result["smooth_ece"]["value"] == pytest.approx(smooth_calibration_error(probs, labels))
    assert result["classwise_ece"]["value"] == pytest.approx(
        classwise_calibration_error(probs, labels))
    assert result["debiased_squared_ce"]["value"] == pytest.approx(
        squared_calibration_error(probs, labels))
    assert len(result["smooth_reliability"]["mesh"]) == 200
    draws = np.random.default_rng(5)
    replicates = []
    for _ in range(n_boot):
        rows = draws.integers(0, n_windows, n_windows)
        tokens = (rows[:, None] * window_len + np.arange(window_len)).reshape(-1)
        replicates.append(classwise_calibration_error(probs[tokens], labels[tokens]))
    low, high = np.quantile(replicates, [0.025, 0.975])
    assert result["classwise_ece"]["low"] == pytest.approx(low, rel=1e-9)
    assert result["classwise_ece"]["high"] == pytest.approx(high, rel=1e-9)
    for name in ("smooth_ece", "debiased_squared_ce"):
        assert result[name]["low"] <= result[name]["high"]
