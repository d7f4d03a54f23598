"""Risk-coverage curve and AURC against brute force (every order of the tied scores) and the
closed cases: a constant score, the oracle ranking, and the window bootstrap."""

import itertools
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from bayes_router.analysis import (
    area_under_risk_coverage,
    excess_area_under_risk_coverage,
    oracle_area_under_risk_coverage,
    plot_risk_coverage,
    risk_coverage_curve,
    selective_prediction_summary,
)


def brute_force_curve(scores, losses):
    """The risk at every coverage, averaged over every order of the tied scores."""
    n = len(scores)
    orders = [order for order in itertools.permutations(range(n))
              if all(scores[order[i]] <= scores[order[i + 1]] for i in range(n - 1))]
    risk = np.zeros(n)
    for order in orders:
        kept = 0.0
        for k in range(1, n + 1):
            kept += losses[order[k - 1]]
            risk[k - 1] += kept / k / len(orders)
    return risk


@pytest.mark.parametrize("seed", range(6))
def test_curve_and_aurc_equal_the_brute_force_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    n = 7
    scores = rng.integers(0, 3, n).astype(float) if seed % 2 else rng.random(n)
    losses = rng.integers(0, 2, n).astype(float) if seed < 3 else rng.exponential(size=n)
    expected = brute_force_curve(scores, losses)
    curve = risk_coverage_curve(scores, losses)
    np.testing.assert_allclose(curve.coverage, np.arange(1, n + 1) / n)
    np.testing.assert_allclose(curve.risk, expected, atol=1e-12)
    assert area_under_risk_coverage(scores, losses) == pytest.approx(expected.mean(), abs=1e-12)


def test_result_does_not_depend_on_the_input_order():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 5, 300).astype(float)
    losses = rng.random(300)
    perm = rng.permutation(300)
    assert area_under_risk_coverage(scores[perm], losses[perm]) == pytest.approx(
        area_under_risk_coverage(scores, losses), abs=1e-13)


def test_a_constant_score_has_the_overall_risk_everywhere():
    losses = np.random.default_rng(8).integers(0, 2, 500).astype(float)
    curve = risk_coverage_curve(np.zeros(500), losses)
    np.testing.assert_allclose(curve.risk, losses.mean(), atol=1e-12)
    assert area_under_risk_coverage(np.zeros(500), losses) == pytest.approx(losses.mean())


@pytest.mark.parametrize("n, n_errors", [(10, 3), (1000, 140), (50, 0), (20, 20)])
def test_the_oracle_ordering_gives_the_closed_form_minimum(n, n_errors):
    errors = np.r_[np.zeros(n - n_errors), np.ones(n_errors)]
    rng = np.random.default_rng(9)
    perm = rng.permutation(n)
    errors = errors[perm]
    oracle_score = errors + 0.01 * rng.random(n)  # orders every error last
    minimum = sum((k - (n - n_errors)) / k for k in range(n - n_errors + 1, n + 1)) / n
    assert area_under_risk_coverage(oracle_score, errors) == pytest.approx(minimum, abs=1e-12)
    assert oracle_area_under_risk_coverage(errors) == pytest.approx(minimum, abs=1e-12)
    assert excess_area_under_risk_coverage(oracle_score, errors) == pytest.approx(0, abs=1e-12)
    # no score does better
    for _ in range(5):
        assert area_under_risk_coverage(rng.random(n), errors) >= minimum - 1e-12


def test_oracle_minimum_approaches_geifmans_continuous_form():
    n, r = 100000, 0.3
    errors = np.r_[np.zeros(int(n * (1 - r))), np.ones(int(n * r))]
    assert oracle_area_under_risk_coverage(errors) == pytest.approx(
        r + (1 - r) * math.log(1 - r), abs=1e-4)


def test_weights_are_multiplicities():
    rng = np.random.default_rng(10)
    for ties in (False, True):
        scores = rng.integers(0, 4, 200).astype(float) if ties else rng.random(200)
        losses = rng.random(200)
        weights = rng.integers(0, 25, 200)  # counts above the exact-sum limit too
        assert area_under_risk_coverage(scores, losses, weights) == pytest.approx(
            area_under_risk_coverage(np.repeat(scores, weights), np.repeat(losses, weights)),
            rel=1e-11)


def test_summary_intervals_and_paired_differences_use_the_same_windows():
    rng = np.random.default_rng(11)
    n, window_len, n_boot = 400, 20, 9
    correct = rng.uniform(size=n) < 0.6
    scores = {"good": np.where(correct, 0, 1) + rng.random(n), "noise": rng.random(n)}
    losses = {"error": 1.0 - correct, "nll": rng.exponential(size=n)}
    summary = selective_prediction_summary(scores, losses, window_len, "noise", n_boot=n_boot,
                                           seed=2)
    draws = np.random.default_rng(2)
    replicates = {(loss, name): [] for loss in losses for name in scores}
    for _ in range(n_boot):
        rows = draws.integers(0, n // window_len, n // window_len)
        tokens = (rows[:, None] * window_len + np.arange(window_len)).reshape(-1)
        for loss, values in losses.items():
            for name, score in scores.items():
                replicates[loss, name].append(area_under_risk_coverage(score[tokens],
                                                                       values[tokens]))
    for loss, values in losses.items():
        entry = summary[loss]
        assert entry["overall"] == pytest.approx(values.mean())
        assert entry["oracle_aurc"] == pytest.approx(oracle_area_under_risk_coverage(values))
        for name, score in scores.items():
            e = entry["scores"][name]
            assert e["aurc"]["value"] == pytest.approx(area_under_risk_coverage(score, values))
            low, high = np.quantile(replicates[loss, name], [0.025, 0.975])
            assert (e["aurc"]["low"], e["aurc"]["high"]) == pytest.approx((low, high))
            paired = np.subtract(replicates[loss, name], replicates[loss, "noise"])
            low, high = np.quantile(paired, [0.025, 0.975])
            assert (e["minus_reference"]["low"], e["minus_reference"]["high"]) == \
                pytest.approx((low, high), abs=1e-12)
            assert len(e["curve"]["coverage"]) == 101 and e["curve"]["coverage"][-1] == 1.0
    assert summary["error"]["scores"]["good"]["minus_reference"]["high"] < 0


@pytest.mark.parametrize("call, match", [
    (lambda: area_under_risk_coverage([0.1, 0.2], [1.0]), "same length"),
    (lambda: area_under_risk_coverage([0.1, np.nan], [1.0, 0.0]), "NaN"),
    (lambda: area_under_risk_coverage([0.1, 0.2], [1.0, 0.0], [1, -1]), "weights"),
    (lambda: area_under_risk_coverage([0.1, 0.2], [1.0, 0.0], [1, 0.5]), "weights"),
    (lambda: risk_coverage_curve([], []), "scores is empty"),
    (lambda: selective_prediction_summary({"a": np.zeros(4)}, {"e": np.zeros(4)}, 2, "b"),
     "reference"),
    (lambda: selective_prediction_summary({"a": np.zeros(4)}, {"e": np.zeros(4)}, 3, "a"),
     "window_len"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_plot_draws_one_line_per_call():
    rng = np.random.default_rng(12)
    scores, losses = rng.random(50), rng.integers(0, 2, 50).astype(float)
    ax = plot_risk_coverage(scores, losses, label="a")
    plot_risk_coverage(curve=risk_coverage_curve(losses, losses), ax=ax, label="oracle")
    assert [line.get_label() for line in ax.lines] == ["a", "oracle"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), risk_coverage_curve(scores, losses).risk)
    with pytest.raises(ValueError, match="either"):
        plot_risk_coverage(scores, losses, curve=risk_coverage_curve(scores, losses))
    plt.close("all")
