"""The conjugate toy: closed forms, the Pyro model/guide pair, SVI, and the gradient lab helper."""

from functools import partial

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI

from bayes_router.inference.estimators import estimator_names, get_estimator
from bayes_router.variance.toy import (
    TOY_CONCENTRATION,
    gradient_draws,
    toy_elbo,
    toy_elbo_grad,
    toy_guide,
    toy_log_evidence,
    toy_model,
    toy_observations,
    toy_posterior,
)

COUNTS = torch.tensor([6.0, 3.0, 1.0], dtype=torch.float64)
PRIOR = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
POSTERIOR = PRIOR + COUNTS


def test_posterior_is_prior_plus_counts():
    posterior = toy_posterior(COUNTS, PRIOR)
    assert isinstance(posterior, pyro.distributions.Dirichlet)
    assert torch.equal(posterior.concentration, POSTERIOR)


def test_observations_reproduce_counts():
    obs = toy_observations(COUNTS)
    assert torch.equal(torch.bincount(obs, minlength=3).double(), COUNTS)


def test_elbo_is_maximal_at_the_posterior_where_it_equals_the_evidence():
    log_evidence = toy_log_evidence(COUNTS, PRIOR)
    assert torch.allclose(toy_elbo(POSTERIOR, COUNTS, PRIOR), log_evidence)
    assert torch.allclose(toy_elbo_grad(POSTERIOR, COUNTS, PRIOR), torch.zeros(3, dtype=float),
                          atol=1e-12)
    others = POSTERIOR * torch.exp(0.3 * torch.randn(50, 3, dtype=torch.float64))
    assert (toy_elbo(others, COUNTS, PRIOR) < log_evidence).all()


def test_evidence_matches_the_dirichlet_multinomial_sequence_probability():
    """p(obs) = prod_n (prior_{k_n} + count so far) / (prior_0 + n): sequential prediction."""
    log_p, running = 0.0, PRIOR.clone()
    for k in toy_observations(COUNTS):
        log_p += torch.log(running[k] / running.sum())
        running[k] += 1
    assert torch.allclose(toy_log_evidence(COUNTS, PRIOR), log_p)


def test_closed_form_gradient_matches_autograd_of_the_closed_form_elbo():
    a = torch.tensor([2.0, 3.0, 1.5], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(toy_elbo(a, COUNTS, PRIOR), a)
    assert torch.allclose(grad, toy_elbo_grad(a.detach(), COUNTS, PRIOR))


def test_closed_form_elbo_matches_monte_carlo_of_the_pyro_model_and_guide():
    a = torch.tensor([2.0, 3.0, 1.5], dtype=torch.float64)
    replicas = 50_000
    guide_trace = poutine.trace(toy_guide).get_trace(COUNTS, PRIOR, replicas, init=a)
    model_trace = poutine.trace(poutine.replay(toy_model, trace=guide_trace)).get_trace(
        COUNTS, PRIOR, replicas)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_weight = (model_trace.nodes["alpha_0"]["log_prob"] + model_trace.nodes["obs"]["log_prob"]
                  - guide_trace.nodes["alpha_0"]["log_prob"])  # (replicas,)
    assert log_weight.shape == (replicas,)
    standard_error = log_weight.std() / replicas**0.5
    assert abs(log_weight.mean() - toy_elbo(a, COUNTS, PRIOR)) < 4 * standard_error


def test_model_and_guide_follow_the_site_pattern():
    guide_trace = poutine.trace(toy_guide).get_trace(COUNTS, PRIOR)
    model_trace = poutine.trace(poutine.replay(toy_model, trace=guide_trace)).get_trace(
        COUNTS, PRIOR)
    for trace in (guide_trace, model_trace):
        site = trace.nodes["alpha_0"]
        assert [frame.name for frame in site["cond_indep_stack"]] == ["batch"]
        assert site["fn"].event_shape == (1, 3) and site["value"].shape == (1, 1, 3)
    assert model_trace.nodes["obs"]["is_observed"]


@pytest.mark.parametrize("name", estimator_names())
def test_every_estimator_runs_on_the_toy(name):
    estimator = get_estimator(name)
    elbo = estimator.make_elbo(num_particles=estimator.min_particles, max_plate_nesting=1)
    loss = elbo.loss_and_grads(toy_model, partial(toy_guide, estimator=estimator), COUNTS,
                               PRIOR)
    grad = pyro.get_param_store().get_param(TOY_CONCENTRATION).unconstrained().grad
    assert torch.isfinite(torch.tensor(loss)) and torch.isfinite(grad).all()


def test_svi_recovers_the_exact_posterior():
    pyro.set_rng_seed(1)
    estimator = get_estimator("reparam-analytic")
    svi = SVI(toy_model, partial(toy_guide, estimator=estimator), pyro.optim.Adam({"lr": 0.05}),
              estimator.make_elbo(num_particles=16, max_plate_nesting=1))
    steps, averaged = 400, 200
    average = torch.zeros(3, dtype=torch.float64)
    for step in range(steps):
        svi.step(COUNTS, PRIOR)
        if step >= steps - averaged:  # Polyak averaging of the iterates
            average += pyro.param(TOY_CONCENTRATION).detach() / averaged
    assert torch.allclose(average, POSTERIOR, rtol=0.05)
    assert torch.allclose(average / average.sum(), POSTERIOR / POSTERIOR.sum(), atol=0.01)


def test_gradient_draws_shape_seed_and_isolation():
    pyro.param("unrelated", torch.ones(2))
    a = torch.tensor([2.0, 3.0, 1.5], dtype=torch.float64)
    first = gradient_draws("reparam-mc", a, 7, COUNTS, PRIOR, batch_size=3, seed=4)
    second = gradient_draws("reparam-mc", a, 7, COUNTS, PRIOR, batch_size=3, seed=4)
    assert first.shape == (7, 3) and first.dtype == torch.float64
    assert torch.equal(first, second)
    assert list(pyro.get_param_store().keys()) == ["unrelated"]


def test_gradient_draws_rejects_bad_input():
    with pytest.raises(ValueError, match="a must hold"):
        gradient_draws("reparam-mc", torch.tensor([1.0, -1.0, 1.0]), 3, COUNTS, PRIOR)
    with pytest.raises(ValueError, match="num_draws"):
        gradient_draws("reparam-mc", POSTERIOR, 0, COUNTS, PRIOR)
    with pytest.raises(ValueError, match="unknown estimator"):
        gradient_draws("reinforce", POSTERIOR, 3, COUNTS, PRIOR)


def test_toy_rejects_bad_counts_and_prior():
    with pytest.raises(ValueError, match="counts"):
        toy_elbo(POSTERIOR, torch.tensor([1.5, 0.0, 1.0]), PRIOR)
    with pytest.raises(ValueError, match="counts"):
        toy_elbo(POSTERIOR, torch.tensor([1.0, 2.0]), PRIOR)
    with pytest.raises(ValueError, match="prior"):
        toy_posterior(COUNTS, torch.tensor([1.0, 0.0, 1.0]))
