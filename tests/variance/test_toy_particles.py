"""The toy's particle sweep: power-law fits checked on exact and noisy laws against scipy, the
bootstrap against an explicit resample, and the scaling laws measured on the toy."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from bayes_router.variance.gradient_stats import summarise_gradients
from bayes_router.variance.toy import gradient_draws
from bayes_router.variance.toy_variance import (
    BOOTSTRAPPED,
    EXPECTED_SLOPES,
    FITTED,
    TOY_COUNTS,
    TOY_POINT,
    TOY_PRIOR,
    ZERO_AT_POSTERIOR,
    bootstrap_summaries,
    fit_power_law,
    local_slopes,
    toy_variance_vs_particles,
)

PARTICLES = np.array([2.0, 8.0, 32.0, 128.0])


@pytest.mark.parametrize(("scale", "exponent"), [(3.0, -0.5), (0.2, 1.0), (5.0, -3.0),
                                                 (1.0, 0.0)])
def test_fit_recovers_an_exact_power_law(scale, exponent):
    fit = fit_power_law(PARTICLES, scale * PARTICLES**exponent)
    assert fit.slope == pytest.approx(exponent, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log(scale), abs=1e-12)
    assert fit.standard_error == pytest.approx(0.0, abs=1e-12)
    assert fit.num_points == 4 and fit.interval is None


def test_fit_tells_one_exponent_from_another():
    """A K^-1/2 law is not fitted as K^-1 or as flat (the fit can fail)."""
    slope = fit_power_law(PARTICLES, PARTICLES**-0.5).slope
    assert slope != pytest.approx(-1.0, abs=0.1) and slope != pytest.approx(0.0, abs=0.1)


def test_fit_matches_scipy_linregress_on_a_noisy_law():
    rng = np.random.default_rng(0)
    y = 2.0 * PARTICLES**-0.7 * np.exp(0.1 * rng.normal(size=4))
    fit = fit_power_law(PARTICLES, y)
    reference = stats.linregress(np.log(PARTICLES), np.log(y))
    assert fit.slope == pytest.approx(reference.slope, rel=1e-12)
    assert fit.intercept == pytest.approx(reference.intercept, rel=1e-12)
    assert fit.standard_error == pytest.approx(reference.stderr, rel=1e-10)
    assert fit.standard_error > 0


def test_fit_with_two_points_has_no_residual_standard_error():
    fit = fit_power_law([1, 4], [1.0, 0.25])
    assert fit.slope == pytest.approx(-1.0) and math.isnan(fit.standard_error)


@pytest.mark.parametrize(("x", "y", "field"), [
    ([1, 2, 4], [1.0, 0.0, 0.5], "y must hold positive"),
    ([1, 2, 4], [1.0, math.inf, 0.5], "y must hold positive"),
    ([0, 2, 4], [1.0, 1.0, 0.5], "x must hold positive"),
    ([2, 2], [1.0, 0.5], "x must hold at least two distinct"),
    ([1, 2], [1.0, 0.5, 0.2], "x and y"),
])
def test_fit_rejects_bad_points(x, y, field):
    with pytest.raises(ValueError, match=field):
        fit_power_law(x, y)


def test_local_slopes_between_neighbours():
    assert local_slopes([1, 4, 16], [1.0, 0.25, 0.125]) == pytest.approx([-1.0, -0.5])
    assert local_slopes([1, 4, 16], [1.0, 0.0, 0.125]) == [None, None]


class _FixedCounts:
    """Stands in for a numpy Generator whose multinomial returns chosen resample counts."""

    def __init__(self, counts):
        self.counts = np.asarray(counts)

    def multinomial(self, n, pvals, size):
        assert n == self.counts.shape[1] and len(pvals) == n
        return self.counts[:size]


def test_bootstrap_summaries_are_those_of_the_explicit_resample():
    rng = np.random.default_rng(1)
    draws = rng.normal(size=(6, 3)) + np.array([5.0, -1.0, 0.2])
    counts = np.array([[1, 1, 1, 1, 1, 1], [3, 0, 0, 1, 2, 0], [0, 0, 6, 0, 0, 0]])
    summaries = bootstrap_summaries(draws, 3, _FixedCounts(counts))
    for row, row_counts in enumerate(counts[:2]):
        expected = summarise_gradients(np.repeat(draws, row_counts, axis=0))
        for key in BOOTSTRAPPED:
            assert summaries[key][row] == pytest.approx(getattr(expected, key), rel=1e-10)
    assert summaries["total_variance"][2] == pytest.approx(0.0, abs=1e-12)  # one row, 6 times


def test_bootstrap_spread_of_the_variance_matches_its_gaussian_standard_error():
    """For Gaussian draws Var[s^2] = 2 sigma^4 / (M - 1); the trace sums P of them."""
    rng = np.random.default_rng(2)
    sigma = np.array([1.0, 2.0, 0.5])
    draws = rng.normal(size=(4000, 3)) * sigma
    spread = bootstrap_summaries(draws, 400, np.random.default_rng(3))["total_variance"].std()
    assert spread == pytest.approx(math.sqrt(2 * (sigma**4).sum() / 3999), rel=0.15)


def test_sweep_records_skips_slopes_and_the_posterior_check():
    sweep = toy_variance_vs_particles(["reparam-mc", "stl", "dreg", "iwae"], [16, 1, 4, 4],
                                      num_draws=300, num_bootstrap=20, posterior_draws=50)
    assert sweep["particles"] == [1, 4, 16]
    assert set(sweep["estimators"]["dreg"][0]) == {"skipped"}
    assert [p["num_particles"] for p in sweep["estimators"]["dreg"][1:]] == [4, 16]
    assert sweep["estimators"]["stl"][1]["groups"]["a"]["num_draws"] == 300
    assert set(sweep["slopes"]["reparam-mc"]) == set(FITTED)
    for key in FITTED:
        fit = sweep["slopes"]["dreg"][key]
        assert fit["num_points"] == 2 and (fit["interval"] is not None) == (key in BOOTSTRAPPED)
        values = [point["groups"]["a"][key] for point in sweep["estimators"]["reparam-mc"]]
        assert sweep["slopes"]["reparam-mc"][key]["slope"] == pytest.approx(
            fit_power_law([1, 4, 16], values).slope, abs=1e-12)
        if key in BOOTSTRAPPED:
            assert sweep["local_slopes"]["reparam-mc"][key] == local_slopes([1, 4, 16], values)
    assert sweep["expected_slopes"]["dreg"] == EXPECTED_SLOPES["dreg"]
    posterior = sweep["at_posterior"]
    assert posterior["a"] == [p + c for p, c in zip(TOY_PRIOR, TOY_COUNTS, strict=True)]
    for name in ZERO_AT_POSTERIOR:
        measured = [p for p in posterior["estimators"][name] if "skipped" not in p]
        assert len(measured) == (3 if name == "stl" else 2)
        assert all(point["max_abs"] < 1e-8 for point in measured)
    assert set(posterior["estimators"]["dreg"][0]) == {"skipped"}
    assert all(point["total_variance"] > 1e-3
               for point in posterior["estimators"]["reparam-mc"])
    # at the posterior every importance weight is p(x): iwae averages the particles' ELBO
    # gradients, and common random numbers make it reparam-mc's draw for draw
    for i in (1, 2):  # K = 4, 16
        assert posterior["estimators"]["iwae"][i] == pytest.approx(
            posterior["estimators"]["reparam-mc"][i], rel=1e-9)


def test_sweep_is_reproducible_from_its_seed():
    def run(seed, num_bootstrap=10):
        sweep = toy_variance_vs_particles(["reparam-mc"], [1, 3], num_draws=50,
                                          num_bootstrap=num_bootstrap, posterior_draws=0,
                                          seed=seed)
        return ([point["groups"]["a"]["total_variance"]
                 for point in sweep["estimators"]["reparam-mc"]],
                sweep["slopes"]["reparam-mc"]["total_variance"]["interval"])

    assert run(5) == run(5) and run(5) != run(6)
    assert run(5, num_bootstrap=0) == (run(5)[0], None)


@pytest.mark.parametrize(("options", "field"), [
    ({"particles": [0, 2]}, "particles"), ({"particles": []}, "particles"),
    ({"particles": [1.5]}, "particles"), ({"num_draws": 1}, "num_draws"),
    ({"num_bootstrap": -1}, "num_bootstrap"), ({"posterior_draws": 1}, "num_draws"),
    ({"level": 1.0}, "level"), ({"estimators": ["nope"]}, "unknown estimator"),
])
def test_sweep_rejects_bad_options(options, field):
    options = {"estimators": ["reparam-mc"], "particles": [1, 2], "num_draws": 10, **options}
    with pytest.raises(ValueError, match=field):
        toy_variance_vs_particles(**options)


def _delta_method_log_variance(draws: np.ndarray) -> tuple[float, float]:
    """``log`` of the total variance and its standard error: the total variance is the mean of
    the per-draw ``||g - mean||^2``, whose standard error is their std over ``sqrt(M)``."""
    squared = ((draws - draws.mean(0)) ** 2).sum(1)
    return math.log(squared.mean()), squared.std(ddof=1) / squared.mean() / math.sqrt(len(draws))


def test_averaged_reparameterised_variance_falls_as_one_over_k():
    """Averaging K independent estimates divides the variance by K: the sweep's bootstrap
    interval and an independent delta-method interval both contain -1 and exclude 0."""
    ks = [1, 4, 16, 64]
    sweep = toy_variance_vs_particles(["reparam-mc"], ks, num_draws=4000, num_bootstrap=200,
                                      posterior_draws=0, seed=1)
    fit = sweep["slopes"]["reparam-mc"]["total_variance"]
    low, high = fit["interval"]
    assert low < -1.0 < high and high < -0.5, fit

    a = torch.tensor(TOY_POINT, dtype=torch.float64)
    counts, prior = torch.tensor(TOY_COUNTS), torch.tensor(TOY_PRIOR)
    logs, errors = zip(*(_delta_method_log_variance(gradient_draws(
        "reparam-mc", a, 4000, counts, prior, num_particles=k, batch_size=2000,
        seed=100 + k).numpy()) for k in ks), strict=True)
    weights = 1.0 / np.square(errors)
    slope, _ = np.polyfit(np.log(ks), logs, 1, w=np.sqrt(weights))
    log_k = np.log(ks)
    centre = (weights * log_k).sum() / weights.sum()
    standard_error = 1.0 / math.sqrt((weights * (log_k - centre) ** 2).sum())
    assert abs(slope + 1.0) < 3.3 * standard_error  # 99.9 % interval contains -1
    assert abs(slope) > 10 * standard_error  # and is far from 0
    assert fit["bootstrap_standard_error"] == pytest.approx(standard_error, rel=0.5)


def test_importance_weighted_snr_slopes_have_the_papers_signs():
    """Rainforth et al.: iwae's guide SNR falls with K; Tucker et al.: dreg's rises."""
    sweep = toy_variance_vs_particles(["iwae", "dreg"], [2, 8, 32], num_draws=2000,
                                      num_bootstrap=100, posterior_draws=0, seed=2)
    assert sweep["slopes"]["iwae"]["median_snr"]["interval"][1] < 0
    assert sweep["slopes"]["dreg"]["median_snr"]["interval"][0] > 0
