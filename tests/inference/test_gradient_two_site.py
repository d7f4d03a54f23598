"""Every estimator on a two-site toy whose guide is autoregressive (as the routed LM's is), with
and without a scaled KL term, against gradients derived independently of the estimators: the
quadrature ELBO's finite differences, and a plain-torch reparameterised gradient of the
importance-weighted bound."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from bayes_router.inference.estimators import estimator_names, get_estimator
from bayes_router.variance.toy import toy_elbo_grad
from bayes_router.variance.toy_two_site import (
    two_site_elbo,
    two_site_elbo_grad,
    two_site_gradient_draws,
    two_site_log_evidence,
)

COUNTS = np.array([[5.0, 2.0], [1.0, 4.0]])
PRIOR = np.array([[0.7, 1.3], [1.0, 0.6]])
COUPLING = 0.5
THETA = np.array([2.0, 1.5, 0.3, 0.4, 2.0])  # (a1, a2, b1, b2, c), away from the optimum
NUM_DRAWS = 20000
CRITICAL = chi2.ppf(0.999, df=5)
KL_SCALES = [1.0, 0.3]

UNBIASED = [name for name in estimator_names() if get_estimator(name).unbiased]
BOUND = ["iwae", "dreg"]


def hotelling(draws, target) -> float:
    draws = torch.as_tensor(draws, dtype=torch.float64)
    diff = draws.mean(0) - torch.as_tensor(target, dtype=torch.float64)
    return float(draws.shape[0] * diff @ torch.linalg.solve(torch.cov(draws.T), diff))


def two_sample_hotelling(first, second) -> float:
    diff = first.mean(0) - second.mean(0)
    covariance = torch.cov(first.T) / first.shape[0] + torch.cov(second.T) / second.shape[0]
    return float(diff @ torch.linalg.solve(covariance, diff))


def reference_bound_gradients(theta, counts, prior, coupling, kl_scale, num_particles,
                              num_draws, seed) -> torch.Tensor:
    """Per-draw gradients of ``log mean_k w_k`` written directly in torch (no Pyro, no estimator
    code): reparameterised samples, autograd through the whole log-weight."""
    Dirichlet = torch.distributions.Dirichlet
    counts = torch.as_tensor(counts, dtype=torch.float64)
    prior = torch.as_tensor(prior, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        theta = torch.as_tensor(theta, dtype=torch.float64).expand(num_draws, 5).clone()
        theta.requires_grad_(True)
        a = theta[:, None, 0:2].expand(num_draws, num_particles, 2)
        b, c = theta[:, None, 2:4], theta[:, None, 4:5]
        z1 = Dirichlet(a).rsample()
        z2 = Dirichlet(b + c * z1).rsample()
        log_likelihood = (counts[0] * z1.log()).sum(-1) + (counts[1] * z2.log()).sum(-1)
        log_prior = (Dirichlet(prior[0]).log_prob(z1)
                     + Dirichlet(prior[1] + coupling * z1).log_prob(z2))
        log_guide = Dirichlet(a).log_prob(z1) + Dirichlet(b + c * z1).log_prob(z2)
        log_weight = log_likelihood + kl_scale * (log_prior - log_guide)
        bound = torch.logsumexp(log_weight, -1) - math.log(num_particles)
        (grad,) = torch.autograd.grad(bound.sum(), theta)
    return grad


def test_quadrature_elbo_equals_the_evidence_at_the_exact_posterior():
    counts = np.array([[5.0, 2.0], [0.0, 0.0]])
    posterior = np.array([*(PRIOR[0] + counts[0]), *PRIOR[1], COUPLING])
    evidence = two_site_log_evidence(counts, PRIOR)
    assert two_site_elbo(posterior, counts, PRIOR, COUPLING) == pytest.approx(evidence, abs=1e-10)
    assert two_site_elbo(THETA, counts, PRIOR, COUPLING) < evidence - 1e-3
    assert np.abs(two_site_elbo_grad(posterior, counts, PRIOR, COUPLING)).max() < 1e-6


@pytest.mark.parametrize("kl_scale", KL_SCALES)
def test_quadrature_gradient_matches_the_single_site_closed_form_when_sites_decouple(kl_scale):
    """With c = 0 and no coupling the ELBO is two single-site toy ELBOs."""
    theta = np.array([2.0, 1.5, 1.2, 2.5, 0.0])
    grad = two_site_elbo_grad(theta, COUNTS, PRIOR, 0.0, kl_scale)
    expected = [toy_elbo_grad(torch.tensor(theta[2 * i:2 * i + 2]), torch.tensor(COUNTS[i]),
                              torch.tensor(PRIOR[i]), kl_scale).numpy() for i in range(2)]
    np.testing.assert_allclose(grad[:4], np.concatenate(expected), rtol=1e-6, atol=1e-8)


def test_reference_bound_gradient_with_one_particle_is_the_elbo_gradient():
    draws = reference_bound_gradients(THETA, COUNTS, PRIOR, COUPLING, 0.3, 1, 50_000, seed=0)
    assert hotelling(draws, two_site_elbo_grad(THETA, COUNTS, PRIOR, COUPLING, 0.3)) < CRITICAL


@pytest.mark.parametrize("kl_scale", KL_SCALES)
@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_estimators_match_the_quadrature_gradient(name, kl_scale):
    draws = two_site_gradient_draws(name, THETA, NUM_DRAWS, COUNTS, PRIOR, coupling=COUPLING,
                                    kl_scale=kl_scale, seed=3)
    exact = two_site_elbo_grad(THETA, COUNTS, PRIOR, COUPLING, kl_scale)
    assert torch.isfinite(draws).all()
    assert hotelling(draws, exact) < CRITICAL, (name, draws.mean(0), exact)


@pytest.mark.parametrize("kl_scale", KL_SCALES)
@pytest.mark.parametrize("name", BOUND)
def test_bound_estimators_match_the_reference_bound_gradient(name, kl_scale):
    """IWAE and DReG are unbiased for the gradient of the (KL-scaled) 2-particle bound, and
    biased for the ELBO's, as their docstrings say."""
    assert not get_estimator(name).unbiased
    draws = two_site_gradient_draws(name, THETA, NUM_DRAWS, COUNTS, PRIOR, coupling=COUPLING,
                                    kl_scale=kl_scale, num_particles=2, seed=4)
    reference = reference_bound_gradients(THETA, COUNTS, PRIOR, COUPLING, kl_scale, 2,
                                          NUM_DRAWS, seed=5)
    assert two_sample_hotelling(draws, reference) < CRITICAL, (draws.mean(0), reference.mean(0))
    assert hotelling(draws, two_site_elbo_grad(THETA, COUNTS, PRIOR, COUPLING, kl_scale)) > 100


@pytest.mark.parametrize("name", ["stl", "dreg"])
def test_path_derivatives_have_zero_variance_at_an_autoregressive_posterior(name):
    """With counts[1] = 0 the exact posterior of z2 depends on z1 and lies in the guide family."""
    counts = np.array([[5.0, 2.0], [0.0, 0.0]])
    posterior = np.array([*(PRIOR[0] + counts[0]), *PRIOR[1], COUPLING])
    draws = two_site_gradient_draws(name, posterior, 500, counts, PRIOR, coupling=COUPLING,
                                    seed=6)
    assert draws.abs().max() < 1e-10
    control = two_site_gradient_draws("reparam-mc", posterior, 500, counts, PRIOR,
                                      coupling=COUPLING, seed=6)
    assert control.std(0).min() > 0.1  # the same point is not trivially zero-variance
