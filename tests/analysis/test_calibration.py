"""The bootstrap's per-token summaries reproduce the public calibration metrics."""

import numpy as np
import pytest

from bayes_router.analysis.calibration import CALIBRATION_METRICS, summary_metric, token_summary


@pytest.mark.parametrize("name", ["ece", "ece_equal_mass", "mce", "brier", "nll"])
def test_token_summary_metrics_equal_the_public_metrics(name):
    """The bootstrap resamples per-token summaries; on the full data they give the metric."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(7, 0.4), size=600)
    labels = rng.integers(0, 7, size=600)
    summary = token_summary(probs, labels).values()
    assert summary_metric(name)(*summary) == pytest.approx(
        CALIBRATION_METRICS[name](probs, labels), rel=1e-12, abs=1e-12)

