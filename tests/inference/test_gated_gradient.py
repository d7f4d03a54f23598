"""Training-time gating: the gated objective is an ELBO, but pathwise gradients of it are biased.

A two-expert toy routes a sampled alpha through the project's own gate (``routing_weights`` in
gated mode on the sample's normalised entropy, as the routed LM's training pass does): the
observations come from the mixture ``sum_k gate(alpha)_k P_k``. The exact ELBO splits at the
gate's edges ``u*`` and ``1 - u*`` of ``u = alpha_0 ~ Beta(a1, a2)``: constant likelihoods on
the gated ends (Beta CDFs), a smooth quadrature between them, and the closed-form KL; its
gradient is a central finite difference of that expression.
"""

import logging
import math

import numpy as np
import pyro
import pytest
import torch
from scipy import integrate, optimize, special
from scipy.stats import beta as beta_dist
from scipy.stats import chi2
from torch.distributions import constraints

from bayes_router.inference.estimators import estimator_names, get_estimator
from bayes_router.inference.train import train
from bayes_router.inference.train_config import TrainConfig, gated_training_bias
from bayes_router.models.bayesian import _sample_decision
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.router import routing_weights
from bayes_router.variance.toy import (
    TOY_CONCENTRATION,
    observe_counts,
    replica_gradient_draws,
    toy_guide,
)

THRESHOLD = 0.6
EXPERTS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])  # P_k(y) of the two experts
COUNTS = np.array([4.0, 3.0, 5.0])
PRIOR = np.array([0.8, 1.2])
A = np.array([1.5, 2.0])
CRITICAL = chi2.ppf(0.999, df=2)


def gate_edge() -> float:
    """``u*`` < 1/2 with normalised entropy ``H(u*, 1 - u*) / log 2 = THRESHOLD``."""
    def entropy(u):
        return -(u * math.log(u) + (1 - u) * math.log(1 - u)) / math.log(2) - THRESHOLD
    return optimize.brentq(entropy, 1e-12, 0.5 - 1e-12, xtol=1e-15)


def exact_gated_elbo(a) -> float:
    a1, a2 = a
    edge = gate_edge()
    log_lik = COUNTS @ np.log(EXPERTS).T  # (2,) one-hot likelihoods
    gated = (log_lik[1] * special.betainc(a1, a2, edge)
             + log_lik[0] * (1 - special.betainc(a1, a2, 1 - edge)))

    def soft(u):
        return (COUNTS @ np.log(u * EXPERTS[0] + (1 - u) * EXPERTS[1])) * beta_dist.pdf(u, a1, a2)

    middle, _ = integrate.quad(soft, edge, 1 - edge, epsabs=1e-13, epsrel=1e-13)
    q, p = np.asarray(a), PRIOR
    kl = (special.gammaln(q.sum()) - special.gammaln(q).sum() - special.gammaln(p.sum())
          + special.gammaln(p).sum()
          + ((q - p) * (special.digamma(q) - special.digamma(q.sum()))).sum())
    return gated + middle - kl


def exact_gated_grad(a, step=1e-6) -> np.ndarray:
    grad = np.empty(2)
    for i in range(2):
        up, down = np.array(a, float), np.array(a, float)
        up[i] += step
        down[i] -= step
        grad[i] = (exact_gated_elbo(up) - exact_gated_elbo(down)) / (2 * step)
    return grad


def gated_draws(name, num_draws=20000, replicas=2000, seed=0):
    estimator = get_estimator(name)
    experts = torch.tensor(EXPERTS)
    counts, prior = torch.tensor(COUNTS), torch.tensor(PRIOR)
    init = torch.tensor(A).expand(replicas, -1)

    def model():
        with pyro.plate("batch", replicas, dim=-1):
            alpha = pyro.sample("alpha_0",
                                pyro.distributions.Dirichlet(prior.expand(1, -1)).to_event(1))
            weights, _, _ = routing_weights(_sample_decision(alpha, torch.float64, True), "gated",
                                            THRESHOLD)
            observe_counts("obs", weights @ experts, counts, replicas)

    def guide():
        toy_guide(counts, prior.new_ones(3), replicas, estimator=estimator, init=init)

    return replica_gradient_draws(estimator, model, guide,
                                  {TOY_CONCENTRATION: constraints.positive}, num_draws,
                                  replicas, seed=seed)


def hotelling(draws, target) -> float:
    diff = draws.mean(0) - torch.as_tensor(target)
    return float(draws.shape[0] * diff @ torch.linalg.solve(torch.cov(draws.T), diff))


def test_exact_gated_elbo_is_continuous_but_has_a_kinked_integrand():
    edge = gate_edge()
    assert 0 < edge < 0.5
    u = np.array([edge, 1 - edge])
    h = -(u * np.log(u) + (1 - u) * np.log(1 - u)).sum() / 2 / math.log(2)
    assert h == pytest.approx(THRESHOLD, abs=1e-10)
    assert np.isfinite(exact_gated_grad(A)).all()


UNBIASED = [n for n in estimator_names() if get_estimator(n).unbiased]


@pytest.mark.parametrize("name", UNBIASED)
def test_gating_biases_pathwise_estimators_only(name):
    """Score-function estimators stay unbiased under the gate; pathwise ones miss the
    likelihood's jumps at the gate edges (the bias gated_training_bias warns about)."""
    draws = gated_draws(name, seed=3)
    statistic = hotelling(draws, exact_gated_grad(A))
    if get_estimator(name).pathwise:
        assert statistic > 10 * CRITICAL, (name, draws.mean(0), exact_gated_grad(A))
    else:
        assert statistic < CRITICAL, (name, draws.mean(0), exact_gated_grad(A))


def test_gated_training_with_a_pathwise_estimator_warns_and_is_recorded(caplog, tiny_data):
    cfg = TinyLMConfig(vocab_size=tiny_data.vocab_size, d_model=16, n_heads=2, n_layers=1,
                       max_seq_len=16, window=3, chunk_size=4, controller_hidden=8)
    gated = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_batches=1,
                        gate_final=0.5, gate_start=0.0, gate_end=0.5, dataset="tiny")
    assert "biased" in gated_training_bias(gated)
    score = TrainConfig(**{**gated.to_dict(), "estimator": "score"})
    assert gated_training_bias(score) is None
    assert gated_training_bias(TrainConfig(**{**gated.to_dict(), "gate_final": 0.0})) is None
    assert gated_training_bias(TrainConfig(**{**gated.to_dict(), "router": "prior-free"})) is None
    with caplog.at_level(logging.WARNING, logger="bayes_router.inference.train"):
        train(cfg, gated, tiny_data, progress=False)
    assert "reparam-analytic" in caplog.text and "biased" in caplog.text
