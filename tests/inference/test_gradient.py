"""Every estimator's mean gradient on the conjugate toy, against the closed-form ELBO gradient."""

import pytest
import torch
from scipy.stats import chi2

from bayes_router.inference.estimators import RSVI, estimator_names, get_estimator
from bayes_router.variance.toy import gradient_draws, toy_elbo_grad

COUNTS = torch.tensor([6.0, 3.0, 1.0], dtype=torch.float64)
PRIOR = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
POSTERIOR = PRIOR + COUNTS
A = torch.tensor([2.0, 3.0, 1.5], dtype=torch.float64)  # away from the optimum
NUM_DRAWS = 20000
CRITICAL = chi2.ppf(0.999, df=3)

UNBIASED = [name for name in estimator_names() if get_estimator(name).unbiased]
BIASED = [name for name in estimator_names() if not get_estimator(name).unbiased]


def hotelling(draws: torch.Tensor, target: torch.Tensor) -> float:
    """``M d^T S^-1 d`` for ``d = mean(draws) - target``: about chi-square(K) when unbiased."""
    diff = draws.mean(0) - target
    covariance = torch.cov(draws.T)
    return float(draws.shape[0] * diff @ torch.linalg.solve(covariance, diff))


def draws_for(name, a, num_particles=None, seed=0, num_draws=NUM_DRAWS, kl_scale=1.0):
    return gradient_draws(name, a, num_draws, COUNTS, PRIOR, num_particles=num_particles,
                          batch_size=2000, seed=seed, kl_scale=kl_scale)


def test_every_estimator_is_classified():
    assert set(UNBIASED) | set(BIASED) == set(estimator_names())
    assert set(BIASED) == {"iwae", "dreg"}


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_estimator_mean_matches_exact_gradient(name, num_particles):
    draws = draws_for(name, A, num_particles=num_particles, seed=11)
    exact = toy_elbo_grad(A, COUNTS, PRIOR)
    assert torch.isfinite(draws).all()
    statistic = hotelling(draws, exact)
    assert statistic < CRITICAL, (name, draws.mean(0), exact, statistic)


@pytest.mark.parametrize("estimator", BIASED + [RSVI(score_correction=False)],
                         ids=lambda e: e if isinstance(e, str) else "rsvi-no-correction")
def test_biased_estimator_reports_finite_bias(estimator, record_property):
    est = get_estimator(estimator)
    assert not est.unbiased
    draws = gradient_draws(est, A, NUM_DRAWS, COUNTS, PRIOR, batch_size=2000, seed=5)
    bias = draws.mean(0) - toy_elbo_grad(A, COUNTS, PRIOR)
    standard_error = draws.std(0) / NUM_DRAWS**0.5
    record_property("bias", bias.tolist())
    record_property("standard_error", standard_error.tolist())
    print(f"{est.name} bias {bias.tolist()} +- {standard_error.tolist()}")
    assert torch.isfinite(bias).all() and torch.isfinite(standard_error).all()


@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_estimator_mean_matches_exact_gradient_with_a_scaled_kl(name):
    """KL annealing and KL weights scale the alpha sites' log-densities; the closed form with the
    KL term scaled (toy_elbo_grad(kl_scale=...)) is the target."""
    draws = draws_for(name, A, seed=12, kl_scale=0.3)
    statistic = hotelling(draws, toy_elbo_grad(A, COUNTS, PRIOR, kl_scale=0.3))
    assert statistic < CRITICAL, (name, draws.mean(0), statistic)


@pytest.mark.parametrize("kl_scale", [1.0, 0.3])
def test_importance_weighted_estimators_target_the_same_bound(kl_scale):
    """IWAE and DReG are both unbiased for the gradient of the same 2-particle bound, also when
    the KL term is scaled (then DReG's weights are (1 - lambda) w + lambda w^2, not w^2)."""
    iwae = draws_for("iwae", A, seed=1, kl_scale=kl_scale)
    dreg = draws_for("dreg", A, seed=2, kl_scale=kl_scale)
    diff = iwae.mean(0) - dreg.mean(0)
    covariance = (torch.cov(iwae.T) + torch.cov(dreg.T)) / NUM_DRAWS
    assert float(diff @ torch.linalg.solve(covariance, diff)) < CRITICAL
    elbo_bias = iwae.mean(0) - toy_elbo_grad(A, COUNTS, PRIOR, kl_scale=kl_scale)
    assert elbo_bias.abs().max() > 10 * (iwae.std(0) / NUM_DRAWS**0.5).max()


def test_toy_likelihood_is_exact_at_small_concentrations():
    """Categorical(probs=alpha) clamps probabilities at the dtype's eps, which biased the toy's
    likelihood of draws near the corners (an audit measured 310 against the exact 496.5)."""
    a = torch.tensor([0.05, 0.05, 1.0], dtype=torch.float64)
    draws = gradient_draws("reparam-mc", a, 100_000, COUNTS, PRIOR, batch_size=10_000, seed=7)
    exact = toy_elbo_grad(a, COUNTS, PRIOR)
    assert torch.isfinite(draws).all()
    assert hotelling(draws, exact) < CRITICAL, (draws.mean(0), exact)


@pytest.mark.parametrize("name", ["stl", "dreg"])
def test_path_derivative_estimators_have_zero_variance_at_the_posterior(name):
    draws = draws_for(name, POSTERIOR, num_draws=500)
    assert draws.abs().max() < 1e-8


def test_stl_has_lower_variance_than_reparam_mc_near_the_optimum(record_property):
    for factor, bound in [(1.0, 1e-12), (1.1, 0.1), (0.8, 0.25)]:
        a = POSTERIOR * factor
        mc = draws_for("reparam-mc", a, seed=3, num_draws=2000).var(0).sum()
        stl = draws_for("stl", a, seed=3, num_draws=2000).var(0).sum()
        record_property(f"stl_over_reparam_mc_variance_at_{factor}", float(stl / mc))
        assert stl < bound * mc, (factor, float(stl / mc))


def test_rsvi_correction_term_removes_the_bias_at_small_boost():
    """With boost 1 the omitted correction is detectable; with it, the mean is exact."""
    exact = toy_elbo_grad(A, COUNTS, PRIOR)
    corrected = gradient_draws(RSVI(boost=1), A, 200_000, COUNTS, PRIOR, batch_size=5000,
                               seed=1)
    omitted = gradient_draws(RSVI(boost=1, score_correction=False), A, 200_000, COUNTS, PRIOR,
                             batch_size=5000, seed=1)
    assert hotelling(corrected, exact) < CRITICAL
    assert hotelling(omitted, exact) > CRITICAL
