"""Calibration metrics: hand-worked examples, a plain-loop reference, bin edges, bootstrap."""

import math
from functools import partial

import numpy as np
import pytest
import torch

from bayes_router.analysis import (
    bootstrap_ci,
    brier_score,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_curve,
)

# confidences .9 (right), .8 (wrong), .45 (right), .4 (wrong)
HAND_PROBS = [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.2, 0.45, 0.35], [0.3, 0.3, 0.4]]
HAND_LABELS = [0, 1, 1, 0]


def naive_bins(probs, labels, n_bins, binning):
    """Per-bin lists of (confidence, correct), built one sample at a time."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    samples = []
    for row, label in zip(probs, labels, strict=True):
        prediction = max(range(len(row)), key=lambda c: (row[c], -c))
        samples.append((float(row[prediction]), float(prediction == label)))
    bins = [[] for _ in range(n_bins)]
    if binning == "equal-width":
        for confidence, correct in samples:
            for j in range(n_bins):
                low, high = j / n_bins, (j + 1) / n_bins
                if low <= confidence < high or (j == n_bins - 1 and confidence == 1.0):
                    bins[j].append((confidence, correct))
    else:
        ordered = sorted(samples, key=lambda s: s[0])
        start = 0
        for j in range(n_bins):
            size = len(samples) // n_bins + (1 if j < len(samples) % n_bins else 0)
            bins[j] = ordered[start:start + size]
            start += size
    return bins


def naive_ece_mce(probs, labels, n_bins, binning):
    bins = naive_bins(probs, labels, n_bins, binning)
    n = sum(len(b) for b in bins)
    ece, mce = 0.0, 0.0
    for members in bins:
        if members:
            gap = abs(sum(c for _, c in members) / len(members)
                      - sum(s for s, _ in members) / len(members))
            ece += len(members) / n * gap
            mce = max(mce, gap)
    return ece, mce


def random_predictions(n, n_classes, seed, n_one_hot=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.5, size=(n, n_classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # some confidences of exactly 1.0
    probs[:n_one_hot] = np.eye(n_classes)[rng.integers(0, n_classes, n_one_hot)]
    labels = rng.integers(0, n_classes, n)
    return probs, labels


def test_hand_worked_two_bins():
    # bin [0, .5): conf .425, acc .5; bin [.5, 1]: conf .85, acc .5
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=2) == pytest.approx(
        0.5 * 0.075 + 0.5 * 0.35)
    assert maximum_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=2) == pytest.approx(0.35)


def test_hand_worked_brier_and_nll():
    brier = (0.015 + 1.46 + 0.465 + 0.74) / 4
    assert brier_score(HAND_PROBS, HAND_LABELS) == pytest.approx(brier)
    nll = -(math.log(0.9) + math.log(0.1) + math.log(0.45) + math.log(0.3)) / 4
    assert negative_log_likelihood(HAND_PROBS, HAND_LABELS) == pytest.approx(nll)


def test_torchmetrics_docstring_example():
    # torchmetrics' multiclass_calibration_error docstring: l1 0.2000, max 0.2333 for n_bins=3
    preds = [[0.25, 0.20, 0.55], [0.55, 0.05, 0.40], [0.10, 0.30, 0.60], [0.90, 0.05, 0.05]]
    target = [0, 1, 2, 0]
    assert expected_calibration_error(preds, target, n_bins=3) == pytest.approx(0.2, abs=1e-6)
    assert maximum_calibration_error(preds, target, n_bins=3) == pytest.approx(0.7 / 3, abs=1e-6)


@pytest.mark.parametrize("binning", ["equal-width", "equal-mass"])
@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_against_loop_reference(binning, n_bins):
    probs, labels = random_predictions(400, 6, seed=n_bins)
    ece, mce = naive_ece_mce(probs, labels, n_bins, binning)
    assert expected_calibration_error(probs, labels, n_bins, binning) == pytest.approx(ece)
    assert maximum_calibration_error(probs, labels, n_bins, binning) == pytest.approx(mce)
    curve = reliability_curve(probs, labels, n_bins, binning)
    np.testing.assert_array_equal(curve.count,
                                  [len(b) for b in naive_bins(probs, labels, n_bins, binning)])


def test_brier_and_nll_against_loops():
    probs, labels = random_predictions(300, 4, seed=3, n_one_hot=0)
    brier = np.mean([sum((p - (c == y)) ** 2 for c, p in enumerate(row))
                     for row, y in zip(probs, labels, strict=True)])
    nll = np.mean([-math.log(row[y]) for row, y in zip(probs, labels, strict=True)])
    assert brier_score(probs, labels) == pytest.approx(brier)
    assert negative_log_likelihood(probs, labels) == pytest.approx(nll)


def test_confidence_on_an_inner_edge_goes_to_the_bin_above():
    # n_bins=4, edges 0, .25, .5, .75, 1: bucketize(right=True) puts .25 in bin 1, .5 in bin 2
    probs = [[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.25, 0.0], [0.75, 0.25, 0.0, 0.0]]
    curve = reliability_curve(probs, [0, 0, 0], n_bins=4)
    np.testing.assert_array_equal(curve.count, [0, 1, 1, 1])


def test_confidence_of_one_goes_to_the_last_bin():
    curve = reliability_curve([[1.0, 0.0], [0.0, 1.0]], [0, 0], n_bins=15)
    assert curve.count[-1] == 2 and curve.count.sum() == 2
    assert curve.accuracy[-1] == pytest.approx(0.5)
    # perfectly confident and right: no error; confident and wrong: error 1
    assert expected_calibration_error([[1.0, 0.0]], [0]) == 0.0
    assert expected_calibration_error([[1.0, 0.0]], [1]) == pytest.approx(1.0)


def test_float32_edges_follow_torch_bucketize():
    edges = torch.linspace(0, 1, 16, dtype=torch.float32)
    confidences = torch.cat([edges[8:], torch.tensor([0.6, 0.7, 0.9, 0.999])])
    probs = torch.stack([confidences, 1 - confidences], dim=1)  # float32, top label 0
    expected = (torch.bucketize(confidences, edges, right=True) - 1).clamp(max=14)
    curve = reliability_curve(probs, torch.zeros(len(probs), dtype=torch.long), n_bins=15)
    np.testing.assert_array_equal(curve.count, torch.bincount(expected, minlength=15).numpy())


def test_equal_mass_with_fewer_samples_than_bins():
    probs, labels = random_predictions(7, 3, seed=5)
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    # every sample is its own bin
    ece = expected_calibration_error(probs, labels, n_bins=10, binning="equal-mass")
    assert ece == pytest.approx(np.mean(np.abs(correct - confidence)))
    curve = reliability_curve(probs, labels, n_bins=10, binning="equal-mass")
    np.testing.assert_array_equal(curve.count, [1] * 7 + [0] * 3)
    assert np.all(np.diff(curve.edges) >= 0) and curve.edges[0] == 0 and curve.edges[-1] == 1


def test_tensor_input_matches_numpy():
    probs, labels = random_predictions(200, 5, seed=7, n_one_hot=0)
    for metric in (expected_calibration_error, maximum_calibration_error, brier_score,
                   negative_log_likelihood):
        assert metric(torch.from_numpy(probs), torch.from_numpy(labels)) == pytest.approx(
            metric(probs, labels))


def test_small_rounding_in_probabilities_is_accepted():
    assert brier_score([[0.5, 0.5005]], [0]) == pytest.approx(0.25 + 0.5005 ** 2)


@pytest.mark.parametrize(
    "probs, labels, kwargs, match",
    [
        ([[0.5, 0.4]], [0], {}, "probs"),
        ([[1.2, -0.2]], [0], {}, "probs"),
        ([0.5, 0.5], [0], {}, "probs"),
        (np.zeros((0, 3)), [], {}, "probs"),
        ([[0.5, 0.5]], [2], {}, "labels"),
        ([[0.5, 0.5]], [-1], {}, "labels"),
        ([[0.5, 0.5]], [0.5], {}, "labels"),
        ([[0.5, 0.5]], [0, 1], {}, "same length"),
        ([[0.5, 0.5]], [0], {"n_bins": 0}, "n_bins"),
        ([[0.5, 0.5]], [0], {"binning": "quantile"}, "binning"),
    ],
)
def test_invalid_input_raises(probs, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probs, labels, **kwargs)
    if not kwargs:
        for metric in (brier_score, negative_log_likelihood):
            with pytest.raises(ValueError, match=match):
                metric(probs, labels)


@pytest.mark.parametrize("metric", [negative_log_likelihood, brier_score,
                                    partial(expected_calibration_error, n_bins=10)])
def test_bootstrap_contains_point_and_shrinks_with_data(metric):
    probs, labels = random_predictions(4000, 4, seed=11, n_one_hot=0)
    small = bootstrap_ci(metric, probs[:100], labels[:100], n_boot=300)
    large = bootstrap_ci(metric, probs, labels, n_boot=300)
    for point, low, high in (small, large):
        assert low <= point <= high
    assert large[0] == pytest.approx(metric(probs, labels))
    # the interval scales like 1 / sqrt(N): 40x the data, about 6x narrower
    assert (large[2] - large[1]) < 0.5 * (small[2] - small[1])


def test_bootstrap_resamples_rows_jointly_and_is_seeded():
    x = np.arange(50.0)
    same = bootstrap_ci(lambda a, b: float(np.all(a == b)), x, x.copy(), n_boot=100)
    assert same == (1.0, 1.0, 1.0)
    assert bootstrap_ci(np.mean, x, seed=3) == bootstrap_ci(
        np.mean, torch.arange(50.0, dtype=torch.float64), seed=3)
    assert bootstrap_ci(np.mean, x, seed=3) != bootstrap_ci(np.mean, x, seed=4)


@pytest.mark.parametrize(
    "arrays, kwargs, match",
    [
        ((), {}, "arrays"),
        ((np.zeros(3), np.zeros(4)), {}, "same length"),
        ((np.zeros(0),), {}, "empty"),
        ((np.zeros(3),), {"n_boot": 0}, "n_boot"),
        ((np.zeros(3),), {"level": 1.0}, "level"),
    ],
)
def test_bootstrap_invalid_input_raises(arrays, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(np.mean, *arrays, **kwargs)
