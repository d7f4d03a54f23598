"""Class-wise ECE (Kull et al. 2019) and the debiased squared calibration error (Kumar, Liang &
Ma 2019) against plain-loop implementations and cases with known answers."""

import numpy as np
import pytest

from bayes_router.analysis import (
    classwise_calibration_error,
    expected_calibration_error,
    squared_calibration_error,
    squared_calibration_error_from_confidence,
)
from bayes_router.analysis.calibration_metrics import classwise_residual_sums


def loop_classwise_ece(probs, labels, n_bins):
    """Kull et al.'s definition, one class and one bin at a time."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    n, n_classes = probs.shape
    total = 0.0
    for k in range(n_classes):
        for j in range(n_bins):
            low, high = j / n_bins, (j + 1) / n_bins
            members = [i for i in range(n) if low <= probs[i, k] < high
                       or (j == n_bins - 1 and probs[i, k] == 1.0)]
            if members:
                frequency = sum(labels[i] == k for i in members) / len(members)
                mean_p = sum(probs[i, k] for i in members) / len(members)
                total += len(members) / n * abs(frequency - mean_p)
    return total / n_classes


def loop_squared_ce(confidence, correct, n_bins, debiased):
    """Kumar et al.'s estimator over equal-mass bins built by hand (sizes differ by <= 1)."""
    pairs = sorted(zip(confidence, correct, strict=True), key=lambda pair: pair[0])
    n, start, total = len(pairs), 0, 0.0
    for j in range(n_bins):
        size = n // n_bins + (1 if j < n % n_bins else 0)
        members, start = pairs[start:start + size], start + size
        if not members:
            continue
        accuracy = sum(y for _, y in members) / len(members)
        gap = accuracy - sum(f for f, _ in members) / len(members)
        term = gap ** 2
        if debiased:
            term = term - accuracy * (1 - accuracy) / (len(members) - 1) if len(members) > 1 \
                else 0.0
        total += len(members) / n * term
    return total


def _calibrated(n, n_classes, rng, concentration=0.5):
    """Probabilities and labels drawn from them: calibrated in every sense."""
    probs = rng.dirichlet(np.full(n_classes, concentration), size=n)
    labels = (probs.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    return probs, labels


def test_classwise_ece_equals_the_loop():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(4, 0.7), size=120)
    labels = rng.integers(0, 4, size=120)
    for n_bins in (1, 5, 15):
        assert classwise_calibration_error(probs, labels, n_bins) == pytest.approx(
            loop_classwise_ece(probs, labels, n_bins), abs=1e-12)


def test_classwise_ece_by_hand():
    # class 0: p = .9 (label 0) and .2 (label 1) in bins [.5, 1] and [0, .5): gaps .1 and .2
    # class 1: p = .1 (label 0) and .8 (label 1): gaps .1 and .2; mean over 2 classes: .15
    probs = [[0.9, 0.1], [0.2, 0.8]]
    assert classwise_calibration_error(probs, [0, 1], n_bins=2) == pytest.approx(0.15)


def test_classwise_ece_of_two_classes_with_one_bin_is_the_mean_gap():
    # one bin per class: |mean(p_k) - freq(k)|, the same for both classes in the binary case
    rng = np.random.default_rng(1)
    p1 = rng.uniform(size=300)
    labels = rng.integers(0, 2, size=300)
    probs = np.stack([1 - p1, p1], 1)
    assert classwise_calibration_error(probs, labels, n_bins=1) == pytest.approx(
        abs(p1.mean() - labels.mean()))


def test_classwise_sums_per_group_add_up_to_the_data():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(5), size=60)
    labels = rng.integers(0, 5, size=60)
    per_group = classwise_residual_sums(probs, labels, 15, np.arange(60) // 10, 6)
    assert per_group.shape == (6, 5, 15)
    np.testing.assert_allclose(per_group.sum(0), classwise_residual_sums(probs, labels, 15)[0],
                               atol=1e-12)


def test_classwise_ece_is_small_for_a_calibrated_predictor():
    rng = np.random.default_rng(3)
    probs, labels = _calibrated(20000, 5, rng)
    assert classwise_calibration_error(probs, labels) < 0.01
    shifted = probs ** 3 / (probs ** 3).sum(1, keepdims=True)  # sharpened: overconfident
    assert classwise_calibration_error(shifted, labels) > 3 * classwise_calibration_error(
        probs, labels)


@pytest.mark.parametrize("debiased", [True, False])
def test_squared_ce_equals_the_loop(debiased):
    rng = np.random.default_rng(4)
    for n, n_bins in ((7, 3), (40, 15), (100, 6), (3, 5)):
        f = rng.uniform(0.2, 1, n)
        y = (rng.uniform(size=n) < f).astype(float)
        assert squared_calibration_error_from_confidence(f, y, n_bins, debiased) == \
            pytest.approx(loop_squared_ce(f, y, n_bins, debiased), abs=1e-14)


def test_squared_ce_of_probabilities_uses_the_top_label():
    probs = [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.2, 0.45, 0.35], [0.3, 0.3, 0.4]]
    labels = [0, 1, 1, 0]  # confidences .9, .8, .45, .4; right, wrong, right, wrong
    # one bin: mean confidence .6375, accuracy .5
    assert squared_calibration_error(probs, labels, 1, debiased=False) == pytest.approx(
        0.1375 ** 2)
    assert squared_calibration_error(probs, labels, 1) == pytest.approx(
        0.1375 ** 2 - 0.25 / 3)


def test_debiased_squared_ce_is_unbiased_for_a_calibrated_predictor():
    """Outcomes drawn from the stated confidences: the true squared CE is 0. Over many draws
    the debiased estimate averages 0 within its standard error, the plug-in does not."""
    rng = np.random.default_rng(5)
    n, repeats = 1500, 300
    debiased, plug_in = [], []
    for _ in range(repeats):
        f = rng.uniform(0.3, 1, n)
        y = (rng.uniform(size=n) < f).astype(float)
        debiased.append(squared_calibration_error_from_confidence(f, y))
        plug_in.append(squared_calibration_error_from_confidence(f, y, debiased=False))
    standard_error = np.std(debiased) / np.sqrt(repeats)
    assert abs(np.mean(debiased)) < 3 * standard_error
    # the plug-in's bias is about n_bins * mean(mu (1 - mu)) / n
    bias = 15 * np.mean([(f := np.linspace(0.3, 1, 1000)) * (1 - f)]) / n
    assert np.mean(plug_in) == pytest.approx(bias, rel=0.15)
    assert np.mean(plug_in) > np.mean(debiased) + 10 * standard_error


def test_debiased_squared_ce_recovers_a_known_gap():
    """Confidence p, accuracy p - 0.1: squared calibration error 0.1^2 = 0.01."""
    rng = np.random.default_rng(6)
    f = rng.uniform(0.55, 1, 200000)  # the top label is class 0
    labels = (rng.uniform(size=len(f)) >= f - 0.1).astype(int)  # class 0 with prob. f - 0.1
    probs = np.stack([f, 1 - f], 1)
    assert squared_calibration_error(probs, labels) == pytest.approx(0.01, abs=5e-4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.1, abs=0.005)


@pytest.mark.parametrize("args, match", [
    (([0.5, 1.5], [1, 0]), "confidence must lie in"),
    (([0.5, 0.2], [1, 0.5]), "correct must hold 0 or 1"),
    (([0.5], [1, 0]), "same length"),
])
def test_squared_ce_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        squared_calibration_error_from_confidence(*args)


def test_classwise_ece_rejects_bad_input():
    with pytest.raises(ValueError, match="probs"):
        classwise_calibration_error([[0.5, 0.6]], [0])
    with pytest.raises(ValueError, match="n_bins"):
        classwise_calibration_error([[0.5, 0.5]], [0], n_bins=0)
