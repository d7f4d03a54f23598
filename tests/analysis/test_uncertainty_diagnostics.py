"""AUROC, rank correlation, damage diagnostics and routing accuracy by decile."""

import logging
import math

import numpy as np
import pytest
import scipy.stats
import torch

from bayes_router.analysis import (
    auroc,
    routing_accuracy_by_decile,
    spearman,
    uncertainty_diagnostics,
)


def pairwise_auroc(scores, positives):
    """Fraction of (positive, negative) pairs ordered correctly, ties counting one half."""
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    wins = sum(1.0 if sp > sn else 0.5 if sp == sn else 0.0 for sp in pos for sn in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=150), 1)  # many ties
    positives = rng.random(150) < 0.3
    assert auroc(scores, positives) == pytest.approx(pairwise_auroc(scores, positives))
    assert auroc(torch.from_numpy(scores), torch.from_numpy(positives).int()) == pytest.approx(
        pairwise_auroc(scores, positives))


def test_auroc_extremes():
    positives = np.array([0, 0, 1, 0, 1, 1], dtype=bool)
    scores = positives.astype(float) + np.linspace(0, 0.1, 6)
    assert auroc(scores, positives) == 1.0
    assert auroc(-scores, positives) == 0.0
    assert auroc(np.zeros(6), positives) == 0.5


@pytest.mark.parametrize(
    "scores, positives, match",
    [
        ([0.1, 0.2], [True, True], "both classes"),
        ([0.1, 0.2], [0, 2], "0 and 1"),
        ([0.1, 0.2, 0.3], [0, 1], "same length"),
        ([], [], "empty"),
    ],
)
def test_auroc_invalid_input_raises(scores, positives, match):
    with pytest.raises(ValueError, match=match):
        auroc(scores, positives)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(2)
    x = np.round(rng.normal(size=80), 1)
    y = x + rng.normal(size=80)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_diagnostics_rank_the_right_measures():
    rng = np.random.default_rng(3)
    damage = rng.exponential(size=2000)
    nll = damage + rng.normal(size=2000)
    noisy = damage + rng.normal(size=2000)
    result = uncertainty_diagnostics({"oracle": damage, "anti": -damage, "noisy": noisy},
                                     nll, damage)
    assert result["n_positive"] == 200 and result["n_tokens"] == 2000
    assert result["damage_threshold"] == pytest.approx(np.sort(damage)[-200])
    oracle = result["measures"]["oracle"]
    assert oracle["auroc_top_damage"] == 1.0 and oracle["spearman_damage"] == pytest.approx(1.0)
    assert oracle["spearman_nll"] == pytest.approx(scipy.stats.spearmanr(damage, nll).statistic)
    assert result["measures"]["anti"]["auroc_top_damage"] == 0.0
    top = damage >= np.sort(damage)[-200]
    assert result["measures"]["noisy"]["auroc_top_damage"] == pytest.approx(
        pairwise_auroc(noisy, top))
    assert result["measures"]["noisy"]["spearman_damage"] == pytest.approx(
        scipy.stats.spearmanr(noisy, damage).statistic)
    # chance level: the standard error of an AUROC with 200 vs 1800 rows is about 0.022
    assert abs(result["random_baseline"]["auroc_top_damage"] - 0.5) < 0.09


def test_diagnostics_with_tied_damage_report_nan(caplog):
    damage = np.zeros(50)
    damage[:3] = 1.0  # fewer damaged tokens than the top 10 %: the threshold is 0, all positive
    with caplog.at_level(logging.WARNING, logger="bayes_router.analysis.diagnostics"):
        result = uncertainty_diagnostics({"u": np.arange(50.0)}, np.arange(50.0), damage)
    assert math.isnan(result["measures"]["u"]["auroc_top_damage"])
    assert "undefined" in caplog.text


@pytest.mark.parametrize(
    "uncertainty, nll, damage, kwargs, match",
    [
        ({}, [1.0, 2.0], [1.0, 2.0], {}, "uncertainty"),
        ({"u": [1.0, 2.0]}, [1.0, 2.0, 3.0], [1.0, 2.0], {}, "same length"),
        ({"u": [1.0, 2.0]}, [1.0, 2.0], [1.0, 2.0], {"top_fraction": 1.0}, "top_fraction"),
        ({"u": [1.0]}, [1.0], [1.0], {}, "at least 2"),
        ({"u": [1.0, np.nan]}, [1.0, 2.0], [1.0, 2.0], {}, "NaN"),
    ],
)
def test_diagnostics_invalid_input_raises(uncertainty, nll, damage, kwargs, match):
    with pytest.raises(ValueError, match=match):
        uncertainty_diagnostics(uncertainty, nll, damage, **kwargs)


def test_routing_accuracy_by_decile():
    n = 120
    uncertainty = np.arange(n, dtype=float)[::-1].copy()  # reversed order: tests the sort
    oracle = np.zeros(n, dtype=int)
    oracle[::6] = -1  # 20 unlabelled tokens, 100 labelled
    pred = np.where(uncertainty < 60, 0, 1)  # right when certain, wrong when uncertain
    result = routing_accuracy_by_decile(pred, oracle, uncertainty)
    labelled = oracle != -1
    assert result["n_tokens"] == 100
    assert result["accuracy"] == pytest.approx(np.mean(pred[labelled] == 0))
    order = np.argsort(uncertainty[labelled])
    correct = (pred[labelled] == 0)[order]
    expected = [correct[10 * j:10 * (j + 1)].mean() for j in range(10)]
    np.testing.assert_allclose(result["bin_accuracy"], expected)
    np.testing.assert_array_equal(result["bin_count"], [10] * 10)
    assert np.all(np.diff(result["bin_mean_uncertainty"]) > 0)


def test_routing_accuracy_reports_the_majority_class_baseline():
    oracle = np.array([1] * 81 + [0] * 12 + [2] * 7 + [-1] * 5)  # -1 tokens do not count
    always_one = np.ones_like(oracle)
    result = routing_accuracy_by_decile(always_one, oracle, np.linspace(0, 1, len(oracle)))
    # a router that sends every token to the commonest label scores exactly the baseline
    assert result["majority_label"] == 1
    assert result["majority_baseline"] == pytest.approx(81 / 100)
    assert result["accuracy"] == pytest.approx(result["majority_baseline"])


def test_routing_accuracy_invalid_input_raises():
    with pytest.raises(ValueError, match="no labelled token"):
        routing_accuracy_by_decile([0, 1], [-1, -1], [0.1, 0.2])
    with pytest.raises(ValueError, match="oracle"):
        routing_accuracy_by_decile([0, 1], [0, -3], [0.1, 0.2])
    with pytest.raises(ValueError, match="n_bins"):
        routing_accuracy_by_decile([0, 1], [0, 1], [0.1, 0.2], n_bins=0)
